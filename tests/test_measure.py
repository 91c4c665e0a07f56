"""Metric computation from recorded timings, checked against figures computed by hand."""

import json
import math

import pytest
from cellbench import config, measure, metrics

CONTEXT = {
    "study": "s",
    "machine_id": "m1",
    "run_id": "r1",
    "config_hash": "h",
    "git_sha": None,
    "image_id": "sha256:x",
}


def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert measure.percentile(values, 50) == 2.5
    assert measure.percentile(values, 90) == pytest.approx(3.7)  # rank 2.7 between 3 and 4
    assert measure.percentile(values, 0) == 1.0
    assert measure.percentile([], 50) is None
    assert measure.percentile([None, 5.0], 99) == 5.0


def test_point_metrics_by_hand():
    point = {
        "wall_s": 2.0,
        "requests": [
            {"prompt_tokens": 10, "output_tokens": 5, "ttft_s": 0.2, "latency_s": 1.0},
            {"prompt_tokens": 10, "output_tokens": 5, "ttft_s": 0.4, "latency_s": 2.0},
        ],
    }
    m = measure.point_metrics(point)
    assert m["output_tok_s"] == 5.0  # 10 tokens / 2 s
    assert m["total_tok_s"] == 15.0  # 30 tokens / 2 s
    assert m["requests_s"] == 1.0
    assert m["latency_p50_s"] == 1.5
    assert m["ttft_p50_s"] == pytest.approx(0.3)
    # TPOT = (latency - TTFT) / (output - 1): 0.8/4 = 0.2 and 1.6/4 = 0.4, median 0.3
    assert m["tpot_p50_s"] == pytest.approx(0.3)


def test_tpot_needs_two_tokens():
    assert measure.tpot({"output_tokens": 1, "ttft_s": 0.1, "latency_s": 0.1}) is None
    assert measure.tpot({"output_tokens": 3, "ttft_s": None, "latency_s": 0.1}) is None


def _cell(study):
    study["defaults"]["sweep"].update(batch_size=[1, 4], repeats=2)
    return config.expand_cells(study)[0]


def _point(batch, repeat):
    requests = [{"prompt_tokens": 128, "output_tokens": 64, "ttft_s": 0.1, "latency_s": 1.0}] * batch
    return {
        "batch_size": batch,
        "input_len": 128,
        "output_len": 64,
        "repeat": repeat,
        "wall_s": 1.0,
        "requests": requests,
    }


def test_rows_of_a_complete_cell_validate_against_the_schema(study):
    cell = _cell(study)
    raw = {"points": [_point(1, 0), _point(1, 1), _point(4, 0), _point(4, 1)], "load_s": 3.0,
           "effective": {"dtype": "bfloat16", "enforce_eager": True}}  # fmt: skip
    rows = measure.rows_for_cell(cell, raw, CONTEXT, status="ok", error=None)
    table = metrics.to_table(rows)
    assert table.num_rows == 4
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("output_tok_s").to_pylist() == [64.0, 64.0, 256.0, 256.0]
    assert table.column("effective_eager").to_pylist() == [True] * 4


def test_a_crash_mid_cell_keeps_measured_repeats_and_marks_the_rest(study):
    cell = _cell(study)
    raw = {"points": [_point(1, 0), _point(1, 1), _point(4, 0)]}
    rows = measure.rows_for_cell(cell, raw, CONTEXT, status="failed", error="RuntimeError: boom")
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "ok"), (1, "ok"), (4, "ok"), (4, "failed")]
    assert rows[-1]["error"] == "RuntimeError: boom" and rows[-1]["repeat"] is None
    metrics.to_table(rows)


def test_a_cell_that_never_started_is_one_row_per_point(study):
    cell = _cell(study)
    rows = measure.rows_for_cell(cell, None, CONTEXT, status="timeout", error="cell exceeded its timeout")
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "timeout"), (4, "timeout")]


def test_unsupported_is_told_apart_from_a_crash(study):
    cell = _cell(study)
    error = "AttributeError: '_C' has no attribute 'cpu_gemm_wna16'"
    rows = measure.rows_for_cell(cell, None, CONTEXT, status="failed", error=error)
    assert {r["status"] for r in rows} == {"unsupported"}
    assert measure.classify("failed", "ValueError: something else") == "failed"


def test_error_from_log_prefers_known_signatures():
    log = (
        "INFO loading\nTraceback...\nAttributeError: module '_C' has no attribute 'cpu_gemm_wna16'\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert "cpu_gemm_wna16" in measure.error_from_log(log)
    assert measure.error_from_log("ValueError: bad\nKeyError: 'x'\n") == "KeyError: 'x'"
    assert measure.error_from_log("all fine\n") is None


def test_points_order():
    sweep = {"batch_size": [1, 8], "input_len": [128], "output_len": [32, 64]}
    assert [(p["batch_size"], p["output_len"]) for p in measure.points(sweep)] == [(1, 32), (1, 64), (8, 32), (8, 64)]


def test_device_arch_is_the_gpu_s_and_null_on_cpu(study):
    cell = _cell(study)
    raw = {"points": [_point(1, 0)], "load_s": 3.0, "effective": {},
           "provenance": {"gpu": {"torch": {"device_name": "NVIDIA H200", "arch": "sm_90"}}}}  # fmt: skip
    assert measure.rows_for_cell(cell, raw, CONTEXT, status="ok", error=None)[0]["device_arch"] is None  # a CPU cell
    gpu = {**cell, "device": "cuda"}
    row = measure.rows_for_cell(gpu, raw, CONTEXT, status="ok", error=None)[0]
    assert (row["device_name"], row["device_arch"]) == ("NVIDIA H200", "sm_90")


QUALITY_OK = {"status": "ok", "error": None, "seconds": 12.5, "greedy": ["a", "b c"], "greedy_tokens": 5,
              "nll_sum": 10071 * math.log(2) * 2, "nll_tokens": 2851, "method": "test"}  # fmt: skip


def test_quality_figures_are_on_every_row_of_the_measured_round(study):
    cell = _cell(study)
    raw = {"points": [_point(1, 0), _point(1, 1), _point(4, 0), _point(4, 1)], "quality": QUALITY_OK}
    rows = measure.rows_for_cell(cell, raw, {**CONTEXT, "round": 1}, status="ok", error=None)
    # The default chunks hold 10,089 bytes of the passage less 9 blank lines between 10 chunks.
    for row in rows:
        assert row["quality_status"] == "ok" and row["quality_error"] is None and row["quality_s"] == 12.5
        assert row["quality_bits_per_byte"] == pytest.approx(2.0)  # 2 bits per byte, by construction
        assert row["quality_nll"] == pytest.approx(10071 * math.log(2) * 2 / 2851)
        assert row["quality_nll_tokens"] == 2851 and row["quality_method_version"] == 1
        assert json.loads(row["quality_greedy_json"]) == ["a", "b c"]
    table = metrics.to_table(rows)
    assert table.column("quality_nll_tokens").to_pylist() == [2851] * 4
    # The same record on round 2 is not that round's: null, "not measured".
    later = measure.rows_for_cell(cell, raw, {**CONTEXT, "round": 2}, status="ok", error=None)
    assert {row[name] for row in later for name in measure.QUALITY_COLUMNS} == {None}


def test_quality_off_failed_or_not_reached_is_a_status_and_the_speed_rows_stand(study):
    cell = _cell(study)
    points = [_point(1, 0), _point(1, 1), _point(4, 0), _point(4, 1)]
    context = {**CONTEXT, "round": 1}
    off = measure.rows_for_cell({**cell, "quality": False}, {"points": points}, context, status="ok", error=None)
    assert {(r["quality_status"], r["quality_method_version"], r["quality_bits_per_byte"]) for r in off} == {
        ("off", None, None)
    }
    failed = {"status": "unsupported", "error": "no prompt logprobs", "seconds": 0.1}
    rows = measure.rows_for_cell(cell, {"points": points, "quality": failed}, context, status="ok", error=None)
    assert {(r["status"], r["quality_status"], r["quality_error"]) for r in rows} == {
        ("ok", "unsupported", "no prompt logprobs")
    }
    assert {r["quality_bits_per_byte"] for r in rows} == {None}
    bare = {**QUALITY_OK, "nll_tokens": 0}
    rows = measure.rows_for_cell(cell, {"points": points, "quality": bare}, context, status="ok", error=None)
    assert rows[0]["quality_status"] == "failed" and "without its figures" in rows[0]["quality_error"]
    rows = measure.rows_for_cell(cell, {"points": points[:1], "error": "RuntimeError: boom"}, context,
                                 status="failed", error="RuntimeError: boom")  # fmt: skip
    assert {(r["quality_status"], r["quality_error"]) for r in rows} == {
        ("failed", "quality step not reached: RuntimeError: boom")
    }
    metrics.to_table(rows)
