#!/usr/bin/env python3
"""Aggregation scale: a synthetic 10,000-cell x 20-point study, three figures side by side.

usage: python3 benchmarks/aggregate_scale.py [--cells 10000] [--points 20] [--repeats 3]
                                             [--workdir DIR] [--profile]

(a) full: `cellbench aggregate` as the rule runs it (every metrics file), its cache removed first;
(b) floor: a Python process that merely reads every cell's metrics file with pyarrow (file by
    file, and as one pyarrow dataset; the faster counts);
(c) incremental: `cellbench aggregate` after one cell changed (a rerun: a new run id and figure,
    written atomically), its cache kept;
(d) the least (c) can cost while summary.parquet and summary.csv stay one file each: a Python
    process that imports polars, reads both outputs and writes them again (no aggregation at all).
Each is a fresh process (startup and imports included), repeated --repeats times in turn so that
the host's drift touches all three; the median and min-max are printed. Goals, as ratios (absolute
times move with the machine): (c) <= 5 % of (a); (a) <= 1.5x (b); peak RSS <= 1 GB. Also printed:
where the time of (a) and (c) goes (the stages `cellbench aggregate` reports) and, with
--profile, cProfile's top entries of one (c). The commit and the host's load (before, after) are
printed with the figures; the study is generated once per --workdir.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import shutil
import sys
import tempfile
from pathlib import Path

from studies import ROOT, commit, load, machine, median, spread, timed_child

sys.path.insert(0, str(ROOT / "workflow"))
import pyarrow as pa  # noqa: E402
from cellbench import metrics, paths  # noqa: E402

GOAL_INCREMENTAL, GOAL_FLOOR, GOAL_MB = 0.05, 1.5, 1024
FLOOR = """import sys, time
import pyarrow.dataset as ds, pyarrow.parquet as pq
files = open(sys.argv[1]).read().split()
if sys.argv[2] == "each":
    for path in files:
        pq.ParquetFile(path).read()
else:
    ds.dataset(files, format="parquet").to_table()
"""

REWRITE = """import sys
import polars as pl
summary, csv = sys.argv[1:3]
pl.read_parquet(summary).write_parquet(summary + ".floor")
pl.read_csv(csv, infer_schema=False).write_csv(csv + ".floor")
"""


def template(points: int) -> pa.Table:
    """One cell's rows, shaped like a real cell's: 2 repeats per point (a failed cell: one row per point)."""
    rows = []
    for index in range(points):
        for repeat in range(2):
            rows.append(
                {
                    "schema_version": metrics.SCHEMA_VERSION, "method_version": metrics.METHOD_VERSION,
                    "study": "scale", "cell_id": "c-0000000000", "cell_name": "c", "machine_id": "m0",
                    "run_id": "r", "status": "ok", "engine": "vllm", "image": "cpu", "device": "cpu", "model": "m",
                    "mode": "offline", "dtype": "bfloat16", "batch_size": 2 ** (index % 10),
                    "input_len": 128 * (1 + index // 10), "output_len": 64, "repeat": repeat, "round": 1,
                    "output_tok_s": 10.0 + repeat, "latency_p50_s": 1.0, "load_s": 30.0, "config_hash": "h",
                    "settings_json": "{}", "effective_json": '{"dtype": "bfloat16", "enforce_eager": true}',
                }
            )  # fmt: skip
    return metrics.to_table(rows)


def cell_id(cell: int) -> str:
    return f"c-{cell}-{cell:010x}"


def cell_table(base: pa.Table, cell: int, run_id: str = "r", bump: float = 0.0) -> pa.Table:
    """The template as cell `cell`: its id, machine (one of 3), speed; one cell in 50 failed."""
    n = len(base)
    failed = cell % 50 == 7
    columns = {
        "cell_id": pa.array([cell_id(cell)] * n),
        "cell_name": pa.array([f"c-{cell}"] * n),
        "machine_id": pa.array([f"m{cell % 3}"] * n),
        "run_id": pa.array([run_id] * n),
        "status": pa.array(["failed" if failed else "ok"] * n),
        "error": pa.array(["engine refused" if failed else None] * n, pa.string()),
        "output_tok_s": pa.array(
            [None] * n if failed else [10.0 + cell % 97 + r % 2 + bump for r in range(n)], pa.float64()
        ),
    }
    table = base
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), metrics.SCHEMA.field(name), values)
    return table.slice(0, n // 2) if failed else table


def generate(workdir: Path, cells: int, points: int) -> list[str]:
    """The study's metrics files (results/cells/<id>/round-1/metrics.parquet), made once."""
    marker = workdir / f"generated-{cells}x{points}-v{metrics.SCHEMA_VERSION}"
    files = [str(paths.cell_metrics(cell_id(cell), 1)) for cell in range(cells)]
    if not marker.exists():
        shutil.rmtree(workdir / paths.RESULTS, ignore_errors=True)
        base = template(points)
        for cell, file in enumerate(files):
            metrics.write_parquet(workdir / file, cell_table(base, cell))
        marker.touch()
    (workdir / "files.txt").write_text("\n".join(files))
    return files


def aggregate_argv(files: list[str], *extra: str) -> list[str]:
    return [sys.executable, *extra, "-m", "cellbench.cli", "aggregate", "--study", "scale",
            "--baseline-id", cell_id(0), "--baseline-name", "c-0", "--machine-id", "m0",
            "--summary", str(paths.summary()), "--tables", str(paths.tables_dir()), *files]  # fmt: skip


STAGES = re.compile(r"in ([0-9.]+) s.*; points ([0-9.]+) s, tables ([0-9.]+) s, snapshot ([0-9.]+) s")


def stages(out: str) -> list[float]:
    """rows, points, tables, snapshot seconds from `cellbench aggregate`'s last line."""
    line = next(x for x in out.splitlines() if x.startswith("cellbench: aggregate:"))
    return [float(x) for x in STAGES.search(line).groups()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep the generated study here (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="cProfile one incremental aggregation")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cellbench-agg-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"aggregate_scale: {machine()}; commit {commit()}")
    files = generate(workdir, args.cells, args.points)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "CELLBENCH_MACHINE_ID": "m0"}
    cache = workdir / paths.aggregate_cache()
    base = template(args.points)
    timed_child(aggregate_argv(files), workdir, env)  # warms the page cache and makes the cache for (c)
    print(f"{args.cells:,} cells x {args.points} points; host {load()} before")
    full, floor_each, floor_dataset, incremental, rewrite = [], [], [], [], []
    peaks: dict[str, float] = {}
    full_stages, incremental_stages = [], []
    for repeat in range(args.repeats):
        shutil.rmtree(cache)
        wall, peak, out = timed_child(aggregate_argv(files), workdir, env)
        full.append(wall), full_stages.append(stages(out))
        peaks["full"] = max(peaks.get("full", 0), peak)
        for how, into in (("each", floor_each), ("dataset", floor_dataset)):
            wall, peak, _ = timed_child([sys.executable, "-c", FLOOR, "files.txt", how], workdir, env)
            into.append(wall)
            peaks[f"floor {how}"] = max(peaks.get(f"floor {how}", 0), peak)
        changed = (repeat * 7919 + 1) % args.cells  # a rerun of one cell: new run id, new figure
        metrics.write_parquet(workdir / files[changed], cell_table(base, changed, f"rerun-{repeat}", 0.5))
        wall, peak, out = timed_child(aggregate_argv(files), workdir, env)
        incremental.append(wall), incremental_stages.append(stages(out))
        peaks["incremental"] = max(peaks.get("incremental", 0), peak)
        outputs = [str(paths.summary()), str(paths.summary_csv())]
        rewrite.append(timed_child([sys.executable, "-c", REWRITE, *outputs], workdir, env)[0])
    print(f"host {load()} after")
    floor = min(median(floor_each), median(floor_dataset))
    a, c = median(full), median(incremental)
    print(f"(a) full aggregation (cache removed):   {spread(full)}, peak RSS {peaks['full']:.0f} MB")
    print(f"(b) floor, pyarrow file by file:        {spread(floor_each)}, peak RSS {peaks['floor each']:.0f} MB")
    print(f"(b) floor, pyarrow dataset:             {spread(floor_dataset)}, peak RSS {peaks['floor dataset']:.0f} MB")
    print(f"(c) after one cell changed:             {spread(incremental)}, peak RSS {peaks['incremental']:.0f} MB")
    print(f"(d) rewriting the two outputs alone:    {spread(rewrite)}")
    for name, runs, walls in (("(a)", full_stages, full), ("(c)", incremental_stages, incremental)):
        rows, points, tables, snapshot = (median(column) for column in zip(*runs, strict=True))
        rest = median(walls) - rows - points - tables - snapshot
        print(f"    {name} stages, median: rows {rows:.2f} s, points {points:.2f} s, tables {tables:.2f} s, "
              f"runs snapshot {snapshot:.2f} s, start-up and imports {rest:.2f} s")  # fmt: skip
    rows_ratio = median([r[0] for r in incremental_stages]) / median([r[0] for r in full_stages])
    peak = max(peaks["full"], peaks["incremental"])

    def verdict(value: float, goal: float) -> str:
        return "met" if value <= goal else f"MISSED by {value / goal:.1f}x"

    print(f"goal (c) <= 5 % of (a): {c / a:.1%} ({verdict(c / a, GOAL_INCREMENTAL)}); "
          f"the rows stage alone: {rows_ratio:.1%}")  # fmt: skip
    print(f"(d) / (a), the least (c) / (a) can be with single-file outputs: {median(rewrite) / a:.1%}; "
          f"(c) / (d): {c / median(rewrite):.2f}x")  # fmt: skip
    print(f"goal (a) <= 1.5x (b): {a / floor:.2f}x the faster floor ({verdict(a / floor, GOAL_FLOOR)})")
    print(f"goal peak RSS <= {GOAL_MB} MB: {peak:.0f} MB ({verdict(peak, GOAL_MB)})")
    if args.profile:
        changed = (args.repeats * 7919 + 1) % args.cells
        metrics.write_parquet(workdir / files[changed], cell_table(base, changed, "rerun-profile", 0.25))
        profile = workdir / "incremental.prof"
        timed_child(aggregate_argv(files, "-m", "cProfile", "-o", str(profile)), workdir, env)
        print("cProfile of one incremental aggregation, top by cumulative time:")
        pstats.Stats(str(profile), stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    print(f"working directory: {workdir}")


if __name__ == "__main__":
    main()
