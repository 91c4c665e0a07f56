#!/usr/bin/env python3
"""No-op rerun: a second `snakemake --cores 1` after a full run (nothing to do). Goal: <= 5 s.

usage: python3 benchmarks/noop_rerun.py WORKDIR [WORKDIR ...]
WORKDIR is a finished run (its study.yaml beside results/), e.g. the one cell_overhead.py
prints, or a study you ran; each is rerun three times and the median reported.
"""

import argparse
import statistics
from pathlib import Path

from studies import machine, snakemake

GOAL_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", type=Path, nargs="+")
    args = parser.parse_args()
    print(f"noop_rerun: {machine()}")
    for workdir in args.workdirs:
        snakemake(workdir)  # finishes anything left (e.g. the tables), so the next runs are no-ops
        cells = len(list((workdir / "results" / "cells").glob("*/metrics.parquet")))
        wall = statistics.median(snakemake(workdir) for _ in range(3))
        print(f"{workdir} ({cells} cells): second snakemake --cores 1 {wall:.1f} s "
              f"(goal <= {GOAL_S} s: {'met' if wall <= GOAL_S else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
