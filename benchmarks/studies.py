"""Generated studies for the pipeline benchmarks: the default study with N cells in one group."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))


def study_with_cells(n: int, **defaults) -> dict:
    """n cells: one group whose axis is a distinct engine arg per cell."""
    study = copy.deepcopy(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    study["study"] = f"scale-{n}"
    study["defaults"].update(defaults)
    study["cells"] = [{"name": "c", "axes": {"engine_args.cellbench_index": list(range(n))}}]
    study["baseline"] = "c-cellbench_index-0"
    return study


def write_study(workdir: Path, study: dict) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def snakemake(workdir: Path, *args: str, snakefile: Path = ROOT / "Snakefile", check: bool = True) -> float:
    """Run snakemake on the study in `workdir`; return its wall seconds."""
    argv = ["snakemake", "--cores", "1", "--snakefile", str(snakefile), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml"), *args]  # fmt: skip
    started = time.perf_counter()
    # This checkout's cellbench in the rules' commands, not whichever one is installed.
    env = {**os.environ, "CELLBENCH_MACHINE_ID": "bench", "PYTHONPATH": str(snakefile.parent / "workflow")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if check and done.returncode:
        raise SystemExit(f"snakemake failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, {time.strftime('%Y-%m-%d')}"


def commit() -> str:
    """The commit measured (short hash, `+dirty` when the worktree has uncommitted changes)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def bytecode() -> str:
    """How many of cellbench's modules have a current .pyc (scripts/setup.sh compiles them): where
    PYTHONDONTWRITEBYTECODE is set, a module without one is compiled again by every process."""
    import importlib.util

    sources = sorted((ROOT / "workflow" / "cellbench").glob("*.py"))
    current = 0
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        header = cached.read_bytes()[:16] if cached.is_file() else b""
        stat = source.stat()  # a .pyc is current when its header holds the source's mtime and size (PEP 552)
        current += header[4:8] == b"\0\0\0\0" and header[8:16] == (
            int(stat.st_mtime).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
        )
    return f"cellbench byte-compiled: {current} of {len(sources)} modules"


def load() -> str:
    """The host's load averages (1, 5, 15 min) and its CPU count: figures from a busy host move."""
    return f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])} on {os.cpu_count()} CPUs"


def spread(values: list[float], unit: str = "s") -> str:
    """median (min-max, n) of repeated measurements."""
    return f"{median(values):.2f} {unit} ({min(values):.2f}-{max(values):.2f}, n={len(values)})"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def timed_child(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float, str]:
    """Run a command; (wall seconds, its peak resident memory in MB, its stdout). The peak is the
    child's own (wait4 reaps it with its rusage), not the largest of every child so far."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(argv[:4])} ... failed ({child.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()
