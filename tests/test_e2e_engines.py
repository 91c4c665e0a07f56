"""llama.cpp and serve-mode cells through Snakemake in real containers: the llama.cpp image
(llama-cpp-python compiled from source), real vLLM's OpenAI server, the real model."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import contract

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

CELLS = [
    {"name": "llamacpp", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1"},
    # Asks for a quantization the GGUF does not hold: a failed cell with a clear error.
    {"name": "llamacpp-q8", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q8_0"},
    {"name": "served", "mode": "serve", "dtype": "bfloat16", "engine_args": {"enforce_eager": True}},
    # Added through the engine contract alone (its class, its declaration): a plain reference.
    {"name": "hf", "engine": "transformers", "dtype": "bfloat16"},
]


def tiny_study(cells: list[dict]) -> dict:
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study["study"] = "tiny-engines"
    # Only names both engines take (max_model_len is llama.cpp's n_ctx) stay in the defaults.
    study["defaults"]["engine_args"] = {"max_model_len": 256}
    study["defaults"]["sweep"] = {
        "batch_size": [1, 2], "input_len": [16], "output_len": [8], "repeats": 2, "warmup": 1, "seed": 0,
    }  # fmt: skip
    study["defaults"]["timeout_s"] = 600
    study["cells"] = cells
    study["baseline"] = cells[0]["name"]
    return study


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engines")
    (workdir / "study.yaml").write_text(yaml.safe_dump(tiny_study(CELLS)))
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "CELLBENCH_MACHINE_ID": "e2e"})
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return workdir


def _rows(workdir: Path, name: str) -> pd.DataFrame:
    (cell,) = [p for p in (workdir / "results" / "cells").iterdir() if p.name.rsplit("-", 1)[0] == name]
    return pd.read_parquet(cell / "round-1" / "metrics.parquet")


def test_llamacpp_cell_runs_the_q4_1_gguf(finished):
    rows = _rows(finished, "llamacpp")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()  # fixed output length held
    assert (rows["output_tok_s"] > 0).all() and (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["engine"]) == {"llamacpp"} and set(rows["engine_version"]) == {"0.3.36"}
    assert set(rows["effective_quantization"]) == {"Q4_1"}
    effective = json.loads(rows["effective_json"].iloc[0])
    assert effective["n_ctx"] == 256  # max_model_len reached llama.cpp as n_ctx
    assert effective["n_threads"] == len(os.sched_getaffinity(0))


def test_llamacpp_refuses_a_quantization_the_gguf_does_not_hold(finished):
    rows = _rows(finished, "llamacpp-q8")
    assert set(rows["status"]) == {"failed"} and "is Q4_1" in rows["error"].iloc[0]


def test_serve_cell_records_serving_latencies(finished):
    rows = _rows(finished, "served")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"} and set(rows["mode"]) == {"serve"}
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()
    for column in ("ttft_p50_s", "tpot_p50_s", "itl_p50_s", "itl_p99_s", "latency_p99_s"):
        assert (rows[column] > 0).all(), column
    assert (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["effective_dtype"]) == {"bfloat16"} and rows["effective_eager"].all()


def test_transformers_reference_engine(finished):
    rows = _rows(finished, "hf")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}, rows["error"].iloc[0]
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()
    assert (rows["output_tok_s"] > 0).all() and (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["engine_version"]) == {"5.19.0"} and set(rows["effective_dtype"]) == {"bfloat16"}
    effective = json.loads(rows["effective_json"].iloc[0])
    assert effective["engine_args"] == {"max_model_len": 256} and effective["num_threads"] >= 1


@pytest.mark.parametrize("name", ["llamacpp", "served", "hf"])
def test_each_engine_reports_what_its_declaration_promises(finished, name):
    rows = _rows(finished, name)
    assert contract.missing_reports(json.loads(rows["effective_json"].iloc[0]), rows["engine"].iloc[0]) == []
    assert "engine-contract" not in rows["findings_json"].iloc[0]


def test_tables_compare_the_engines(finished):
    md = (finished / "results" / "tables" / "summary.md").read_text()
    assert "| llamacpp |" in md and "| served |" in md and "| hf |" in md and "## Serving latency" in md
    left = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=cellbench.origin={finished}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert left.stdout.split() == []
