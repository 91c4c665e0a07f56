"""llama.cpp and serve-mode cells through Snakemake in real containers: the llama.cpp image
(llama-cpp-python compiled from source), real vLLM's OpenAI server, the real model. Every cell
also measures its quality (greedy continuations, NLL of the reference text) after its points,
and one transformers cell runs a copy of the model with a tensor zeroed (tests/corrupt_model.py)."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import contract, paths
from corrupt_model import corrupted_hub, hub_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

CELLS = [
    {"name": "llamacpp", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1"},
    # Asks for a quantization the GGUF does not hold: a failed cell with a clear error.
    {"name": "llamacpp-q8", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q8_0"},
    {"name": "served", "mode": "serve", "dtype": "bfloat16", "engine_args": {"enforce_eager": True}},
    # Added through the engine contract alone (its class, its declaration): a plain reference.
    {"name": "hf", "engine": "transformers", "dtype": "bfloat16"},
    # The same engine on the model with its final norm zeroed: as fast, and its quality far off.
    {"name": "hf-corrupted", "engine": "transformers", "dtype": "bfloat16", "model": "corrupted"},
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
    # Chunks of the reference text that fit max_model_len 256 in tokens (about 170 each); few
    # prompts and tokens: a bf16 transformers decode step takes a fifth of a second on this CPU.
    study["defaults"]["quality"] = {"prompts": 8, "max_tokens": 8, "chunk_chars": 600}
    study["cells"] = cells
    study["baseline"] = cells[0]["name"]
    return study


def snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the study in `workdir`/study.yaml through Snakemake (machine id e2e); it must succeed."""
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml"), *extra]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "CELLBENCH_MACHINE_ID": "e2e"})
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def run_study(workdir: Path, study: dict) -> Path:
    """Write `study` into `workdir` and run it to the end through Snakemake."""
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake(workdir)
    return workdir


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engines")
    study = tiny_study(CELLS)
    study["models"]["corrupted"] = hub_model()
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    hub = workdir / "hub"
    env = {**os.environ, "CELLBENCH_MACHINE_ID": "e2e", "HF_HUB_CACHE": str(hub)}
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    # The corrupted copy is made from the prepared model, so the model is prepared first.
    # (the target before --configfile, which would take it for a second config file)
    target = str(paths.model_manifest("smollm2-135m"))
    done = subprocess.run([argv[0], target, *argv[1:]], capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    corrupted_hub(workdir / paths.model_dir("smollm2-135m"), hub)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return workdir


def cell_rows(workdir: Path, name: str) -> pd.DataFrame:
    """Round 1's rows of the one cell named `name`."""
    (cell,) = [p for p in (workdir / "results" / "cells").iterdir() if p.name.rsplit("-", 1)[0] == name]
    return pd.read_parquet(cell / "round-1" / "metrics.parquet")


def test_llamacpp_cell_runs_the_q4_1_gguf(finished):
    rows = cell_rows(finished, "llamacpp")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()  # fixed output length held
    assert (rows["output_tok_s"] > 0).all() and (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["engine"]) == {"llamacpp"} and set(rows["engine_version"]) == {"0.3.36"}
    assert set(rows["effective_quantization"]) == {"Q4_1"}
    effective = json.loads(rows["effective_json"].iloc[0])
    assert effective["n_ctx"] == 256  # max_model_len reached llama.cpp as n_ctx
    assert effective["n_threads"] == len(os.sched_getaffinity(0))


def test_llamacpp_refuses_a_quantization_the_gguf_does_not_hold(finished):
    rows = cell_rows(finished, "llamacpp-q8")
    assert set(rows["status"]) == {"failed"} and "is Q4_1" in rows["error"].iloc[0]


def test_serve_cell_records_serving_latencies(finished):
    rows = cell_rows(finished, "served")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"} and set(rows["mode"]) == {"serve"}
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()
    for column in ("ttft_p50_s", "tpot_p50_s", "itl_p50_s", "itl_p99_s", "latency_p99_s"):
        assert (rows[column] > 0).all(), column
    assert (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["effective_dtype"]) == {"bfloat16"} and rows["effective_eager"].all()


def test_transformers_reference_engine(finished):
    rows = cell_rows(finished, "hf")
    assert len(rows) == 4 and set(rows["status"]) == {"ok"}, rows["error"].iloc[0]
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()
    assert (rows["output_tok_s"] > 0).all() and (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["engine_version"]) == {"5.19.0"} and set(rows["effective_dtype"]) == {"bfloat16"}
    effective = json.loads(rows["effective_json"].iloc[0])
    assert effective["engine_args"] == {"max_model_len": 256} and effective["num_threads"] >= 1


@pytest.mark.parametrize("name", ["llamacpp", "served", "hf"])
def test_each_engine_reports_what_its_declaration_promises(finished, name):
    rows = cell_rows(finished, name)
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


@pytest.mark.parametrize("name", ["llamacpp", "hf", "served"])
def test_each_engine_measures_quality_once_after_its_points(finished, name):
    rows = cell_rows(finished, name)
    assert set(rows["status"]) == {"ok"}, rows["quality_error"].iloc[0]  # speed rows as before
    assert set(rows["quality_status"]) == {"ok"}, rows["quality_error"].iloc[0]
    greedy = json.loads(rows["quality_greedy_json"].iloc[0])
    assert len(greedy) == 8 and sum(bool(text.strip()) for text in greedy) >= 7
    assert rows["quality_nll_tokens"].iloc[0] > 2000 and rows["quality_s"].iloc[0] > 0
    # A small model on Shakespeare: about 1-2 bits per byte (uniform over its vocabulary: ~4.4).
    assert 0.5 < rows["quality_bits_per_byte"].iloc[0] < 3
    assert rows["quality_method_version"].iloc[0] == 1


def test_a_cell_that_failed_to_load_has_no_quality_but_says_why(finished):
    rows = cell_rows(finished, "llamacpp-q8")
    assert set(rows["quality_status"]) == {"failed"} and rows["quality_bits_per_byte"].isna().all()
    assert rows["quality_error"].iloc[0].startswith("quality step not reached: ")


def test_the_corrupted_model_runs_but_its_quality_is_far_off(finished):
    good, bad = cell_rows(finished, "hf"), cell_rows(finished, "hf-corrupted")
    assert set(bad["status"]) == {"ok"} and set(bad["quality_status"]) == {"ok"}  # its speed rows stand
    assert bad["quality_bits_per_byte"].iloc[0] > 2 * good["quality_bits_per_byte"].iloc[0]
    assert json.loads(bad["quality_greedy_json"].iloc[0]) != json.loads(good["quality_greedy_json"].iloc[0])


def test_the_corrupted_cell_is_marked_diverged_and_never_named_fastest(finished):
    md = (finished / "results" / "tables" / "summary.md").read_text()
    quality = md.split("## Quality vs baseline", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in quality.splitlines() if line.startswith("| e2e | hf-corrupted |")]
    assert "❌ diverged" in row
    (good,) = [line for line in quality.splitlines() if line.startswith("| e2e | hf |")]
    assert "❌" not in good
    fastest = md.split("## Fastest", 1)[1].split("\n## ", 1)[0]
    assert "| **hf-corrupted**" not in fastest
    assert len(cell_rows(finished, "hf-corrupted")) == 4  # its speed rows are kept
