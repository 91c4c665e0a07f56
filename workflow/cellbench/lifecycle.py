"""Who owns a cell's container, whether its owner still lives, and cleaning up after the dead.

Every cell container carries a `cellbench.runner` label `<host>:<boot id>:<pid>:<start ticks>`
naming the runner process on the host that started it, and the round's run directory a file
`runner` with the same. A container or run directory is a leftover when that process no longer
exists on this host (the pid is gone, reused by another process, or the host rebooted). Those of
runners on other hosts are never judged from here.

The runner also watches the pipeline that started it: Snakemake does not pass SIGTERM on to its
jobs, so a runner whose Snakemake died stops by itself instead of measuring for nobody.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

from . import paths
from .containers import LABEL_CELL, LABEL_ORIGIN

LABEL_RUNNER = "cellbench.runner"
RUN_OWNER = "runner"  # in a round's run directory: the runner_label of the process running it


class RuntimeUnavailable(RuntimeError):
    """The container runtime does not answer: an infrastructure fault, not a cell's failure."""


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def start_ticks(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after it are space-separated.
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, ticks: str | None) -> bool:
    return ticks is not None and start_ticks(pid) == ticks


def runner_label(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{boot_id()}:{pid}:{start_ticks(pid)}"


def runner_is_gone(label: str | None, host: str, boot: str, alive=process_alive) -> bool | None:
    """True if the runner named by `label` is gone, False if it lives, None if it cannot be judged
    from here (a runner on another host, or a container from before the label existed)."""
    if not label:
        return None
    try:
        label_host, label_boot, pid, ticks = label.rsplit(":", 3)
        pid_number = int(pid)
    except ValueError:
        return True
    if label_host != host:
        return None
    if label_boot != boot:
        return True
    return not alive(pid_number, ticks)


def ensure_runtime(runtime: str = "docker") -> None:
    """Raise RuntimeUnavailable with one line when the daemon does not answer."""
    try:
        done = subprocess.run([runtime, "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeUnavailable(f"{runtime} does not answer ({exc}); start the daemon and rerun") from None
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        where = os.environ.get("DOCKER_HOST", "the default socket")
        reason = lines[-1].strip() if lines else f"exit {done.returncode}"
        raise RuntimeUnavailable(f"{runtime} daemon not reachable at {where}: {reason}; start it and rerun")


def list_containers(runtime: str = "docker", origin: str | None = None) -> list[dict]:
    """Containers of cell runs (running or not): id, name, state and labels."""
    argv = [runtime, "ps", "-a", "--quiet", "--no-trunc", "--filter", f"label={LABEL_CELL}"]
    if origin:
        argv += ["--filter", f"label={LABEL_ORIGIN}={os.path.abspath(origin)}"]
    ids = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    if not ids:
        return []
    done = subprocess.run([runtime, "inspect", *ids], capture_output=True, text=True)
    # A container may vanish between ps and inspect (its --rm finished): inspect still prints the rest.
    found = json.loads(done.stdout or "[]")
    return [
        {
            "id": item["Id"],
            "name": item["Name"].lstrip("/"),
            "state": item["State"]["Status"],
            "labels": item["Config"].get("Labels") or {},
        }
        for item in found
    ]


def leftovers(containers: list[dict], host: str, boot: str, alive=process_alive) -> list[dict]:
    """The containers whose runner is gone (pure, given `alive`). One without a runner label is a
    leftover once it stopped (its --rm did not happen); a running one may belong to a live run."""
    stale = []
    for container in containers:
        label = container["labels"].get(LABEL_RUNNER)
        gone = runner_is_gone(label, host, boot, alive)
        if gone or (not label and container["state"] != "running"):
            stale.append(container)
    return stale


def remove_leftovers(runtime: str = "docker", origin: str | None = None) -> list[dict]:
    """Remove leftover cell containers (of one origin, or of every origin); return what was removed."""
    stale = leftovers(list_containers(runtime, origin), socket.gethostname(), boot_id())
    for container in stale:
        subprocess.run([runtime, "rm", "-f", container["id"]], capture_output=True, check=False)
    return stale


def pipeline_pid(pid: int | None = None) -> int:
    """The Snakemake process this runner works for (nearest ancestor running snakemake), else the
    parent. A job's parent is usually a shell between the two, which outlives a killed Snakemake."""
    current = pid or os.getpid()
    parent = os.getppid() if pid is None else parent_of(current)
    ancestor = parent
    while ancestor and ancestor > 1:
        try:
            argv = Path(f"/proc/{ancestor}/cmdline").read_bytes().split(b"\0")
        except OSError:
            break
        if any(os.path.basename(arg.decode(errors="replace")) == "snakemake" for arg in argv[:3] if arg):
            return ancestor
        ancestor = parent_of(ancestor)
    return parent


def parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def stale_run_dirs(results: Path, host: str, boot: str, alive=process_alive) -> list[Path]:
    """Run directories whose runner is gone (pure, given `alive`). A runner removes its own when
    the round ends, even when stopped by SIGTERM; one killed by SIGKILL, or on a node that was
    lost, cannot. A live runner's, another host's, or one without its owner file yet is kept."""
    stale = []
    for work in paths.run_dirs(results):
        try:
            label = (work / RUN_OWNER).read_text()
        except OSError:
            continue
        if runner_is_gone(label.strip(), host, boot, alive):
            stale.append(work)
    return stale


def remove_stale_run_dirs(results: Path) -> list[Path]:
    stale = stale_run_dirs(results, socket.gethostname(), boot_id())
    for work in stale:
        shutil.rmtree(work, ignore_errors=True)
    return stale


def clean_on_start(origin: str, runtime: str = "docker") -> None:
    """Pipeline start: remove the containers and run directories this working directory's dead
    runs left behind. Without a daemon there are no containers to clean, and jobs that need one
    say so themselves."""
    removed_dirs = remove_stale_run_dirs(Path(origin) / paths.RESULTS)
    if removed_dirs:
        shown = ", ".join(str(work) for work in removed_dirs[:3]) + (", ..." if len(removed_dirs) > 3 else "")
        print(f"cellbench: removed {len(removed_dirs)} run folder(s) of killed runners: {shown}")
    try:
        ensure_runtime(runtime)
    except RuntimeUnavailable:
        return
    removed = remove_leftovers(runtime, origin)
    if removed:
        names = ", ".join(c["name"] for c in removed)
        print(f"cellbench: removed {len(removed)} leftover container(s) of earlier runs here: {names}")
