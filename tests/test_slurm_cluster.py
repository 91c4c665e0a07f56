"""Studies across a real two-node Slurm cluster (scripts/slurm_cluster.sh: slurmctld and two slurmd
nodes in their own namespaces of this machine, each with its own podman image store and no docker).

One working directory, as shared storage: a two-cell study runs its cells on both nodes, each node
loading the image from the archive the profile made after the build (its sha256 checked first);
the same study run on one node gives the same tables; a GPU cell is scheduled by `--gres=gpu:1` on
the node with (fake) GPUs and gets the device flags of the GPU Slurm gave it; a node lost mid-cell
fails the cell's job, leaves no partial result and no container, and a plain rerun runs that cell
only. Every cell is llama.cpp on SmolLM2-135M's Q4_1 GGUF: seconds per engine load."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import paths
from test_e2e import ROOT, cell_dirs, tiny_study

pytestmark = pytest.mark.e2e

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
SLURM_CONF = Path(os.environ.get("CELLBENCH_CLUSTER", "/var/lib/cellbench-cluster")) / "etc" / "slurm.conf"
ENV = {**os.environ, "SLURM_CONF": str(SLURM_CONF), "CELLBENCH_RUNTIME": "podman", "CELLBENCH_MACHINE_ID": "cluster"}
FAKE_GPU_UUIDS = {0: "GPU-00000000-cbfa-0000-0000-000000000000", 1: "GPU-00000000-cbfa-0000-0000-000000000001"}


def cluster(*args: str, check: bool = True) -> str:
    done = subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, env=ENV)
    if check and done.returncode:
        raise AssertionError(f"slurm_cluster.sh {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def slurm(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, check=True).stdout


def study(name: str, cells: dict, **sweep) -> dict:
    """llama.cpp cells of 2 CPUs each (a node has 2: one cell per node at a time)."""
    base = tiny_study(**cells)
    base["study"] = name
    base["images"]["fakecuda"] = {**base["images"]["llamacpp"], "device": "cuda"}  # same recipe, same image
    base["defaults"].update(image="llamacpp", engine="llamacpp", quantization="Q4_1", timeout_s=600, env={})
    base["defaults"]["engine_args"] = {"max_model_len": 256}
    base["defaults"]["sweep"].update(batch_size=[1], repeats=1, rounds=1, **sweep)
    base["defaults"]["resources"] = {"cpus": "0-1", "memory": "2g"}
    return base


def snakemake(workdir: Path, name: str, body: dict, *extra: str, background: bool = False):
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(body))
    argv = ["snakemake", "--profile", str(ROOT / "profiles" / "slurm"), "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(workdir / f"{name}.yaml"),
            # No slurmdbd here: status from squeue, no account to guess.
            "--slurm-status-command", "squeue", "--slurm-no-account",
            "--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5", *extra]  # fmt: skip
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    return subprocess.run(argv, capture_output=True, text=True, env=ENV)


def podman_images(node: str) -> list[str]:
    return cluster("exec", node, "podman", "images", "--quiet", "--no-trunc").split()


def node_containers(node: str, workdir: Path) -> list[str]:
    argv = ["exec", node, "podman", "ps", "-a", "--quiet", "--filter", f"label=cellbench.origin={workdir}"]
    return cluster(*argv).split()


def provenance(workdir: Path, name: str) -> dict:
    return json.loads((cell_dirs(workdir)[name] / "provenance.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    cluster("up")
    for node in ("cb-node1", "cb-node2"):  # as fresh nodes: no image in their stores
        for image in podman_images(node):
            cluster("exec", node, "podman", "rmi", "--force", image, check=False)
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def two_cells(workdir):
    body = study("cluster", {"a": {}, "b": {"engine_args": {"max_model_len": 256, "n_batch": 256}}})
    done = snakemake(workdir, "two", body)
    assert done.returncode == 0, f"snakemake on the cluster failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return body


def test_cells_ran_on_both_nodes_from_the_image_archive(workdir, two_cells):
    hosts = {name: provenance(workdir, name)["host"]["hostname"] for name in ("a", "b")}
    assert sorted(hosts.values()) == ["cb-node1", "cb-node2"]
    for name in ("a", "b"):
        record = provenance(workdir, name)
        assert record["scheduler"]["SLURM_JOB_NODELIST"] == hosts[name]
        assert record["runtime"] == "podman"
        # Neither node had the image: each loaded the archive made after the build.
        assert record["image_source"] == f"loaded from {paths.image_archive('llamacpp')}"
    archive = workdir / paths.image_archive("llamacpp")
    saved = json.loads(paths.image_archive_record(archive).read_text())
    manifest = json.loads((workdir / paths.image_manifest("llamacpp")).read_text())
    assert saved["image_id"] == manifest["image_id"] and saved["bytes"] == archive.stat().st_size
    assert not (workdir / paths.image_archive("cpu")).exists()  # only what the cells run is saved
    for node in ("cb-node1", "cb-node2"):
        assert manifest["image_id"] in podman_images(node)
        assert node_containers(node, workdir) == []


def test_the_tables_match_a_one_node_run_of_the_same_study(workdir, two_cells, tmp_path):
    # The same study with docker on this machine: images and model as made for the cluster run
    # (mtimes kept, so nothing is rebuilt), the cells measured again.
    for sub in ("images", "models"):
        shutil.copytree(workdir / "results" / sub, tmp_path / "results" / sub, ignore=shutil.ignore_patterns("*.tar"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(two_cells))
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "study.yaml")]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k not in ("SLURM_CONF", "CELLBENCH_RUNTIME")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"one-node run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "rule build_image" not in done.stdout + done.stderr and "rule prepare_model" not in done.stdout + done.stderr
    cluster_rows = pd.read_parquet(workdir / paths.summary())
    local_rows = pd.read_parquet(tmp_path / paths.summary())
    assert list(cluster_rows.columns) == list(local_rows.columns)
    assert sorted(cluster_rows["cell_id"]) == sorted(local_rows["cell_id"])
    assert set(cluster_rows["status"]) == set(local_rows["status"]) == {"ok"}
    for table in ("summary.csv", "machines.csv"):
        cluster_table = pd.read_csv(workdir / paths.tables_dir() / table)
        local_table = pd.read_csv(tmp_path / paths.tables_dir() / table)
        assert list(cluster_table.columns) == list(local_table.columns), table
        assert len(cluster_table) == len(local_table), table


def test_a_gpu_cell_gets_the_gpu_slurm_gave_it(workdir, two_cells):
    # GPU 0 of cb-node2 is taken by another job: the cell's job must get GPU 1, and cellbench must
    # hand the container host GPU 1 (by its UUID), seen inside as device 0.
    holder = slurm("sbatch", "--parsable", "--gres=gpu:1", "--nodelist=cb-node2", "--mem=100M", "--cpus-per-task=1",
                   "--job-name=gpu-holder", "--output=/dev/null", "--wrap", "sleep 600").strip()  # fmt: skip
    try:
        body = study(
            "cluster-gpu", {"gpu": {"image": "fakecuda", "resources": {"cpus": "0", "memory": "1g", "gpus": 1}}}
        )
        done = snakemake(workdir, "gpu", body)
    finally:
        slurm("scancel", holder)
    assert done.returncode == 0, f"snakemake failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    record = provenance(workdir, "gpu")
    job = slurm("scontrol", "show", "job", "--details", record["scheduler"]["SLURM_JOB_ID"])
    assert "NodeList=cb-node2" in job and "TresPerJob=gres:gpu:1" in job
    assert record["scheduler"]["SLURM_STEP_GPUS"] == "1"  # the GPU Slurm gave the job's step
    argv = record["docker_run"]
    assert argv[argv.index("--device") + 1] == f"nvidia.com/gpu={FAKE_GPU_UUIDS[1]}"
    assert "CUDA_VISIBLE_DEVICES=0" in argv and FAKE_GPU_UUIDS[0] not in " ".join(argv)
    # No NVIDIA driver behind the fake devices: podman refuses the device, the cell is a failed row.
    rows = pd.read_parquet(cell_dirs(workdir)["gpu"] / "metrics.parquet")
    assert set(rows["status"]) == {"failed"}
    assert "unresolvable CDI devices" in (cell_dirs(workdir)["gpu"] / "engine.log").read_text()


def wait_for(what, predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_a_node_lost_mid_cell_fails_its_job_and_a_rerun_runs_only_that_cell(workdir, two_cells):
    # Two cells, one per node; the slurmd of the long one's node is killed after its first repeat.
    # Slurm marks the node DOWN and the job NODE_FAIL (no requeue, so the run shows the failure
    # instead of waiting Slurm's 2-minute requeue delay); the other cell finishes.
    long = {"sweep": {"batch_size": [1], "input_len": [16], "output_len": [64], "repeats": 100, "rounds": 1}}
    body = study("cluster-fault", {"lost": long, "kept": {"engine_args": {"max_model_len": 256, "n_batch": 256}}})
    run = snakemake(workdir, "fault", body, "--slurm-no-requeue", background=True)
    logs = workdir / "results" / "logs" / "cells"

    def first_repeat():
        for log in logs.glob("lost-*/round-1.log"):
            text = log.read_text()
            if "repeat 1/100" in text:
                return text.split(" on ", 1)[1].split(":", 1)[0]
        return None

    try:
        node = wait_for("the lost cell's first repeat", first_repeat, 300)
        cluster("kill-node", node)
        wait_for(f"{node} down", lambda: "down" in slurm("sinfo", "--noheader", "--nodes", node, "--format", "%t"), 120)
        # The node comes back; its slurmd ends what is left of the failed job.
        cluster("start-node", node)
        wait_for(f"{node} back", lambda: slurm("sinfo", "--noheader", "--nodes", node, "--format", "%t").strip()
                 in ("idle", "mix", "alloc"), 60)  # fmt: skip
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        cluster("start-node", "cb-node1")
        cluster("start-node", "cb-node2")
    assert run.returncode != 0 and "NODE_FAIL" in output, output[-4000:]
    # Back, the node's slurmd ended the failed job's runner: it removed its container and wrote
    # nothing, so no round folder (nor its run folder) of the lost cell is left.
    wait_for(f"no container on {node}", lambda: node_containers(node, workdir) == [] or None, 60)
    (log,) = logs.glob("lost-*/round-1.log")
    ended = "interrupted by SIGTERM; container removed, nothing written"
    wait_for("the lost runner's last line", lambda: ended in log.read_text(), 30)
    assert [p for p in (workdir / "results" / "cells").glob("lost-*/*")] == []
    kept = provenance(workdir, "kept")
    assert kept["status"] == "ok" and kept["host"]["hostname"] != node
    kept_mtime = (cell_dirs(workdir)["kept"] / "metrics.parquet").stat().st_mtime
    # A plain rerun runs the lost cell, and nothing else.
    rerun = snakemake(workdir, "fault", body)
    assert rerun.returncode == 0, f"rerun failed:\n{rerun.stdout[-3000:]}\n{rerun.stderr[-6000:]}"
    assert rerun.stdout.count("rule run_cell:") + rerun.stderr.count("rule run_cell:") == 1
    assert provenance(workdir, "lost")["status"] == "ok"
    assert (cell_dirs(workdir)["kept"] / "metrics.parquet").stat().st_mtime == kept_mtime
    # The failed job's own Snakemake (the job step's parent, reparented to init when its srun
    # failed) escapes proctrack/linuxproc, which follows process trees; a cluster with cgroups
    # ends it with the job. Here it would idle on until the machine stops (it ignores SIGTERM).
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--target-jobs run_cell:cell_id=lost-.*{workdir}"], check=False)
