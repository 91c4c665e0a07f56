#!/usr/bin/env python3
"""Overhead of telemetry or of a profile: tok/s of one cell with the feature on vs off, paired.

usage: python3 benchmarks/overhead.py --feature telemetry|profile [--engine vllm|llamacpp|transformers]
                                      [--pairs 3] [--interval 1.0] [--workdir DIR]

Two cells that differ only in the feature: `on` (telemetry sampled every --interval seconds, or
a profile of its batch-8 point taken after its speed points, as a study's profile is) and `off`.
Each pair is one Snakemake run of both cells, one round each, fresh containers; the image and the
prepared model are kept between pairs. A profile is taken on round 1 only, so pairs of 1-round
runs (not rounds of one run) are what keeps every `on` measurement profiled.

Prints per pair and point both cells' mean tok/s over repeats and the host's load; then per
point the paired ratio on/off (geometric mean over pairs) with its t interval, and whether it
excludes 1 (a significant overhead) or not. Quiet the host first: other processes on the cores
widen the interval and can fake a difference.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "workflow"))
import yaml  # noqa: E402
from cellbench import stats  # noqa: E402
from studies import machine, write_study  # noqa: E402

ENGINES = {
    "llamacpp": {"image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1"},
    # fp32: on a CPU without a bf16 matmul path, bf16's prefill takes minutes at batch 8.
    "vllm": {"dtype": "float32", "engine_args": {"enforce_eager": True, "max_model_len": 512}},
    "transformers": {"engine": "transformers", "dtype": "float32", "engine_args": {"max_model_len": 512}},
}
SWEEP = {"batch_size": [1, 8], "input_len": [64], "output_len": [32], "repeats": 3, "warmup": 1, "seed": 0,
         "rounds": 1}  # fmt: skip
PROFILED = {"point": {"batch_size": 8, "input_len": 64, "output_len": 32}, "steps": 1}


def overhead_study(feature: str, engine: str, interval_s: float) -> dict:
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study["study"] = f"{feature}-overhead"
    study["defaults"]["engine_args"] = {"max_model_len": 512}
    study["defaults"]["sweep"] = dict(SWEEP)
    study["defaults"]["quality"] = False
    study.pop("expectations", None)
    cell = ENGINES[engine]
    if feature == "telemetry":
        on, off = {"telemetry": {"enabled": True, "interval_s": interval_s}}, {"telemetry": {"enabled": False}}
    else:
        on, off = {"profile": PROFILED}, {}
    study["cells"] = [{"name": "on", **cell, **on}, {"name": "off", **cell, **off}]
    study["baseline"] = "off"
    return study


def run_pair(workdir: Path) -> pd.DataFrame:
    """One Snakemake run of both cells (their earlier results removed first): their ok rows."""
    shutil.rmtree(workdir / "results" / "cells", ignore_errors=True)
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "study.yaml"), "--until", "run_cell"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow"), "CELLBENCH_MACHINE_ID": "bench"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"snakemake failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cells = workdir / "results" / "cells"
    rows = pd.concat(pd.read_parquet(p) for p in cells.glob("*/round-*/metrics.parquet"))
    return rows[rows["status"] == "ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature", choices=["telemetry", "profile"], required=True)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="vllm")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval of the `on` cell, s")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    if args.feature == "profile" and args.engine == "llamacpp":
        raise SystemExit("overhead: llama.cpp cells cannot be profiled; --engine vllm or transformers")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"cellbench-{args.feature}-overhead-"))
    write_study(workdir, overhead_study(args.feature, args.engine, args.interval))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    print(f"overhead of {args.feature}, {args.engine}, {args.pairs} pairs, commit {commit}; {machine()}")
    per_pair = {}  # (cell, batch) -> {pair: mean tok/s over repeats}
    for pair in range(1, args.pairs + 1):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        rows = run_pair(workdir)
        means = rows.groupby(["cell_name", "batch_size"])["output_tok_s"].mean()
        for (cell, batch), value in means.items():
            per_pair.setdefault((cell, batch), {})[pair] = value
        shown = ", ".join(f"{cell} b{batch} {value:.2f}" for (cell, batch), value in means.items())
        print(f"pair {pair}: {shown} tok/s ({time.perf_counter() - started:.0f} s; load average "
              f"{load:.2f} before, {os.getloadavg()[0]:.2f} after)")  # fmt: skip
    if args.feature == "telemetry":
        samples = sum(len(pd.read_parquet(p)) for p in (workdir / "results" / "cells").glob("on-*/*/telemetry.parquet"))
        print(f"the last pair's `on` cell took {samples} telemetry samples every {args.interval} s")
    for batch in sorted({batch for _, batch in per_pair}):
        on, off = per_pair.get(("on", batch), {}), per_pair.get(("off", batch), {})
        ratio = stats.ratio_interval(on, off)
        if ratio is None:
            print(f"batch {batch}: a cell has no ok pair")
            continue
        span = f"[{ratio.low:.3f}, {ratio.high:.3f}]" if ratio.known else "(no interval: fewer than 2 pairs)"
        verdict = ("no significant difference" if not ratio.known or ratio.contains(1.0)
                   else "SIGNIFICANT difference")  # fmt: skip
        listed = {name: [round(v, 2) for _, v in sorted(side.items())] for name, side in (("on", on), ("off", off))}
        print(f"batch {batch}: on/off {ratio.estimate:.3f} {span} over {ratio.rounds} pairs: {verdict}; "
              f"per pair on {listed['on']}, off {listed['off']}")  # fmt: skip


if __name__ == "__main__":
    main()
