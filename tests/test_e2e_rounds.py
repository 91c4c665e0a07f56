"""Rounds through Snakemake in real containers: two llama.cpp cells (a load takes under a second),
two rounds each, interleaved; the host canary and sentinel recorded; tables with intervals;
`cellbench compare` of two runs; rerunning one cell reruns its rounds only."""

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_e2e_engines import snakemake, tiny_study

pytestmark = pytest.mark.e2e

CELLS = [
    {"name": "one-thread", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1",
     "engine_args": {"n_threads": 1}},
    {"name": "two-threads", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1",
     "engine_args": {"n_threads": 2}},
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rounds")
    study = tiny_study(CELLS)
    study["study"] = "tiny-rounds"
    study["defaults"]["sweep"].update(batch_size=[1], rounds=2)
    study["defaults"]["quality"] = False  # measured in test_e2e_engines
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake(workdir)
    return workdir


def provenance(workdir: Path) -> dict[tuple[str, int], dict]:
    found = {}
    for path in (workdir / "results" / "cells").glob("*/round-*/provenance.json"):
        record = json.loads(path.read_text())
        found[(record["cell"]["name"], int(path.parent.name.removeprefix("round-")))] = record
    return found


def test_every_round_is_its_own_container_and_rounds_interleave(finished):
    records = provenance(finished)
    assert sorted(records) == [("one-thread", 1), ("one-thread", 2), ("two-threads", 1), ("two-threads", 2)]
    assert len({r["run_id"] for r in records.values()}) == 4  # four containers, four engine loads
    started = {key: r["container"]["started_at"] for key, r in records.items()}
    # Every round 1 began before any round 2.
    assert max(started[(c, 1)] for c in ("one-thread", "two-threads")) <= min(
        started[(c, 2)] for c in ("one-thread", "two-threads")
    )


def test_rows_carry_round_canary_and_host_sentinel(finished):
    rows = pd.read_parquet(finished / "results" / "summary.parquet")
    assert sorted(rows["round"].unique()) == [1, 2]
    assert (rows["canary_matmul_1t_gflops"] > 0).all() and (rows["canary_memcpy_gb_s"] > 0).all()
    assert rows["host_foreign_cpu"].notna().all() and (rows["host_foreign_cpu"] >= 0).all()


def test_tables_show_rounds_and_intervals(finished):
    md = (finished / "results" / "tables" / "summary.md").read_text()
    assert "95% interval" in md and "## Host" in md
    # 2 of 2 rounds trusted on a quiet host; a busy one flags some ("0/2 (2 flagged ...)")
    assert re.search(r"\| [0-2]/2( \(\d flagged[^|]*\))? \|", md), md
    points = pd.read_csv(finished / "results" / "tables" / "summary.csv")
    # A round the canary flagged (a busy CI host) is left out, and then that point has no interval.
    assert (points["rounds_total"] == 2).all() and (points["rounds"] + points["rounds_flagged"] == 2).all()
    assert points.loc[points["rounds"] == 2, "output_tok_s_low"].notna().all()


def test_compare_two_runs_and_rerun_one_cell(finished):
    runs = subprocess.run(["cellbench", "runs"], cwd=finished, capture_output=True, text=True, check=True)
    first = runs.stdout.split()[-1]
    before = provenance(finished)
    done = subprocess.run(
        ["cellbench", "rerun", "two-threads", "--configfile", "study.yaml"],
        cwd=finished, capture_output=True, text=True, env={**os.environ, "CELLBENCH_MACHINE_ID": "e2e"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    after = provenance(finished)
    for key in after:  # both rounds of the rerun cell are new, the other cell's stand
        assert (after[key]["run_id"] != before[key]["run_id"]) == (key[0] == "two-threads"), key
    runs = subprocess.run(["cellbench", "runs"], cwd=finished, capture_output=True, text=True, check=True)
    second = runs.stdout.split()[-1]
    assert second != first
    compared = subprocess.run(
        ["cellbench", "compare", first, second], cwd=finished, capture_output=True, text=True, check=True
    )
    assert "e2e two-threads 1×16→8" in compared.stdout and "of 2 cell points changed significantly" in compared.stdout
    missing = subprocess.run(["cellbench", "compare", first, "20990101T000000Z"], cwd=finished, capture_output=True,
                             text=True)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such run" in missing.stderr
