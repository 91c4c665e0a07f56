#!/usr/bin/env python3
"""Rerun check: would a change to the rules rerun cells that older rules finished?

usage: python3 benchmarks/rerun_check.py OLD [NEW] [--cells 4]

Clones this repository at commit OLD, finishes a generated study of N cells with its rules
(`--until run_cell`; a stand-in `cellbench run-cell` writes each round's outputs, so Snakemake
records each job's metadata as after a real run, without a container), then checks out NEW
(default HEAD) in the same clone, as `git pull` would (files it does not change keep their
times), and dry-runs NEW's rules in the same folder. Snakemake's rerun triggers compare what
it recorded per output: the rule's shell command text, the params' values and the input paths.
Exit status 1 when NEW would rerun any round (its reasons printed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from studies import ROOT, study_with_cells, write_study

# Shadows the real package in the rules' commands only: the Snakefile puts its own
# workflow/ first on sys.path. Writes the outputs run_cell declares (paths from the checkout).
STAND_IN = """import argparse, importlib.util, json, os

def main():
    spec = importlib.util.spec_from_file_location("paths", os.environ["RERUN_CHECK_PATHS"])
    paths = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paths)
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--cell")
    parser.add_argument("--round")
    args, _ = parser.parse_known_args()
    cell_id = json.loads(args.cell)["id"]
    for path in (paths.cell_metrics, paths.cell_provenance, paths.cell_log, paths.cell_telemetry,
                 paths.cell_profile):
        out = path(cell_id, args.round)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("stand-in\\n")
"""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def snakemake(checkout: Path, workdir: Path, stand_in: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(checkout / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(workdir / "study.yaml"),
            "--until", "run_cell", *args]  # fmt: skip
    env = {**os.environ, "CELLBENCH_MACHINE_ID": "bench", "PYTHONPATH": f"{stand_in}:{checkout / 'workflow'}",
           "RERUN_CHECK_PATHS": str(checkout / "workflow" / "cellbench" / "paths.py")}  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise SystemExit(f"snakemake {' '.join(args)} failed ({done.returncode}):\n{output}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default="HEAD")
    parser.add_argument("--cells", type=int, default=4)
    args = parser.parse_args()
    old, new = git("-C", str(ROOT), "rev-parse", args.old), git("-C", str(ROOT), "rev-parse", args.new)
    with tempfile.TemporaryDirectory(prefix="cellbench-rerun-") as tmp:
        tmp = Path(tmp)
        checkout, workdir, stand_in = tmp / "checkout", tmp / "study", tmp / "stand-in"
        git("clone", "-q", "--no-checkout", str(ROOT), str(checkout))
        git("-C", str(checkout), "checkout", "-q", old)
        (stand_in / "cellbench").mkdir(parents=True)
        (stand_in / "cellbench" / "__init__.py").write_text("")
        (stand_in / "cellbench" / "cli.py").write_text(STAND_IN)
        study = study_with_cells(args.cells)
        write_study(workdir, study)
        # Images and models made before: their rules are not what is checked.
        defaults = study["defaults"]
        for manifest in (f"images/{defaults['image']}.json", f"models/{defaults['model']}/manifest.json"):
            (workdir / "results" / manifest).parent.mkdir(parents=True, exist_ok=True)
            (workdir / "results" / manifest).write_text("{}\n")
        snakemake(checkout, workdir, stand_in)
        git("-C", str(checkout), "checkout", "-q", new)
        dry = snakemake(checkout, workdir, stand_in, "-n")
    jobs = re.search(r"^run_cell\s+(\d+)", dry, re.MULTILINE)
    print(f"rerun_check: {args.cells} cells finished at {old[:7]}, dry run at {new[:7]}: ", end="")
    if not jobs:
        print("no run_cell job, nothing rerun")
        return
    # Each reason once, without its details (a params change prints every cell's JSON).
    reasons = Counter(
        part.split(":", 1)[0].strip()
        for line in dry.splitlines()
        if line.strip().startswith("reason:")
        for part in line.strip().removeprefix("reason:").split("; ")
    )
    print(f"{jobs.group(1)} run_cell jobs would rerun; " + "; ".join(f"{r} ({n})" for r, n in sorted(reasons.items())))
    sys.exit(1)


if __name__ == "__main__":
    main()
