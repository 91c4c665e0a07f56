"""A dataset through Snakemake in a real container: one vLLM offline cell on the shipped
Shakespeare set (8 prompts, 4 output tokens each, batch 4, quality off, one round)."""

import json

import pandas as pd
import pytest
from test_e2e_engines import run_study, tiny_study

pytestmark = pytest.mark.e2e

CELL = {
    "name": "prose", "dataset": {"kind": "shipped", "name": "shakespeare", "prompts": 8, "output_len": 4},
    # The longest of the first 8 prompts is 300 SmolLM2 tokens or so: above tiny_study's 256.
    "engine_args": {"max_model_len": 512, "enforce_eager": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("datasets")
    study = tiny_study([CELL])
    study["study"] = "tiny-datasets"
    study["defaults"]["sweep"].update(batch_size=[4], repeats=1, warmup=1, rounds=1)
    study["defaults"]["quality"] = False
    return run_study(workdir, study)


def test_the_cell_sent_the_dataset_s_prompts_with_their_own_lengths(finished):
    (cell,) = (finished / "results" / "cells").iterdir()
    rows = pd.read_parquet(cell / "round-1" / "metrics.parquet")
    assert rows["status"].tolist() == ["ok"]
    row = rows.iloc[0]
    assert (row["batch_size"], row["input_len"], row["output_len"]) == (4, 0, 0)
    assert (row["dataset_kind"], row["dataset_name"]) == ("shipped", "shakespeare")
    assert row["dataset_sha256"] == "4e389cee768832f17d7b25c73e9b39efaa9c05b2aaf5cad5b839d0a63cc44398"
    assert row["output_tokens_mean"] == 4 and row["output_tokens"] == 16
    container = json.loads((cell / "round-1" / "provenance.json").read_text())["container"]
    assert container["dataset"] == {"usable": 8, "pruned": 0}
    (point,) = container["points"]
    # The warm-up took 4 of the 8 prompts, the repeat the other 4: every line once.
    lines = [request["dataset_line"] for request in point["requests"]]
    assert len(set(lines)) == 4 and set(lines) <= set(range(1, 9))
    tokens = [request["prompt_tokens"] for request in point["requests"]]
    assert row["prompt_tokens_mean"] == sum(tokens) / 4 and len(set(tokens)) > 1  # varied lengths


def test_the_summary_names_the_point_by_its_dataset(finished):
    md = (finished / "results" / "tables" / "summary.md").read_text()
    assert "| 4 × shakespeare |" in md and "## Prompts from a dataset" in md
