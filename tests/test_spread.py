"""Repeat spread (throughput and latency) and the serving table, checked by hand."""

import json

import pandas as pd
import pytest
from cellbench import aggregate, report


def _row(cell, repeat, tok_s, latency, **extra):
    return {
        "machine_id": "m1", "cell_id": f"{cell}-h", "cell_name": cell, "batch_size": 1, "input_len": 16,
        "output_len": 8, "repeat": repeat, "status": "ok", "error": None, "output_tok_s": tok_s,
        "latency_p50_s": latency, "latency_p99_s": latency, "ttft_p50_s": 0.1, "tpot_p50_s": 0.01,
        "ttft_p99_s": None, "tpot_p99_s": None, "itl_p50_s": None, "itl_p99_s": None, "study": "s",
        "engine": "vllm", "image": "cpu", "model": "m", "dtype": "bfloat16", "quantization": None,
        "effective_dtype": None, "effective_quantization": None, "effective_eager": True,
        "effective_json": json.dumps({"dtype": "bfloat16"}), "load_s": 1.0, "peak_memory_mb": 1.0,
        "device_name": "cpu", "schema_version": 1, "method_version": 1, **extra,
    }  # fmt: skip


@pytest.fixture
def points():
    serve = {"ttft_p99_s": 0.2, "tpot_p99_s": 0.03, "itl_p50_s": 0.02, "itl_p99_s": 0.04}
    rows = [
        _row("steady", 0, 10.0, 1.0), _row("steady", 1, 10.0, 1.0),
        # latency 0.9 and 1.1: mean 1.0, population std 0.1 -> CV 10 %, flagged
        _row("noisy", 0, 10.0, 0.9, **serve), _row("noisy", 1, 10.0, 1.1, **{**serve, "itl_p99_s": 0.06}),
    ]  # fmt: skip
    return aggregate.cell_points(pd.DataFrame(rows), "steady-h").set_index("cell_name")


def test_latency_spread_by_hand(points):
    noisy = points.loc["noisy"]
    assert (noisy["latency_p50_s_min"], noisy["latency_p50_s_max"]) == (0.9, 1.1)
    assert noisy["latency_p50_s_cv"] == pytest.approx(0.1)
    assert bool(noisy["latency_cv_flag"]) and not bool(noisy["cv_flag"])  # throughput steady, latency not
    assert points.loc["steady", "latency_p50_s_cv"] == 0 and not bool(points.loc["steady", "latency_cv_flag"])
    assert noisy["itl_p99_s"] == pytest.approx(0.05)  # mean of the repeats' p99


def test_tables_show_latency_spread_and_serving_figures(points, tmp_path):
    md = report.write_tables(points.reset_index(), "s", "steady", tmp_path)[0].read_text()
    assert "| 1.000 ±10.0% ⚠ |" in md and "| 1.000 ±0.0% |" in md
    assert "## Serving latency" in md
    assert "| m1 | noisy | 1 × 16→8 | 100.0 | 200.0 | 10.0 | 30.0 | 20.0 | 50.0 | 1000.0 | 1000.0 |" in md


def test_llamacpp_effective_in_words():
    text = aggregate.describe_effective(json.dumps({"engine": "llamacpp", "quantization": "Q4_1", "n_threads": 2}))
    assert text == "Q4_1"
