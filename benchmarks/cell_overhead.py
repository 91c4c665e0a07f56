#!/usr/bin/env python3
"""Per-cell overhead: Snakemake's job wall time of run_cell minus the wall time of its container.

usage: python3 benchmarks/cell_overhead.py [--cells 10] [--workdir DIR]

The trivial cell is a real cell on the real path (Snakemake job -> `cellbench run-cell` ->
model checksum -> `docker run` of the CPU vLLM image -> bench_cell.py -> Parquet, provenance),
whose engine refuses its arguments at once: each cell has an engine arg vLLM does not know,
so the container imports vLLM, fails the constructor and exits; the cell is a `failed` row.
Its container time is subtracted, so what is left is what the pipeline adds per cell. Beside
it: a bare `docker run --rm IMAGE true`, the floor any container runtime costs. Goal: <= 0.5 s
beyond the bare docker run. The image and model are made first (reused if present).
"""

import argparse
import base64
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cellbench import config
from studies import machine, snakemake, study_with_cells, write_study

GOAL_S = 0.5


def job_wall_s(workdir: Path, output: str) -> float:
    """Start to end of the Snakemake job that made `output`, from Snakemake's own metadata."""
    name = base64.urlsafe_b64encode(output.encode()).decode()
    record = json.loads((workdir / ".snakemake" / "metadata" / name).read_text())
    return record["endtime"] - record["starttime"]


def bare_docker_s(image: str, runs: int) -> float:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", "--network", "none", image, "true"], check=True)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="reuse a working directory (default: a temporary one)")
    args = parser.parse_args()
    print(f"cell_overhead: {machine()}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cellbench-overhead-"))
    study = study_with_cells(args.cells, timeout_s=300, sweep={"batch_size": [1], "repeats": 1, "warmup": 0})
    write_study(workdir, study)
    snakemake(workdir, "--until", "prepare_model")
    total = snakemake(workdir, "--until", "run_cell", "--forcerun", "run_cell")
    overheads, containers = [], []
    cell_ids = sorted(config.resolve(study)["cells"])
    for cell_dir in (workdir / "results" / "cells" / cell_id for cell_id in cell_ids):
        provenance = json.loads((cell_dir / "round-1" / "provenance.json").read_text())
        assert provenance["status"] == "failed", f"{cell_dir.name}: the trivial cell should fail fast"
        rule = job_wall_s(workdir, f"results/cells/{cell_dir.name}/round-1/metrics.parquet")
        overheads.append(rule - provenance["container_wall_s"])
        containers.append(provenance["container_wall_s"])
    image = json.loads((workdir / "results" / "images" / "cpu.json").read_text())["image_id"]
    bare = bare_docker_s(image, args.cells)
    median = statistics.median(overheads)
    print(f"{len(overheads)} trivial cells, snakemake run {total:.1f} s; container (docker run, vLLM import) "
          f"median {statistics.median(containers):.1f} s")  # fmt: skip
    print(f"per-cell overhead (job wall - container wall): median {median:.2f} s, "
          f"min {min(overheads):.2f} s, max {max(overheads):.2f} s "
          f"(goal <= {GOAL_S} s: {'met' if median <= GOAL_S else 'MISSED'})")  # fmt: skip
    print(f"bare `docker run --rm IMAGE true`: median {bare:.2f} s (included in the container wall above)")
    print(f"working directory: {workdir}")


if __name__ == "__main__":
    main()
