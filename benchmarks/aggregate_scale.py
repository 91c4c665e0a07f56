#!/usr/bin/env python3
"""Aggregation scale: 10,000 cells x 20 points of synthetic Parquet -> summary.parquet + tables.

usage: python3 benchmarks/aggregate_scale.py [--cells 10000] [--points 20] [--runs 3]
Runs `cellbench aggregate` as the rule does (every file on the command line) and reports its
median wall time over the runs and peak memory (max RSS of the child). Goals: <= 5 s, <= 1 GB.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studies import ROOT, machine

sys.path.insert(0, str(ROOT / "workflow"))
from cellbench import metrics  # noqa: E402

GOAL_S, GOAL_MB = 5.0, 1024


def synthetic_rows(cell: int, points: int) -> list[dict]:
    """Rows shaped like a real cell's: 2 repeats per point, one cell in 50 failed."""
    failed = cell % 50 == 7
    rows = []
    for index in range(points):
        for repeat in range(2):
            rows.append(
                {
                    "schema_version": metrics.SCHEMA_VERSION, "method_version": metrics.METHOD_VERSION,
                    "study": "scale", "cell_id": f"c-{cell}-{cell:010x}", "cell_name": f"c-{cell}",
                    "machine_id": f"m{cell % 3}", "run_id": "r", "status": "failed" if failed else "ok",
                    "error": "engine refused" if failed else None, "engine": "vllm", "image": "cpu",
                    "device": "cpu", "model": "m", "mode": "offline", "dtype": "bfloat16",
                    "batch_size": 2 ** (index % 10), "input_len": 128 * (1 + index // 10), "output_len": 64,
                    "repeat": repeat, "output_tok_s": None if failed else 10.0 + cell % 97 + repeat,
                    "latency_p50_s": 1.0, "load_s": 30.0, "config_hash": "h", "settings_json": "{}",
                    "effective_json": '{"dtype": "bfloat16", "enforce_eager": true}',
                }
            )  # fmt: skip
    return rows[:points] if failed else rows[: points * 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="aggregations of the same files; the median is reported")
    args = parser.parse_args()
    print(f"aggregate_scale: {machine()}")
    with tempfile.TemporaryDirectory(prefix="cellbench-agg-") as tmp:
        tmp = Path(tmp)
        files = []
        for cell in range(args.cells):
            path = tmp / "results" / "cells" / f"c-{cell}" / "metrics.parquet"
            metrics.write_parquet(path, metrics.to_table(synthetic_rows(cell, args.points)))
            files.append(str(path.relative_to(tmp)))
        argv = ["cellbench", "aggregate", "--study", "scale", "--baseline-id", "c-0-0000000000",
                "--baseline-name", "c-0", "--summary", "results/summary.parquet", "--tables", "results/tables",
                *files]  # fmt: skip
        walls, cpus = [], []
        for _ in range(args.runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(argv, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest of the runs
        rows = len(__import__("pandas").read_parquet(tmp / "results" / "summary.parquet"))
    wall = statistics.median(walls)
    print(f"{args.cells} cells x {args.points} points ({rows} rows), {args.runs} runs: aggregate median {wall:.1f} s "
          f"({min(walls):.1f}-{max(walls):.1f}), CPU median {statistics.median(cpus):.1f} s "
          f"(goal <= {GOAL_S} s: {'met' if wall <= GOAL_S else 'MISSED'}), peak RSS {peak_mb:.0f} MB "
          f"(goal <= {GOAL_MB} MB: {'met' if peak_mb <= GOAL_MB else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
