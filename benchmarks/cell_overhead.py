#!/usr/bin/env python3
"""Per-cell overhead: Snakemake's job wall time of run_cell minus the wall time of its container.

usage: python3 benchmarks/cell_overhead.py [--cells 10] [--workdir DIR] [--before ROOT]

The trivial cell is a real cell on the real path (Snakemake job -> `cellbench run-cell` ->
model checksum -> `docker run` of the CPU vLLM image -> bench_cell.py -> Parquet, provenance),
whose engine refuses its arguments at once: each cell has an engine arg vLLM does not know,
so the container imports vLLM, fails the constructor and exits; the cell is a `failed` row.
Its container time is subtracted, so what is left is what the pipeline adds per cell. Beside
it: a bare `docker run --rm IMAGE true`, the floor any container runtime costs, run half before
and half after the cells so that both see the same host. Goal, as a ratio measured in the same
run: the pipeline's time per cell beyond its container <= 1.5x the bare docker run. Also printed:
the import of the `cellbench` command alone (each cell pays it once), and with --before ROOT the
same import from another checkout (e.g. one exported with `git archive`). The image and model are
made first (reused if present); the commit and the host's load are printed with the figures.
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studies import ROOT, bytecode, commit, load, machine, snakemake, spread, study_with_cells, write_study

GOAL_RATIO = 1.5


def job_wall_s(workdir: Path, output: str) -> float:
    """Start to end of the Snakemake job that made `output`, from Snakemake's own metadata."""
    name = base64.urlsafe_b64encode(output.encode()).decode()
    record = json.loads((workdir / ".snakemake" / "metadata" / name).read_text())
    return record["endtime"] - record["starttime"]


def bare_docker_s(image: str, runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", image, "true"], check=True)
        walls.append(time.perf_counter() - started)
    return walls


def import_s(roots: list[Path], runs: int = 7) -> list[list[float]]:
    """Wall seconds of a Python process that imports the `cellbench` command, per checkout in
    `roots`, the checkouts in turn (so that the host's drift touches each alike)."""
    walls: list[list[float]] = [[] for _ in roots]
    for _ in range(runs):
        for root, into in zip(roots, walls, strict=True):
            env = {**os.environ, "PYTHONPATH": str(root / "workflow")}
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import cellbench.cli"], check=True, env=env)
            into.append(time.perf_counter() - started)
    return walls


def main() -> None:
    from cellbench import config  # this checkout's: studies put it first on the path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="reuse a working directory (default: a temporary one)")
    parser.add_argument("--before", type=Path, help="another checkout: its `import cellbench.cli` is timed too")
    args = parser.parse_args()
    print(f"cell_overhead: {machine()}; commit {commit()}; {load()} before; {bytecode()}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cellbench-overhead-"))
    study = study_with_cells(args.cells, timeout_s=300, sweep={"batch_size": [1], "repeats": 1, "warmup": 0})
    write_study(workdir, study)
    snakemake(workdir, "--until", "prepare_model")
    image = json.loads((workdir / "results" / "images" / "cpu.json").read_text())["image_id"]
    bare = bare_docker_s(image, (args.cells + 1) // 2)
    total = snakemake(workdir, "--until", "run_cell", "--forcerun", "run_cell")
    bare += bare_docker_s(image, args.cells // 2 or 1)
    overheads, containers = [], []
    cell_ids = sorted(config.resolve(study)["cells"])
    rounds = study["defaults"]["sweep"].get("rounds", 1)
    for cell_id in cell_ids:
        for k in range(1, rounds + 1):
            cell_dir = workdir / "results" / "cells" / cell_id / f"round-{k}"
            provenance = json.loads((cell_dir / "provenance.json").read_text())
            assert provenance["status"] == "failed", f"{cell_id}: the trivial cell should fail fast"
            rule = job_wall_s(workdir, f"results/cells/{cell_id}/round-{k}/metrics.parquet")
            overheads.append(rule - provenance["container_wall_s"])
            containers.append(provenance["container_wall_s"])
    imports = import_s([ROOT, *([args.before] if args.before else [])])
    print(f"{load()} after")
    median, bare_median = statistics.median(overheads), statistics.median(bare)
    ratio = median / bare_median
    print(f"{len(overheads)} trivial cell rounds, snakemake run {total:.1f} s; container (docker run, vLLM import) "
          f"{spread(containers)}")  # fmt: skip
    print(f"per-cell overhead (job wall - container wall): {spread(overheads)}")
    print(f"bare `docker run --rm IMAGE true`: {spread(bare)}")
    print(f"ratio {ratio:.2f}x (goal <= {GOAL_RATIO}x: "
          f"{'met' if ratio <= GOAL_RATIO else f'MISSED by {ratio / GOAL_RATIO:.2f}x'})")  # fmt: skip
    line = f"import cellbench.cli (each cell pays it once): {spread(imports[0])}"
    if args.before:
        line += f"; before ({args.before}), in turn with it: {spread(imports[1])}"
    print(line)
    print(f"working directory: {workdir}")


if __name__ == "__main__":
    main()
