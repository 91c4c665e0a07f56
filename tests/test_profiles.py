"""Profiles without an engine: per-op figures and shares by hand (the container's trace_ops),
diffs by hand, the cell id, the profile step's failures, and `cellbench profile-diff`."""

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
from cellbench import cli, config, paths, profiles

ROOT = Path(__file__).resolve().parents[1]


def op(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur, "args": args}


def step(name, ts, dur, tid=1):
    return op(name, ts, dur, tid, cat="user_annotation")


def test_step_phase_reads_vllms_annotations(bench):
    assert bench.step_phase("execute_context_2(256)_generation_0(0)") == "prefill"
    assert bench.step_phase("execute_context_0(0)_generation_8(8)") == "decode"
    assert bench.step_phase("execute_context_6(768)_generation_2(2)") == "mixed"
    assert bench.step_phase("execute_770_context_6(sq768sk768sqsq1sqsk1)_generation_2(sq2sk3sqsq4sqsk5)") == "mixed"
    assert bench.step_phase("execute_context_0(0)_generation_0(0)") is None
    assert bench.step_phase("aten::mm") is None


def test_trace_ops_self_time_per_step_phase_and_share_by_hand(bench):
    # Two profiled steps' worth: a prefill step 0-1000 µs and a decode step 1000-1400 µs.
    # Prefill: linear 100-700 holds mm 150-650 (500) -> linear self 100; add 700-800 (100).
    # Decode: linear 1100-1300 holds mm 1120-1280 (160) -> linear self 40. A thread 2 op outside
    # every step has no phase. Annotations are not ops; a zero-length op has no self time: dropped.
    events = [
        step("execute_context_1(128)_generation_0(0)", 0, 1000),
        step("execute_context_0(0)_generation_1(1)", 1000, 400),
        op("aten::linear", 100, 600), op("aten::mm", 150, 500), op("aten::add", 700, 100),
        op("aten::linear", 1100, 200), op("aten::mm", 1120, 160), op("aten::empty", 1300, 0),
        op("aten::copy_", 5000, 100, tid=2), {"ph": "i", "name": "marker", "ts": 3},
    ]  # fmt: skip
    rows = {(r["op"], r["phase"]): r for r in bench.trace_ops(events, steps=2, device=False)}
    whole = (500 + 100 + 100 + 160 + 40 + 100) / 2  # 500 µs of self time per step
    assert set(rows) == {("aten::mm", "prefill"), ("aten::linear", "prefill"), ("aten::add", "prefill"),
                         ("aten::mm", "decode"), ("aten::linear", "decode"), ("aten::copy_", None)}  # fmt: skip
    assert rows[("aten::mm", "prefill")] == {"op": "aten::mm", "calls": 0.5, "self_us": 250.0, "total_us": 250.0,
                                            "phase": "prefill", "share": 250.0 / whole}  # fmt: skip
    assert rows[("aten::linear", "prefill")]["self_us"] == 50.0 and rows[("aten::linear", "prefill")]["total_us"] == 300
    assert rows[("aten::linear", "decode")]["self_us"] == 20.0
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert bench.trace_ops(events, 2, False)[0]["op"] == "aten::mm"  # most self time first


def test_trace_ops_on_a_device_clock_count_kernels_in_the_phase_of_their_launch(bench):
    events = [
        step("execute_context_0(0)_generation_4(4)", 0, 100),
        op("cudaLaunchKernel", 10, 5, cat="cuda_runtime", correlation=42),
        op(
            "gemv_kernel", 30, 50, tid=9, cat="kernel", correlation=42
        ),  # runs after its step's CPU side ended? no: inside
        op("copy_kernel", 500, 20, tid=9, cat="kernel", correlation=99),  # launched outside the profile's steps
        op("aten::mm", 10, 40),  # a CPU op: not on the device clock
    ]
    rows = {(r["op"], r["phase"]): r["self_us"] for r in bench.trace_ops(events, steps=1, device=True)}
    assert rows == {("gemv_kernel", "decode"): 50.0, ("copy_kernel", None): 20.0}


def frame(rows):
    return pd.DataFrame([{"op": op, "calls": 1.0, "self_us": us, "total_us": us, "share": share, "phase": None}
                         for op, us, share in rows])  # fmt: skip


A = frame([("aten::mm", 600.0, 0.6), ("aten::add", 300.0, 0.3), ("aten::silu", 100.0, 0.1)])
B = frame([("aten::mm", 1600.0, 0.8), ("aten::add", 300.0, 0.15), ("aten::copy_", 100.0, 0.05)])


def test_diff_by_hand():
    changed = profiles.diff(A, B).set_index("op")
    # mm: 60 % -> 80 % of the step, +20 points, +1000 µs; add: same µs, a smaller share (-15 points).
    assert changed.loc["aten::mm", "share_points"] == pytest.approx(20.0)
    assert changed.loc["aten::mm", "self_us_delta"] == pytest.approx(1000.0)
    assert changed.loc["aten::add", "share_points"] == pytest.approx(-15.0)
    assert changed.loc["aten::add", "self_us_delta"] == 0
    # An op only one cell ran counts as 0 in the other.
    assert changed.loc["aten::silu", "share_points"] == pytest.approx(-10.0)
    assert changed.loc["aten::copy_", "self_us_delta"] == pytest.approx(100.0)
    # Largest share change first.
    assert list(profiles.diff(A, B)["op"]) == ["aten::mm", "aten::add", "aten::silu", "aten::copy_"]


def test_top_table_and_markdown_section():
    table = profiles.top_table(A, 2)
    assert [row[0] for row in table.rows] == ["aten::mm", "aten::add"]
    assert table.rows[0][4] == "60.0 %"
    lines = profiles.markdown_section([("a at 1 × 8→4", table)])
    assert lines[0] == "## Where the time goes" and "| aten::mm | 1 | 600 | 600 | 60.0 % |" in "\n".join(lines)


def test_rows_round_trip_through_parquet(tmp_path):
    rows = profiles.rows_of({"ops": A.to_dict("records")})
    profiles.write_parquet(tmp_path / "p.parquet", rows)
    assert profiles.read(tmp_path / "p.parquet").to_dict("records") == A.to_dict("records")
    profiles.write_parquet(tmp_path / "none.parquet", profiles.rows_of(None))
    assert profiles.read(tmp_path / "none.parquet").empty


def test_profile_is_part_of_the_cell_id_only_when_set(study):
    ids = {c["name"]: c["id"] for c in config.expand_cells(study)}
    profiled = copy.deepcopy(study)
    sweep = profiled["defaults"]["sweep"]
    point = {"batch_size": sweep["batch_size"][0], "input_len": sweep["input_len"][0],
             "output_len": sweep["output_len"][0]}  # fmt: skip
    profiled["cells"][0]["profile"] = {"point": point}
    cells = config.expand_cells(profiled)
    config.validate(profiled)
    group = profiled["cells"][0]["name"]
    for cell in cells:
        if cell["group"] == group:
            assert cell["profile"] == {"point": point, "steps": 1} and cell["id"] != ids[cell["name"]]
        else:
            assert cell["profile"] is None and cell["id"] == ids[cell["name"]]


class Broken:
    vocab_size, special_ids = 10, set()

    def profile(self, prompts, output_len, steps, device):
        raise RuntimeError("no profiler\nhere")


class Unprofiled:
    vocab_size, special_ids = 10, set()


CELL = {"profile": {"point": {"batch_size": 1, "input_len": 2, "output_len": 2}, "steps": 1}, "sweep": {"seed": 0}}


def test_a_failing_or_missing_profiler_is_a_status(bench, tmp_path):
    failed = bench.measure_profile(Broken(), CELL, tmp_path)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: no profiler here"
    unsupported = bench.measure_profile(Unprofiled(), CELL, tmp_path)
    assert unsupported["status"] == "unsupported" and "has no profiler" in unsupported["error"]
    assert not (tmp_path / "profile.json").exists()


def _study_file(tmp_path: Path) -> tuple[Path, dict]:
    study = {
        "study": "p",
        "images": {"cpu": {"context": "containers/cpu", "device": "cpu"}},
        "models": {"m": {"source": "pypi-gguf", "package": "x==1", "file": "m.gguf", "prepare_image": "cpu"}},
        "defaults": {
            "image": "cpu",
            "model": "m",
            "engine": "transformers",
            "sweep": {"batch_size": [1], "input_len": [8], "output_len": [4]},
        },  # fmt: skip
        "cells": [
            {"name": "a", "profile": {"point": {"batch_size": 1, "input_len": 8, "output_len": 4}}},
            {"name": "b", "profile": {"point": {"batch_size": 1, "input_len": 8, "output_len": 4}}, "dtype": "float32"},
            {"name": "c"},
        ],  # fmt: skip
        "baseline": "a",
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path, {c["name"]: c for c in config.read(path)[1]["cells"].values()}


def test_profile_diff_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, cells = _study_file(tmp_path)
    for name, rows in (("a", A), ("b", B)):
        target = paths.cell_profile(cells[name]["id"], 1)
        target.parent.mkdir(parents=True)
        profiles.write_parquet(target, rows.to_dict("records"))
    assert cli.main(["profile-diff", "a", "b", "--top", "2", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "A = a, B = b; 2 ops" in out
    assert "| aten::mm | 60.0 % | 80.0 % | +20.0 | 600 | 1,600 | +1,000 |" in out
    assert "silu" not in out  # --top 2
    assert cli.main(["profile-diff", "a", "c", "--configfile", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "cellbench: profile-diff: cell c has no profile (set `profile:` for it in the study)"
    )
    assert cli.main(["profile-diff", "a", "zz", "--configfile", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "cellbench: profile-diff: no cell 'zz' in the study (cells: a, b, c)"


def test_where_the_time_goes_in_summary_md_and_the_page(tmp_path):
    from cellbench import report, report_html

    results = tmp_path / "results"
    record = {"cells": {"a-1": 1, "c-3": 1, "new-4": 1}}
    (tmp_path / "study.json").write_text(json.dumps(record))
    point = {"batch_size": 8, "input_len": 16, "output_len": 4}
    for cell_id, name, profile in (("a-1", "a", {"point": point, "steps": 1}), ("c-3", "c", None)):
        target = paths.cell_profile(cell_id, 1, results)
        target.parent.mkdir(parents=True)
        profiles.write_parquet(target, A.to_dict("records") if profile else [])
        prov = paths.cell_provenance(cell_id, 1, results)
        prov.write_text(json.dumps({"cell": {"name": name, "profile": profile}}))
    sections = profiles.report_sections(tmp_path / "study.json", results)  # new-4: not run yet
    assert [title for title, _ in sections] == ["a at 8 × 16→4"]
    empty = pd.DataFrame(columns=["status", "output_tok_s", "machine_id", "quality_status"])
    md = report.write_tables(empty, "s", "a", tmp_path, extra=profiles.markdown_section(sections))[0].read_text()
    assert "## Where the time goes" in md and "### a at 8 × 16→4" in md and "| aten::mm |" in md
    page = report_html.page("s", "a", empty, [], [], [], [], tmp_path / "i.html", None, sections)
    assert "Where the time goes" in page and "<td>aten::mm</td>" in page
    assert "Where the time goes" not in report_html.page("s", "a", empty, [], [], [], [], tmp_path / "i.html")


PHASED = pd.DataFrame(
    [
        {"op": "aten::mm", "calls": 1.0, "self_us": 600.0, "total_us": 600.0, "share": 0.6, "phase": "prefill"},
        {"op": "aten::mm", "calls": 8.0, "self_us": 200.0, "total_us": 200.0, "share": 0.2, "phase": "decode"},
        {"op": "attn", "calls": 8.0, "self_us": 200.0, "total_us": 250.0, "share": 0.2, "phase": "decode"},
    ]
)


def test_phases_are_summed_per_op_and_shown_as_shares():
    ops = profiles.by_op(PHASED).set_index("op")
    # mm: 600 prefill + 200 decode µs = 800 µs, 80 % of the step, a quarter of it in decode.
    assert ops.loc["aten::mm", "self_us"] == 800.0 and ops.loc["aten::mm", "share"] == pytest.approx(0.8)
    assert ops.loc["aten::mm", "decode"] == pytest.approx(0.25) and ops.loc["attn", "decode"] == 1.0
    assert profiles.phase_shares(PHASED) == {"prefill": 0.6, "decode": 0.4}
    assert profiles.phase_text(PHASED) == "prefill 60.0 % · decode 40.0 % of the profiled time"
    assert profiles.phase_text(A) == "" and profiles.by_op(A)["decode"].isna().all()  # no phase known
    assert profiles.top_table(PHASED).rows[0] == ["aten::mm", "9", "800", "800", "80.0 %", "25.0 %"]
    assert profiles.top_table(A).rows[0][5] == "—"


def test_report_diffs_each_cell_at_a_point_against_the_baseline(tmp_path):
    results = tmp_path / "results"
    (tmp_path / "study.json").write_text(json.dumps({"cells": {"a-1": 1, "b-2": 1, "z-3": 1, "other-4": 1}}))
    point = {"batch_size": 8, "input_len": 16, "output_len": 4}
    for cell_id, rows, at in (("a-1", A, point), ("b-2", B, point), ("z-3", PHASED, point),
                              ("other-4", A, {**point, "batch_size": 1})):  # fmt: skip
        name = cell_id.split("-")[0]
        target = paths.cell_profile(cell_id, 1, results)
        target.parent.mkdir(parents=True)
        profiles.write_parquet(target, rows.to_dict("records"))
        paths.cell_provenance(cell_id, 1, results).write_text(json.dumps({"cell": {"name": name, "profile": {
            "point": at, "steps": 1}}}))  # fmt: skip
    titles = [title for title, _ in profiles.report_sections(tmp_path / "study.json", results, baseline="b")]
    assert titles == [
        "a at 8 × 16→4",
        "b at 8 × 16→4",
        "other at 1 × 16→4",
        "z at 8 × 16→4 (prefill 60.0 % · decode 40.0 % of the profiled time)",
        "Diff: B = a at 8 × 16→4 against A = b, largest |Δ share| first",
        "Diff: B = z at 8 × 16→4 against A = b, largest |Δ share| first",
    ]
    # Without the baseline among them, the first cell by name is the reference.
    titles = [title for title, _ in profiles.report_sections(tmp_path / "study.json", results, baseline="q")]
    assert titles[-2:] == [
        "Diff: B = b at 8 × 16→4 against A = a, largest |Δ share| first",
        "Diff: B = z at 8 × 16→4 against A = a, largest |Δ share| first",
    ]
