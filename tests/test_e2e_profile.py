"""Profiles in real containers: two transformers cells (bf16, fp32) and a vLLM cell of the real
model, each profiled at its one point after its speed rows; profile.parquet, the trace, the report's
"Where the time goes" and `cellbench profile-diff` between them."""

import gzip
import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import paths
from test_e2e_engines import tiny_study

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

POINT = {"batch_size": 1, "input_len": 16, "output_len": 8}
CELLS = [
    {"name": "hf-bf16", "engine": "transformers", "dtype": "bfloat16", "profile": {"point": POINT}},
    {"name": "hf-fp32", "engine": "transformers", "dtype": "float32", "profile": {"point": POINT, "steps": 2}},
    # vLLM as it runs in any study: its own profiler runs in its worker process.
    {
        "name": "vllm",
        "engine": "vllm",
        "dtype": "bfloat16",
        "engine_args": {"enforce_eager": True, "max_model_len": 256},
        "profile": {"point": POINT},
    },
]
# This checkout's package, also in the rules' `cellbench` commands (an installed one may be another's).
ENV = {**os.environ, "CELLBENCH_MACHINE_ID": "e2e", "PYTHONPATH": str(ROOT / "workflow")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("profile")
    study = tiny_study(CELLS)
    study["defaults"]["sweep"] = {**{k: [v] for k, v in POINT.items()}, "repeats": 1, "warmup": 0, "seed": 0}
    study["defaults"]["quality"] = False
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return workdir


def _cell(workdir: Path, name: str) -> Path:
    (cell,) = [p for p in (workdir / "results" / "cells").iterdir() if p.name.rsplit("-", 1)[0] == name]
    return cell / "round-1"


@pytest.mark.parametrize("name", ["hf-bf16", "hf-fp32", "vllm"])
def test_a_profiled_cell_keeps_its_speed_rows_and_its_profile(finished, name):
    folder = _cell(finished, name)
    rows = pd.read_parquet(folder / "metrics.parquet")
    assert set(rows["status"]) == {"ok"} and len(rows) == 1
    record = json.loads((folder / "provenance.json").read_text())
    step = record["container"]["profile"]
    assert step["status"] == "ok", step
    ops = pd.read_parquet(folder / paths.ROUND_PROFILE)
    assert list(ops.columns) == ["op", "calls", "self_us", "total_us", "share", "phase"]
    assert len(ops) == step["ops"] > 10 and ops["share"].sum() == pytest.approx(1.0)
    assert ops["op"].str.startswith("aten::").any() and (ops["total_us"] >= ops["self_us"] - 1e-6).all()
    # vLLM names its steps: the one prefill step and the decode steps after it are told apart.
    assert set(ops["phase"].dropna()) == ({"prefill", "decode"} if name == "vllm" else set())
    with gzip.open(folder / paths.ROUND_PROFILE_TRACE) as packed:
        trace = json.load(packed)
    assert trace["traceEvents"]
    print(f"\n{name}: top ops\n" + ops.head(5).to_string())


def test_the_summary_shows_where_the_time_goes(finished):
    text = (finished / paths.summary_markdown()).read_text()
    assert "## Where the time goes" in text and "### hf-bf16 at 1 × 16→8" in text and "### hf-fp32" in text
    assert "Where the time goes" in (finished / paths.report_html()).read_text()


def test_profile_diff_between_the_two_cells(finished):
    argv = ["python3", "-m", "cellbench.cli", "profile-diff", "hf-bf16", "hf-fp32", "--top", "5",
            "--configfile", str(finished / "study.yaml")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=finished)
    assert done.returncode == 0, done.stderr
    assert "A = hf-bf16, B = hf-fp32" in done.stdout and done.stdout.count("| aten::") >= 3
    print("\n" + done.stdout)
    done = subprocess.run([*argv[:4], "hf-bf16", "nope", *argv[6:]], capture_output=True, text=True, env=ENV,
                          cwd=finished)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("cellbench: profile-diff: no cell 'nope'")
