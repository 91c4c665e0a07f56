#!/usr/bin/env python3
"""Reproducibility: run a study twice from scratch on this machine and say whether its verdicts survive.

usage: python3 benchmarks/reproducibility.py [--configfile STUDY] [--workdir DIR] [--disturb]
                                             [--burn-s S] [--reuse-first]

Runs `snakemake --cores 1` of the study in two fresh result folders, one after the other
(DIR/run1, DIR/run2), then prints per cell and point:
- the relative difference of the two runs' means;
- whether each run's interval contains the other run's mean;
- whether every significant verdict of run 1 (a cell named fastest at a point; a ratio to the
  baseline whose interval excludes 1) holds in run 2: held, weakened (run 2 states no verdict,
  e.g. withheld or not significant) or flipped (run 2 states the opposite).
With --disturb, a process burns one core for --burn-s seconds starting halfway through run 2
(halfway by run 1's duration): the disturbed rounds should be flagged and no wrong verdict stated.
Goals on a quiet machine: no flip; median relative difference <= 3 %, largest <= 8 %; each
run's mean inside the other's interval for >= 90 % of points. Figures go to DIR/reproducibility.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

import pandas as pd  # noqa: E402
from cellbench import aggregate, atomic, config, metrics  # noqa: E402

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def host_state() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"


def run_study(folder: Path, configfile: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["snakemake", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(folder),
            "--configfile", str(configfile)]  # fmt: skip
    print(f"$ {' '.join(argv)}   ({host_state()})", file=sys.stderr)
    began = time.monotonic()
    with open(folder / "snakemake.log", "w") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"snakemake failed in {folder} (exit {done.returncode}); see {folder / 'snakemake.log'}")
    return time.monotonic() - began


def burn_later(delay_s: float, seconds: float, record: dict) -> threading.Thread:
    """Burn one core for `seconds`, starting after `delay_s`: another user's job on the host."""

    def burn() -> None:
        time.sleep(delay_s)
        record["burn_started"] = time.time()
        subprocess.run([sys.executable, "-c", BURN.format(seconds=seconds)])
        record["burn_ended"] = time.time()

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    return thread


def points_of(folder: Path, baseline_id: str, settings: dict) -> pd.DataFrame:
    return aggregate.cell_points(metrics.scan_metrics([folder / "results" / "summary.parquet"]), baseline_id, settings)


def verdicts(points: pd.DataFrame, baseline_name: str, confidence: float) -> dict[tuple, str]:
    """Every verdict a run states as fact: {(kind, cell or point...): direction}."""
    found = {}
    fastest = aggregate.fastest_per_point(points, confidence)
    from cellbench import report

    short = report.short_points(points)
    for _, row in fastest.iterrows():
        point = (row["machine_id"], row["batch_size"], row["input_len"], row["output_len"])
        if point not in short and isinstance(row["fastest"], str):
            found[("fastest", row["batch_size"], row["input_len"], row["output_len"])] = row["fastest"]
    for _, row in points.iterrows():
        if row["cell_name"] == baseline_name:
            continue
        if row.get("vs_baseline_significance") in ("faster", "slower"):
            key = ("vs baseline", row["cell_name"], row["batch_size"], row["input_len"], row["output_len"])
            found[key] = row["vs_baseline_significance"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default=str(ROOT / "config" / "config.yaml"))
    parser.add_argument("--workdir", default="results/reproducibility")
    parser.add_argument("--disturb", action="store_true", help="burn one core from halfway through run 2")
    parser.add_argument("--burn-s", type=float, default=None, help="seconds to burn (default: a quarter of run 1)")
    parser.add_argument("--reuse-first", action="store_true", help="keep an existing run1 (measure only run 2)")
    parser.add_argument(
        "--analyze-only", action="store_true", help="measure nothing: judge the existing run1 and run2 again"
    )
    args = parser.parse_args()
    workdir, configfile = Path(args.workdir).resolve(), Path(args.configfile).resolve()
    study = config.load_study(configfile)
    resolved = config.resolve(study)
    settings = resolved["statistics"]
    baseline_name = resolved["cells"][resolved["baseline"]]["name"]
    record: dict = {"study": str(configfile), "host_before": host_state()}

    run1, run2 = workdir / "run1", workdir / "run2"
    if args.analyze_only:
        record.update(json.loads((workdir / "reproducibility.json").read_text()))
        record = {
            k: record[k] for k in ("study", "host_before", "host_after", "run1_s", "run2_s", "burn_s") if k in record
        }
    elif args.reuse_first and (run1 / "results" / "summary.parquet").is_file():
        record["run1_s"] = json.loads((workdir / "run1.json").read_text())["run1_s"]
    else:
        record["run1_s"] = run_study(run1, configfile)
        atomic.write_json(workdir / "run1.json", {"run1_s": record["run1_s"]})
    if not args.analyze_only:
        record["host_between"] = host_state()
        burner = None
        if args.disturb:
            seconds = args.burn_s or record["run1_s"] / 4
            burner = burn_later(record["run1_s"] / 2, seconds, record)
            record["burn_s"] = seconds
        record["run2_s"] = run_study(run2, configfile)
        if burner:
            burner.join()
        record["host_after"] = host_state()

    a, b = points_of(run1, resolved["baseline"], settings), points_of(run2, resolved["baseline"], settings)
    key = ["cell_name", "batch_size", "input_len", "output_len"]
    both = a.merge(b, on=key, suffixes=("_1", "_2"))
    both = both[(both["status_1"] == "ok") & (both["status_2"] == "ok")]
    rows = []
    for _, r in both.iterrows():
        diff = abs(r["output_tok_s_2"] - r["output_tok_s_1"]) / r["output_tok_s_1"]
        one_holds = bool(r["output_tok_s_low_1"] <= r["output_tok_s_2"] <= r["output_tok_s_high_1"])
        two_holds = bool(r["output_tok_s_low_2"] <= r["output_tok_s_1"] <= r["output_tok_s_high_2"])
        rows.append({**{k: r[k] for k in key}, "mean_1": r["output_tok_s_1"], "mean_2": r["output_tok_s_2"],
                     "rel_diff": diff, "inside_each_other": one_holds and two_holds,
                     "rounds_1": r["rounds_1"], "rounds_2": r["rounds_2"],
                     "flagged_1": r["rounds_flagged_1"], "flagged_2": r["rounds_flagged_2"]})  # fmt: skip
    table = pd.DataFrame(rows)
    first = verdicts(a, baseline_name, settings["confidence"])
    second = verdicts(b, baseline_name, settings["confidence"])
    outcome = {}
    for name, said in first.items():
        later = second.get(name)
        outcome[name] = "held" if later == said else "weakened" if later is None else "flipped"
    wrong_in_2 = [k for k, v in second.items() if k in first and first[k] != v]

    print(f"\nReproducibility of {configfile.name}: run 1 {record['run1_s']:.0f} s, run 2 {record['run2_s']:.0f} s; "
          f"host before {record['host_before']}, after {record['host_after']}")  # fmt: skip
    if record.get("burn_s"):
        print(f"run 2 disturbed: one core burned for {record['burn_s']:.0f} s from halfway")
    print(f"{'cell':32} {'point':12} {'run 1':>8} {'run 2':>8} {'diff':>6} inside  rounds(flagged)")
    for _, r in table.sort_values(key).iterrows():
        point = f"{r['batch_size']}×{r['input_len']}→{r['output_len']}"
        print(f"{r['cell_name']:32} {point:12} {r['mean_1']:8.1f} {r['mean_2']:8.1f} {r['rel_diff']:6.1%} "
              f"{'yes' if r['inside_each_other'] else 'NO':6}  {r['rounds_1']}({r['flagged_1']}) / "
              f"{r['rounds_2']}({r['flagged_2']})")  # fmt: skip
    summary = {
        "points": len(table),
        "median_rel_diff": float(table["rel_diff"].median()) if len(table) else None,
        "max_rel_diff": float(table["rel_diff"].max()) if len(table) else None,
        "share_inside_each_other": float(table["inside_each_other"].mean()) if len(table) else None,
        "verdicts_run1": len(first),
        "held": sum(v == "held" for v in outcome.values()),
        "weakened": sum(v == "weakened" for v in outcome.values()),
        "flipped": sum(v == "flipped" for v in outcome.values()),
        "flagged_rounds_run2": int(b.drop_duplicates("cell_id")["rounds_flagged"].sum()),
    }
    print(f"\nmedian relative difference {summary['median_rel_diff']:.1%} (goal <= 3 %), largest "
          f"{summary['max_rel_diff']:.1%} (goal <= 8 %); each mean inside the other's interval: "
          f"{summary['share_inside_each_other']:.0%} of points (goal >= 90 %)")  # fmt: skip
    print(f"verdicts of run 1: {summary['verdicts_run1']}: {summary['held']} held, {summary['weakened']} "
          f"weakened, {summary['flipped']} flipped (goal: 0 flipped); flagged rounds in run 2: "
          f"{summary['flagged_rounds_run2']}")  # fmt: skip
    for name, said in sorted(outcome.items(), key=str):
        print(f"  {' '.join(map(str, name))}: {first[name]} -> {second.get(name, 'no verdict')} ({said})")
    if wrong_in_2:
        print(f"run 2 stated {len(wrong_in_2)} verdict(s) against run 1's")
    atomic.write_json(
        workdir / "reproducibility.json",
        {**record, **summary, "outcome": {" ".join(map(str, k)): v for k, v in outcome.items()},
         "points": table.to_dict("records"), "statistics": settings},
    )  # fmt: skip
    return 0 if summary["flipped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
