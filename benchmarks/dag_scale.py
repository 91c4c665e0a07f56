#!/usr/bin/env python3
"""DAG scale: `snakemake -n` of the real Snakefile against Snakemake's own dry run of a trivial
workflow with the same number of jobs, side by side in one run.

usage: python3 benchmarks/dag_scale.py [--sizes 1000 10000] [--repeats 1] [--before SNAKEFILE]
                                       [--profile N]

For each size: a generated study of N cells (the default study's settings, one group whose axis
is a distinct engine arg per cell, so N cells x its rounds run_cell jobs), dry-run with the
Snakefile; then a generated workflow of one rule with as many jobs, each writing one file, and
`all` gathering them (the least a workflow of that many jobs can be). Both print their jobs as a
dry run does (to /dev/null here). --before SNAKEFILE times another checkout's Snakefile on the
same studies (e.g. one exported with `git archive`), for before/after in one run. Goal: at
10,000 cells <= 1.5x the trivial workflow. --profile N writes cProfile of the real dry run at N
cells and prints its top entries. The commit and the host's load are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studies import ROOT, commit, load, machine, median, spread, study_with_cells, write_study

GOAL = 1.5
TRIVIAL = """N = int(config["jobs"]) - 1


rule all:
    input:
        expand("t/{i}.txt", i=range(N)),


rule one:
    output:
        "t/{i}.txt",
    shell:
        "touch {output}"
"""


def dry_run(workdir: Path, snakefile: Path, *extra: str, profile: Path | None = None) -> tuple[float, str]:
    """Wall seconds of `snakemake -n` (its job listing discarded) and its last lines (job stats)."""
    argv = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile", str(snakefile),
            "--directory", str(workdir), *extra]  # fmt: skip
    if profile:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
    env = {**os.environ, "CELLBENCH_MACHINE_ID": "bench", "PYTHONPATH": str(snakefile.parent / "workflow")}
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"snakemake -n failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return wall, done.stdout[-2000:]


def jobs_of(tail: str) -> int:
    return int(re.search(r"^total\s+(\d+)", tail, re.MULTILINE).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--snakefile", type=Path, default=ROOT / "Snakefile")
    parser.add_argument("--before", type=Path, help="another checkout's Snakefile, timed on the same studies")
    parser.add_argument("--profile", type=int, help="cProfile the real dry run at this many cells")
    args = parser.parse_args()
    print(f"dag_scale: {machine()}; commit {commit()}; {load()} before")
    with tempfile.TemporaryDirectory(prefix="cellbench-dag-") as tmp:
        tmp = Path(tmp)
        trivial = tmp / "trivial" / "Snakefile"
        trivial.parent.mkdir()
        trivial.write_text(TRIVIAL)
        for n in args.sizes:
            study = tmp / f"study-{n}"
            write_study(study, study_with_cells(n))
            runs: dict[str, list[float]] = {"real": [], "trivial": [], "before": []}
            jobs = None
            for _ in range(args.repeats):  # in turn, so that the host's drift touches every one
                wall, tail = dry_run(study, args.snakefile, "--configfile", str(study / "study.yaml"))
                runs["real"].append(wall)
                jobs = jobs_of(tail)
                out = tmp / f"trivial-{n}"
                out.mkdir(exist_ok=True)
                wall, tail = dry_run(out, trivial, "--config", f"jobs={jobs}")
                assert jobs_of(tail) == jobs, tail
                runs["trivial"].append(wall)
                if args.before:
                    runs["before"].append(dry_run(study, args.before, "--configfile", str(study / "study.yaml"))[0])
            ratio = median(runs["real"]) / median(runs["trivial"])
            verdict = "met" if ratio <= GOAL else f"MISSED by {ratio / GOAL:.2f}x"
            print(f"{n:>6} cells, {jobs:,} jobs: snakemake -n {spread(runs['real'])}; trivial workflow "
                  f"{spread(runs['trivial'])}; ratio {ratio:.2f}x (goal <= {GOAL}x at 10,000: {verdict})")  # fmt: skip
            if runs["before"]:
                print(f"{'':>6}        before ({args.before}): {spread(runs['before'])}, "
                      f"{median(runs['before']) / median(runs['trivial']):.2f}x the trivial workflow")  # fmt: skip
        print(f"{load()} after")
        if args.profile:
            study = tmp / f"study-{args.profile}"
            write_study(study, study_with_cells(args.profile))
            profile = tmp / "dag.prof"
            wall, _ = dry_run(study, args.snakefile, "--configfile", str(study / "study.yaml"), profile=profile)
            print(f"cProfile of snakemake -n at {args.profile} cells ({wall:.1f} s profiled), top by own time:")
            pstats.Stats(str(profile), stream=sys.stdout).sort_stats("tottime").print_stats(20)
            print("top by cumulative time:")
            pstats.Stats(str(profile), stream=sys.stdout).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
