"""Host-side provenance: machine id, project git sha, host facts. Secrets never leave here."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import subprocess
from pathlib import Path

from . import paths
from .config import MACHINE_ID_ENV, check_machine_id
from .contract import is_secret_name


def _cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor()


def machine_id(override: str | None = None) -> str:
    """Stable per machine: the config's or CELLBENCH_MACHINE_ID if given, else host name plus a
    short hash of /etc/machine-id, CPU model, core count and memory (hardware and host facts)."""
    if override:
        return override
    chosen = os.environ.get(MACHINE_ID_ENV)
    if chosen:
        return check_machine_id(chosen, MACHINE_ID_ENV)  # ConfigError: one line naming the variable
    try:
        host_key = Path("/etc/machine-id").read_text().strip()
    except OSError:
        host_key = socket.gethostname()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    facts = f"{host_key}|{_cpu_model()}|{os.cpu_count()}|{memory}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname())[:24].lstrip(".-") or "host"
    return f"{name}-{hashlib.sha256(facts.encode()).hexdigest()[:8]}"


def git_sha() -> str | None:
    """The project's commit, with '-dirty' when the work tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(paths.PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(paths.PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def host_facts() -> dict:
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def scheduler_facts(environ: dict[str, str] | None = None) -> dict:
    """The batch job a cell ran in (Slurm's variables), empty when it ran outside one. The GPUs
    are the step's where there is one: Snakemake's job step runs the cell under its own `srun`,
    which drops the job's SLURM_JOB_GPUS and sets SLURM_STEP_GPUS."""
    environ = os.environ if environ is None else environ
    names = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME", "SLURM_CPUS_PER_TASK",
             "SLURM_MEM_PER_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")  # fmt: skip
    return {name: environ[name] for name in names if name in environ}


def scrub(value):
    """Drop every mapping entry whose key looks like a secret, recursively."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not is_secret_name(str(k))}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
