#!/usr/bin/env python3
"""Telemetry overhead: tok/s of one cell with the host's telemetry on vs off, in one run, interleaved.

usage: python3 benchmarks/telemetry_overhead.py [--engine llamacpp|vllm] [--rounds 4] [--interval 1.0]
                                                [--workdir DIR]

Two cells that differ only in `telemetry` (it is not part of what a cell measures, so their
settings are otherwise the same): `tele-on` sampled every --interval seconds, `tele-off` not
sampled. Snakemake's round priorities run every cell's round 1 before any round 2, so on and off
alternate round by round and share the host's drifts. Prints, per point, each cell's mean tok/s
over rounds with its spread (min-max of the round means, and the standard deviation), the
ratio on/off, and whether the difference exceeds the spread. A busy host widens the spread: the
machine line and the host's load are printed with the figures.
"""

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from studies import machine  # noqa: E402

ENGINES = {
    "llamacpp": {"image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1"},
    "vllm": {"dtype": "bfloat16", "engine_args": {"enforce_eager": True, "max_model_len": 512}},
}


def overhead_study(engine: str, rounds: int, interval_s: float) -> dict:
    study = copy.deepcopy(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    study["study"] = "telemetry-overhead"
    study["defaults"]["engine_args"] = {"max_model_len": 512}
    study["defaults"]["sweep"] = {"batch_size": [1, 8], "input_len": [64], "output_len": [32], "repeats": 3,
                                  "warmup": 1, "seed": 0, "rounds": rounds}  # fmt: skip
    study.pop("expectations", None)
    cell = ENGINES[engine]
    study["cells"] = [
        {"name": "tele-on", **cell, "telemetry": {"enabled": True, "interval_s": interval_s}},
        {"name": "tele-off", **cell, "telemetry": {"enabled": False}},
    ]
    study["baseline"] = "tele-off"
    return study


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):8.2f} tok/s  [{min(values):.2f}-{max(values):.2f}]  sd {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), default="llamacpp")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval of tele-on, s")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cellbench-telemetry-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.yaml").write_text(yaml.safe_dump(overhead_study(args.engine, args.rounds, args.interval)))
    print(f"telemetry_overhead: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml"), "--until", "run_cell"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "CELLBENCH_MACHINE_ID": "bench"}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"snakemake failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{args.engine}, {args.rounds} rounds per cell, interleaved, in {time.perf_counter() - started:.0f} s; "
          f"load average after: {os.getloadavg()[0]:.2f}")  # fmt: skip
    cells = workdir / "results" / "cells"
    rows = pd.concat(pd.read_parquet(p) for p in cells.glob("*/round-*/metrics.parquet"))
    rows = rows[rows["status"] == "ok"]
    samples = sum(len(pd.read_parquet(p)) for p in cells.glob("tele-on-*/round-*/telemetry.parquet"))
    print(f"tele-on took {samples} samples every {args.interval} s")
    # A round's figure is the mean of its repeats (repeats share one engine load); spread over rounds.
    per_round = rows.groupby(["cell_name", "batch_size", "round"])["output_tok_s"].mean().reset_index()
    for batch, group in per_round.groupby("batch_size"):
        on = group[group["cell_name"] == "tele-on"]["output_tok_s"].tolist()
        off = group[group["cell_name"] == "tele-off"]["output_tok_s"].tolist()
        if not on or not off:
            print(f"batch {batch}: a cell has no ok round")
            continue
        gap = statistics.mean(on) - statistics.mean(off)
        noise = max(statistics.stdev(on) if len(on) > 1 else 0, statistics.stdev(off) if len(off) > 1 else 0)
        verdict = "within the spread" if abs(gap) <= noise else "OUTSIDE the spread"
        print(f"batch {batch}:  on  {spread(on)}")
        print(f"batch {batch}:  off {spread(off)}")
        print(f"batch {batch}:  on/off {statistics.mean(on) / statistics.mean(off):.3f}, "
              f"difference {gap:+.2f} tok/s: {verdict} (larger sd {noise:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
