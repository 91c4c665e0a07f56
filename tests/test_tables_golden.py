"""The Markdown tables, byte for byte, from fabricated rows covering every branch a table has:
several machines, rounds (flagged, failed, too few), failed cells, serve-mode figures, findings,
overrides, expectations and the roofline. Regenerate after a deliberate change with
CELLBENCH_UPDATE_GOLDEN=1 python3 -m pytest tests/test_tables_golden.py."""

import json
import os
from pathlib import Path

import pandas as pd
import test_aggregate
import test_report_page
import test_spread
import test_stats
from cellbench import aggregate, diagnose, diagnostics, expectations, machines, quality, report, tables, verdicts

GOLDEN = Path(__file__).parent / "golden" / "tables"
EXPECTATIONS = [
    {"cells": "fast", "metric": "output_tok_s", "min": 15, "source": "https://example.org/a|b"},
    {"cells": ["base", "awq*"], "machine": "m*", "metric": "output_tok_s", "max": 50, "batch_size": 1},
    {"cells": "nowhere", "metric": "latency_p50_s", "min": 0.5, "max": 2},
    {"cells": "a&b <x>", "metric": "output_tok_s", "min": 1},
]


def _rows() -> pd.DataFrame:
    forced = diagnose.findings(
        "WARNING Using AWQ quantization with ROCm, but VLLM_USE_TRITON_AWQ is not set, enabling VLLM_USE_TRITON_AWQ."
    )
    rows = (
        test_aggregate._rows("base", "m1", 1, [10.0, 10.0], rounds=3)
        + test_aggregate._rows("fast", "m1", 1, [19.0, 21.0], rounds=3)
        + test_aggregate._rows("base", "m1", 8, [80.0, 80.0], rounds=3)
        + test_aggregate._rows("fast", "m1", 8, [40.0, 40.0], rounds=3)
        + test_aggregate._rows("a&b <x>", "m1", 1, [12.0, 13.0], rounds=2)
        + test_aggregate._rows("pipe|cell", "m1", 1, [9.0, 11.0], rounds=3)
        + test_aggregate._rows("base", "m2", 1, [5.0])
        + test_aggregate._rows("fast", "m2", 1, [None], status="failed")
        + test_report_page._rows("awq", {}, "amd-1", [(1, 20.0), (32, 400.0)], forced)
        + test_report_page._rows(
            "awq-triton_off", {"VLLM_USE_TRITON_AWQ": "0"}, "amd-1", [(1, 19.8), (32, 401.0)], forced
        )
        + test_report_page._rows("awq", {}, "m2", [(1, 25.0), (32, 500.0)])
    )
    serve = {"ttft_p99_s": 0.2, "tpot_p99_s": 0.03, "itl_p50_s": 0.02, "itl_p99_s": 0.04}
    rows += [
        test_spread._row("steady", 0, 10.0, 1.0), test_spread._row("steady", 1, 10.0, 1.0),
        test_spread._row("noisy", 0, 10.0, 0.9, **serve),
        test_spread._row("noisy", 1, 10.0, 1.1, **{**serve, "itl_p99_s": 0.06}),
    ]  # fmt: skip
    rows += test_stats._study_rows(disturbed_round=4).to_pylist()
    frame = pd.DataFrame(rows)
    frame["device_name"] = frame["device_name"].fillna("cpu")
    frame[["schema_version", "method_version"]] = frame[["schema_version", "method_version"]].fillna(1)
    frame.loc[frame["machine_id"] == "m1", "weight_bytes"] = 1e8
    frame.loc[frame["cell_name"] == "pipe|cell", "host_load_max"] = 99.0  # a busy host
    frame.loc[(frame["cell_name"] == "fast") & (frame["machine_id"] == "m2"), "error"] = "engine <died> & a|b"
    return _with_quality(frame)


TEXTS = ["to be or not", "the rose smells sweet", "Romeo, Romeo", "good night"]
# Quality on round 1 of a cell (as a cell writes it): the baseline, a cell identical to it, one on
# another tokenizer that drifts, one whose model is corrupted (and fastest), one failed, one off.
QUALITY = {
    ("m1", "base"): {"quality_bits_per_byte": 1.0, "quality_nll": 2.0},
    ("m1", "a&b <x>"): {"quality_bits_per_byte": 1.004, "quality_nll": 2.008},
    ("m1", "pipe|cell"): {"quality_bits_per_byte": 1.05, "quality_nll": 2.2, "quality_nll_tokens": 2700,
                          "quality_greedy_json": json.dumps(["to be or", "the rose smells", "Romeo, Juliet", "good"])},
    ("m1", "fast"): {"quality_bits_per_byte": 4.1, "quality_nll": 8.2,
                     "quality_greedy_json": json.dumps(["the the the"] * 4)},
    ("m2", "base"): {"quality_status": "unsupported", "quality_error": "engine cannot return prompt log-probabilities",
                     "quality_s": 0.4, **dict.fromkeys(("quality_bits_per_byte", "quality_nll", "quality_nll_tokens",
                                                        "quality_greedy_json"))},
    ("amd-1", "awq"): {"quality_status": "off", **dict.fromkeys(("quality_bits_per_byte", "quality_nll", "quality_s",
                                                                  "quality_nll_tokens", "quality_greedy_json"))},
}  # fmt: skip


def _with_quality(frame: pd.DataFrame) -> pd.DataFrame:
    for column in quality.COLUMNS:
        frame[column] = pd.Series([None] * len(frame), dtype=object, index=frame.index)
    for (machine, cell), values in QUALITY.items():
        where = (frame["machine_id"] == machine) & (frame["cell_name"] == cell) & (frame["round"].fillna(1) == 1)
        values = {
            "quality_status": "ok", "quality_error": None, "quality_s": 11.5, "quality_nll_tokens": 2851,
            "quality_greedy_json": json.dumps(TEXTS), "quality_method_version": 1, **values,
        }  # fmt: skip
        for column, value in values.items():
            frame.loc[where, column] = value
    return frame


def _tables() -> dict[str, str]:
    points = aggregate.cell_points(_rows(), "base-h")
    fastest = aggregate.fastest_per_point(points, 0.95)
    points = verdicts.with_roofline(points, {"^cpu$": 100})
    found = expectations.verdicts(points, EXPECTATIONS)
    sentences = expectations.ratio_sentences(points, "base")
    empty = aggregate.cell_points(pd.DataFrame(test_aggregate._rows("base", "m1", 1, [None], status="failed")), "x")
    return {
        "summary.md": report.summary_markdown(points, fastest, "golden", "base", 0.9),
        "summary-empty.md": report.summary_markdown(empty, pd.DataFrame(), "golden", "base"),
        "verdicts.md": verdicts.verdicts_markdown(found, sentences, points, "golden"),
        "verdicts-empty.md": verdicts.verdicts_markdown([], [], empty.assign(bound_fraction=None), "golden"),
        "diagnostics.md": diagnostics.diagnostics_markdown(diagnostics.cells(points), "golden"),
        "machines.md": machines.machines_markdown(points, machines.compare(points, "m1"), "m1"),
        "machines-one.md": machines.machines_markdown(empty, machines.compare(empty, "m1"), "m1"),
    }


def _cut_tables(monkeypatch) -> dict[str, str]:
    """Tables longer than LISTED_ROWS: the first rows and where the rest are."""
    monkeypatch.setattr(tables, "LISTED_ROWS", 3)
    points = aggregate.cell_points(_rows(), "base-h")
    fastest = aggregate.fastest_per_point(points, 0.95)
    return {
        "summary-cut.md": report.summary_markdown(points, fastest, "golden", "base"),
        "machines-cut.md": machines.machines_markdown(points, machines.compare(points, "m1"), "m1"),
    }


def test_markdown_tables_are_unchanged(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rendered = {**_tables(), **_cut_tables(monkeypatch)}
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        for file, text in rendered.items():
            (GOLDEN / file).write_text(text)
    for file, text in rendered.items():
        assert text == (GOLDEN / file).read_text(), file
