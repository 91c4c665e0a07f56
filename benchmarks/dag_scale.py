#!/usr/bin/env python3
"""DAG scale: `snakemake -n` wall time on generated studies of 100, 1,000 and 10,000 cells.

usage: python3 benchmarks/dag_scale.py [--sizes 100 1000 10000] [--snakefile PATH]
Goal: <= 10 s at 1,000 cells. Pass another checkout's Snakefile to compare before/after.
"""

import argparse
import tempfile
from pathlib import Path

from studies import ROOT, machine, snakemake, study_with_cells, write_study

GOAL_1000_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--snakefile", type=Path, default=ROOT / "Snakefile")
    args = parser.parse_args()
    print(f"dag_scale: {machine()}; snakefile {args.snakefile}")
    previous = None
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cellbench-dag-") as tmp:
            write_study(Path(tmp), study_with_cells(n))
            wall = snakemake(Path(tmp), "-n", snakefile=args.snakefile)
        growth = "" if previous is None else f"  ({wall / previous[1]:.1f}x for {n / previous[0]:.0f}x cells)"
        goal = f"  goal <= {GOAL_1000_S} s: {'met' if wall <= GOAL_1000_S else 'MISSED'}" if n == 1000 else ""
        print(f"{n:>6} cells: snakemake -n {wall:6.1f} s{growth}{goal}")
        previous = (n, wall)


if __name__ == "__main__":
    main()
