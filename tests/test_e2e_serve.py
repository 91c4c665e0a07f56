"""Serve load levels through Snakemake in the real vLLM CPU container: one cell, two concurrency
levels and a capacity search on one server start, the rows, the vLLM-format result files and
the report's serving sections. The engine load dominates (1-4 minutes on a busy 2-core host)."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import paths

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

SERVE = {
    "concurrency": [1, 2],
    "requests_per_level": 1,
    # Generous budgets: the test checks the plumbing, not this host's speed.
    "slo": {"ttft_ms": 60000, "tpot_ms": 10000},
    "search": {"metric": "concurrency", "low": 2, "high": 3, "resolution": 1},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study.update(study="tiny-serve", baseline="served", expectations=[])
    study["defaults"]["engine_args"] = {"max_model_len": 128, "enforce_eager": True}
    study["defaults"]["sweep"] = {"batch_size": [1], "input_len": [8], "output_len": [4], "repeats": 1,
                                  "warmup": 1, "seed": 0, "rounds": 1}  # fmt: skip
    study["defaults"]["quality"] = False
    study["defaults"]["timeout_s"] = 900
    study["cells"] = [{"name": "served", "mode": "serve", "dtype": "bfloat16", "serve": SERVE}]
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    env = {**os.environ, "CELLBENCH_MACHINE_ID": "e2e", "PYTHONPATH": str(ROOT / "workflow")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return workdir


def test_levels_and_probes_are_rows_of_one_server_start(finished):
    (cell,) = (finished / "results" / "cells").iterdir()
    rows = pd.read_parquet(cell / "round-1" / "metrics.parquet")
    assert set(rows["status"]) == {"ok"}
    assert rows["load_s"].nunique() == 1  # one engine load for every level
    sweep = rows[rows["load_phase"] == "sweep"].sort_values("concurrency")
    assert list(sweep["concurrency"]) == [1, 2] and list(sweep["batch_size"]) == [1, 2]
    # k = 1 wave measured after one warm-up wave: 1 and 2 requests
    assert list(sweep["requests_measured"]) == [1, 2] and list(sweep["requests_warmup"]) == [1, 2]
    assert (sweep["output_tokens"] == sweep["requests_measured"] * 4).all()
    assert (sweep["slo_share"] == 1.0).all() and (sweep["goodput_rps"] > 0).all()
    assert (sweep["ttft_p50_s"] < sweep["latency_p50_s"]).all()
    search = rows[rows["load_phase"] == "search"]
    assert list(search["concurrency"]) == [2, 3]  # low held, the upper bound held: done
    provenance = json.loads((cell / "round-1" / "provenance.json").read_text())
    (found,) = provenance["container"]["search"]["searches"]
    assert found["outcome"]["capacity"] == 3 and found["outcome"]["bound"] == "at least"
    result = json.loads(paths.serve_result(cell.name, 1, "sweep-concurrency-2-8x4-repeat0", finished / "results")
                        .read_text())  # fmt: skip
    assert (result["max_concurrency"], result["request_rate"], result["completed"]) == (2, "inf", 2)
    assert result["median_ttft_ms"] > 0 and result["request_goodput"] > 0


def test_report_states_capacity(finished):
    summary = (finished / "results" / "tables" / "summary.md").read_text()
    assert "## Serving: capacity under SLO" in summary
    assert "≥ 3 concurrent at SLO share ≥ 0.9 (TTFT ≤ 60000 ms, TPOT ≤ 10000 ms)" in summary
    assert "| concurrency 2 · 8→4 | ok |" in summary
    page = (finished / "results" / "report" / "index.html").read_text()
    assert "serve-latency.png" in page and "serve-goodput.png" in page and "capacity under SLO" in page
