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
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "CELLBENCH_MACHINE_ID": "bench"})
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
