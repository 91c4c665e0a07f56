"""Injected faults, end to end in real containers: nothing lost, nothing left running, nothing half.

One working directory goes through every fault in turn (image and model are prepared once):

A. cells that fail by themselves, in one run: an engine that raises at load, an out-of-memory
   container, a cell timeout, and a container killed from outside mid-point. Each is rows with a
   status and a one-line error; measured repeats survive the kill.
B. faults outside any cell, each against the one cell still missing (`late`): the Docker daemon
   gone, a corrupted model file, a full results volume, Ctrl-C to the process group, Snakemake
   killed with SIGKILL, then SIGTERM. Each leaves results/ exactly as it was (or, for SIGTERM,
   with the running cell finished) and a plan that reruns that one cell only.

Through all of it a planted token sits in the environment; no file under the directory holds it,
and no container with this directory's origin label is left.
"""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
from cellbench import config, lifecycle  # noqa: E402

pytestmark = pytest.mark.e2e

TOKENS = {
    "HF_TOKEN": "hf_" + secrets.token_hex(16),
    "MY_SERVICE_API_KEY": secrets.token_hex(16),
    "DB_SECRET": secrets.token_hex(16),
}
ENV = {**os.environ, **TOKENS, "CELLBENCH_MACHINE_ID": "fault-machine"}


def study() -> dict:
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    sweep = {"batch_size": [1], "input_len": [16], "output_len": [8], "repeats": 1, "warmup": 1, "seed": 0}
    base.update(study="faults", baseline="late")
    base["defaults"].update(
        engine_args={"enforce_eager": True, "max_model_len": 512}, sweep=sweep, timeout_s=600, quality=False
    )
    base["cells"] = [
        {"name": "late", "dtype": "bfloat16"},
        # vLLM refuses a context longer than the model's 8192 positions while it loads.
        {"name": "crash", "dtype": "bfloat16", "engine_args": {"max_model_len": 100000}},
        {"name": "oom", "dtype": "bfloat16", "resources": {"memory": "600m"}},
        {"name": "slow", "dtype": "bfloat16", "timeout_s": 10},
        # Long enough points that the test can kill the container between two repeats; more repeats
        # than it waits for, so a slow `docker kill` (a minute on a busy daemon, once) still lands.
        {"name": "killed", "dtype": "bfloat16", "sweep": {**sweep, "output_len": [256], "repeats": 12}},
    ]
    return base


def run(workdir: Path, *args: str, env=None, check=False) -> subprocess.CompletedProcess:
    # Targets and flags first: --configfile takes every word after it.
    argv = ["snakemake", *args, "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env or ENV)
    if check and done.returncode:
        raise AssertionError(f"snakemake failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def start(workdir: Path, env=None) -> subprocess.Popen:
    """Snakemake in its own process group, like a job started from a terminal."""
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml")]  # fmt: skip
    return subprocess.Popen(
        argv, env=env or ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def origin_containers(workdir: Path, cell_id: str | None = None) -> list[str]:
    argv = ["docker", "ps", "-a", "--quiet", "--filter", f"label=cellbench.origin={workdir}"]
    if cell_id:
        argv += ["--filter", f"label=cellbench.cell={cell_id}"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


def wait_for(predicate, what: str, limit_s: float = 600, process: subprocess.Popen | None = None):
    deadline = time.time() + limit_s
    while not (found := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, f"snakemake exited before {what}:\n{process.stdout.read()}"
        time.sleep(0.5)
    return found


def snapshot(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file under results/ (logs aside: a failed job's log is the point) with size and mtime."""
    files = {}
    for path in sorted((workdir / "results").rglob("*")):
        rel = str(path.relative_to(workdir))
        if path.is_file() and not rel.startswith("results/logs/"):
            files[rel] = (path.stat().st_size, path.stat().st_mtime_ns)
    return files


def planned_cells(workdir: Path) -> int:
    done = run(workdir, "--dry-run")
    match = re.search(r"^run_cell\s+(\d+)$", done.stdout, re.MULTILINE)
    return int(match.group(1)) if match else 0


def cell_log(workdir: Path, cell_id: str) -> str:
    return (workdir / "results" / "logs" / "cells" / cell_id / "round-1.log").read_text()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    (workdir / "study.yaml").write_text(yaml.safe_dump(study()))
    ids = {cell["name"]: cell_id for cell_id, cell in config.resolve(study())["cells"].items()}
    run(workdir, "--until", "prepare_model", check=True)
    yield workdir, ids
    assert origin_containers(workdir) == [], "a container outlived the fault tests"


@pytest.fixture(scope="module")
def cell_faults(lab):
    """Run A: crash, oom, slow and killed; the test kills `killed` after its first measured repeat."""
    workdir, ids = lab
    targets = [f"results/cells/{ids[name]}/round-1/metrics.parquet" for name in ("crash", "oom", "slow", "killed")]
    killed = {}

    def killer():
        raw = lambda: next((workdir / "results" / "cells" / ids["killed"]).glob(".run-*/raw.json"), None)  # noqa: E731
        measured = lambda: (path := raw()) and len(json.loads(path.read_text() or "{}").get("points", [])) >= 1  # noqa: E731
        try:
            wait_for(lambda: _quietly(measured), "a measured repeat of the killed cell", limit_s=1200)
        except AssertionError as exc:
            killed["error"] = str(exc)
            return
        killed["ids"] = origin_containers(workdir, ids["killed"])
        begin = time.time()
        done = subprocess.run(["docker", "kill", *killed["ids"]], capture_output=True, text=True, check=False)
        killed["kill"] = f"docker kill: exit {done.returncode} after {time.time() - begin:.1f} s {done.stderr.strip()}"

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    done = run(workdir, *targets)
    thread.join(timeout=5)
    return workdir, ids, done, killed


def _quietly(predicate):
    try:
        return predicate()
    except (OSError, ValueError):
        return False  # raw.json is replaced atomically, but the run directory may vanish


def rows(workdir: Path, cell_id: str) -> pd.DataFrame:
    return pd.read_parquet(workdir / "results" / "cells" / cell_id / "round-1" / "metrics.parquet")


def test_cell_failures_are_rows_with_one_line_errors(cell_faults):
    workdir, ids, done, killed = cell_faults
    assert done.returncode == 0, done.stderr[-3000:]  # a cell's failure is data, not a failed pipeline
    crash, oom, slow = rows(workdir, ids["crash"]), rows(workdir, ids["oom"]), rows(workdir, ids["slow"])
    assert set(crash["status"]) == {"failed"} and "max_model_len" in crash["error"].iloc[0]
    assert set(oom["status"]) == {"failed"}
    assert re.search(r"out of memory|exit 137", oom["error"].iloc[0]), oom["error"].iloc[0]
    assert set(slow["status"]) == {"timeout"} and "timeout of 10 s" in slow["error"].iloc[0]
    for frame in (crash, oom, slow):
        assert "\n" not in frame["error"].iloc[0]
    for name in ("crash", "oom", "slow", "killed"):
        record = json.loads((workdir / "results" / "cells" / ids[name] / "round-1" / "provenance.json").read_text())
        assert record["status"] != "ok" and record["error"]


def test_a_killed_container_keeps_what_it_measured(cell_faults):
    workdir, ids, _, killed = cell_faults
    assert "error" not in killed, killed.get("error")
    assert len(killed["ids"]) == 1
    frame = rows(workdir, ids["killed"])
    measured, lost = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    assert len(measured) >= 1 and (measured["output_tokens"] == 256).all()  # the repeats done before the kill
    assert len(lost) >= 1 and lost["error"].str.contains("exit 137").all(), (killed["kill"], len(measured))


def test_after_cell_faults_nothing_is_left(cell_faults):
    workdir, ids, _, _ = cell_faults
    assert origin_containers(workdir) == []
    assert not [p for p in (workdir / "results").rglob(".*") if p.name != ".snakemake"]
    assert planned_cells(workdir) == 1  # only `late`: failures are data and are not rerun


@pytest.fixture(scope="module")
def outside_faults(cell_faults):
    """Faults outside any cell, one after another; each must leave results/ as it found it."""
    workdir, ids, _, _ = cell_faults
    late = ids["late"]
    seen = {}

    def unchanged(name, done_or_code, message=None):
        code = done_or_code if isinstance(done_or_code, int) else done_or_code.returncode
        text = cell_log(workdir, late) if (workdir / "results/logs/cells" / late / "round-1.log").exists() else ""
        seen[name] = {
            "code": code,
            "same": snapshot(workdir) == before,
            "containers": origin_containers(workdir),
            "planned": planned_cells(workdir),
            "log": text,
            "message": message is None or message in text,
        }

    before = snapshot(workdir)

    # The Docker daemon is gone.
    unchanged("daemon", run(workdir, env={**ENV, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}), "not reachable")

    # A model file corrupted after preparation: one byte flipped, then put back.
    weights = workdir / "results" / "models" / "smollm2-135m" / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    done = run(workdir)
    with open(weights, "r+b") as handle:
        handle.seek(4096)
        handle.write(byte)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    unchanged("corrupt", done, "does not match its manifest checksum")

    # The results volume is full: the cell's directory is a 1 MiB tmpfs, filled before the run.
    if os.geteuid() == 0 and shutil.which("mount"):
        cell_dir = workdir / "results" / "cells" / late
        cell_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cell_dir)], check=True)
        try:
            subprocess.run(["dd", "if=/dev/zero", f"of={cell_dir}/filler", "bs=64k"], capture_output=True)
            before_full = snapshot(workdir)
            done = run(workdir)
            seen["full_leftovers"] = sorted(p.name for p in cell_dir.iterdir() if p.name != "filler")
            assert snapshot(workdir) == before_full
        finally:
            subprocess.run(["umount", str(cell_dir)], check=True)
        unchanged("disk_full", done, "no space left")

    # Leftovers of dead runners: one here (removed on start), one live (kept), one of another origin.
    planted = {
        "dead_here": plant(workdir, workdir, dead_runner_label()),
        "live_here": plant(workdir, workdir, lifecycle.runner_label()),
        "dead_elsewhere": plant(workdir, workdir.parent / "elsewhere", dead_runner_label()),
    }

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, mid engine load.
    process = start(workdir)
    wait_for(lambda: origin_containers(workdir, late), "the late cell's container", process=process)
    seen["onstart"] = {name: exists(cid) for name, cid in planted.items()}
    for cid in planted.values():
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)
    unchanged("sigint", process.wait(timeout=120))

    # Snakemake killed outright (Slurm after its grace period, the OOM killer): the runner notices.
    process = start(workdir)
    wait_for(lambda: origin_containers(workdir, late), "the late cell's container", process=process)
    time.sleep(2)
    process.kill()
    process.wait(timeout=30)
    wait_for(lambda: not origin_containers(workdir, late), "the runner to remove its container", limit_s=60)
    wait_for(lambda: not list((workdir / "results" / "cells").glob("*/.run-*")), "the run directory to go", 60)
    unchanged("sigkill", -9)
    run(workdir, "--unlock", check=True)  # a killed Snakemake leaves its lock; the README says so

    # SIGTERM: Snakemake lets the running cell finish, starts nothing more, and exits.
    process = start(workdir)
    wait_for(lambda: origin_containers(workdir, late), "the late cell's container", process=process)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    seen["sigterm_code"] = process.wait(timeout=1200)
    seen["sigterm_output"] = process.stdout.read()
    seen["after_sigterm_planned"] = planned_cells(workdir)
    return workdir, ids, seen


def dead_runner_label() -> str:
    child = subprocess.Popen(["true"])
    label = lifecycle.runner_label(child.pid)
    child.wait()
    return label


def plant(workdir: Path, origin: Path, runner: str) -> str:
    """A container that looks like a cell's (labels and all), sleeping, on the study's image."""
    image = json.loads((workdir / "results" / "images" / "cpu.json").read_text())["image_id"]
    argv = ["docker", "run", "-d", "--network", "none", "--label", "cellbench.cell=planted-0000000000",
            "--label", f"cellbench.origin={origin}", "--label", f"{lifecycle.LABEL_RUNNER}={runner}",
            image, "sleep", "600"]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def exists(container_id: str) -> bool:
    return subprocess.run(["docker", "inspect", container_id], capture_output=True).returncode == 0


@pytest.mark.parametrize("fault", ["daemon", "corrupt", "disk_full", "sigint", "sigkill"])
def test_outside_fault_changes_nothing(outside_faults, fault):
    _, _, seen = outside_faults
    if fault not in seen:
        pytest.skip("mounting a tmpfs needs root")
    result = seen[fault]
    assert result["code"] != 0
    assert result["same"], "results/ changed"
    assert result["containers"] == []
    assert result["planned"] == 1, "a rerun would not redo exactly the missing cell"
    assert result["message"], result["log"][-2000:]


def test_fault_messages_are_one_line(outside_faults):
    _, _, seen = outside_faults
    for fault in ("daemon", "corrupt", "disk_full"):
        if fault in seen:
            lines = [line for line in seen[fault]["log"].splitlines() if line.startswith("cellbench:")]
            assert len(lines) == 1 and "Traceback" not in seen[fault]["log"], seen[fault]["log"]
    assert seen.get("full_leftovers", []) == []


def test_start_removes_only_dead_runs_of_this_directory(outside_faults):
    _, _, seen = outside_faults
    assert seen["onstart"] == {"dead_here": False, "live_here": True, "dead_elsewhere": True}


def test_sigterm_finishes_the_running_cell_then_a_plain_rerun_finishes_the_study(outside_faults):
    workdir, ids, seen = outside_faults
    late = rows(workdir, ids["late"])
    assert set(late["status"]) == {"ok"}, late["error"].tolist()
    assert seen["after_sigterm_planned"] == 0
    provenances = {
        n: json.loads((workdir / "results/cells" / i / "round-1" / "provenance.json").read_text())
        for n, i in ids.items()
    }
    run(workdir, check=True)  # only the tables are missing
    again = {
        n: json.loads((workdir / "results/cells" / i / "round-1" / "provenance.json").read_text())
        for n, i in ids.items()
    }
    assert {n: p["run_id"] for n, p in again.items()} == {n: p["run_id"] for n, p in provenances.items()}
    summary = pd.read_parquet(workdir / "results" / "summary.parquet")
    assert set(summary["cell_name"]) == set(ids)


def run_id_of(workdir: Path, cell_id: str) -> str:
    return json.loads((workdir / "results" / "cells" / cell_id / "round-1" / "provenance.json").read_text())["run_id"]


def test_engine_runs_unprivileged_without_network(outside_faults):
    workdir, ids, _ = outside_faults
    record = json.loads((workdir / "results/cells" / ids["late"] / "round-1" / "provenance.json").read_text())
    argv = record["docker_run"]
    assert argv[argv.index("--user") + 1] == "65534:65534"
    assert argv[argv.index("--network") + 1] == "none" and "--privileged" not in argv
    assert any(arg.endswith(":/model:ro") for arg in argv)
    assert argv[argv.index("--cap-drop") + 1] == "ALL"


def test_tokens_reach_the_container_by_name_and_no_file(outside_faults):
    workdir, ids, _ = outside_faults
    record = json.loads((workdir / "results/cells" / ids["late"] / "round-1" / "provenance.json").read_text())
    argv = record["docker_run"]
    assert "HF_TOKEN" in [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "-e"]
    leaks = []
    for path in workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            leaks += [f"{path}: {name}" for name, value in TOKENS.items() if value.encode() in data]
    assert leaks == []


def test_clean_containers_removes_leftovers_of_one_origin_only(lab, tmp_path):
    workdir, _ = lab
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    planted = [
        plant(workdir, here, dead_runner_label()),
        plant(workdir, here, lifecycle.runner_label()),
        plant(workdir, elsewhere, dead_runner_label()),
    ]
    try:
        argv = ["cellbench", "clean", "--containers", "--origin", str(here)]
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV)
        assert done.returncode == 0, done.stderr
        assert [exists(c) for c in planted] == [False, True, True]
        assert "1 leftover container(s)" in done.stderr
        done = subprocess.run(["cellbench", "clean", "--containers", "--origin", str(elsewhere)], env=ENV)
        assert [exists(c) for c in planted] == [False, True, False]
    finally:
        for cid in planted:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def test_clean_without_a_daemon_says_so_in_one_line():
    env = {**ENV, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    done = subprocess.run(["cellbench", "clean", "--containers"], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "not reachable" in done.stderr
