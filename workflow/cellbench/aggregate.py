"""All rows -> one row per machine x cell x point: the repeat spread and the ratio to baseline."""

from __future__ import annotations

import json

import pandas as pd

from . import effective, metrics

POINT = ["batch_size", "input_len", "output_len"]
KEY = ["machine_id", "cell_id", *POINT]
# Per-point columns taken from the first row of a point.
CELL_COLUMNS = [
    "study", "cell_name", "engine", "image", "model", "dtype", "quantization", "status", "error",
    "effective_dtype", "effective_quantization", "effective_eager", "effective_json", "load_s",
    "peak_memory_mb", "device_name", "schema_version", "method_version", "host_load_max",
    "overrides_json", "findings_json", "weight_bytes",
]  # fmt: skip
# Serving figures averaged over repeats where the rows have them (serve-mode cells).
SERVE_MEANS = ["ttft_p99_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s"]
# The Parquet columns cell_points reads: aggregation loads only these (10,000 cells fit in memory).
USED_COLUMNS = list(
    dict.fromkeys(
        [
            *KEY,
            "repeat",
            "output_tok_s",
            "latency_p50_s",
            "latency_p90_s",
            "latency_p99_s",
            "ttft_p50_s",
            "tpot_p50_s",
            "settings_json",
            *SERVE_MEANS,
            *CELL_COLUMNS,
        ]
    )  # fmt: skip
)
_SEVERITY = ("ok", "failed", "unsupported", "timeout")  # worst last
CV_FLAG = 0.05  # a point whose repeats spread more than this is flagged, not trusted silently


def cell_points(rows: pd.DataFrame, baseline_id: str) -> pd.DataFrame:
    """Mean, min, max and coefficient of variation of output tok/s over repeats, per point,
    with the ratio to the baseline cell measured on the same machine at the same point."""
    if rows.empty:
        return pd.DataFrame()
    # Columns a row does not carry (added at the end of the schema later) read as null.
    rows = rows.reindex(columns=list(dict.fromkeys([*metrics.COLUMNS, *rows.columns])))
    first = rows.sort_values("repeat", na_position="last").groupby(KEY, sort=False).first()
    ok = rows[rows["status"] == "ok"]
    grouped = ok.groupby(KEY)["output_tok_s"]
    stats = pd.DataFrame(
        {
            "repeats": grouped.count(),
            "output_tok_s": grouped.mean(),
            "output_tok_s_min": grouped.min(),
            "output_tok_s_max": grouped.max(),
            # Population CV over the repeats (0 with a single repeat).
            "output_tok_s_cv": grouped.std(ddof=0) / grouped.mean(),
            "latency_p50_s": ok.groupby(KEY)["latency_p50_s"].mean(),
            "latency_p90_s": ok.groupby(KEY)["latency_p90_s"].mean(),
            "latency_p99_s": ok.groupby(KEY)["latency_p99_s"].mean(),
            "ttft_p50_s": ok.groupby(KEY)["ttft_p50_s"].mean(),
            "tpot_p50_s": ok.groupby(KEY)["tpot_p50_s"].mean(),
        }
    )
    stats = stats.join(latency_spread(ok))
    table = first[CELL_COLUMNS].join(stats, how="left")
    # A point is ok only if every row of it is ok (a later failed repeat spoils the point).
    table["status"] = worst_status(rows)
    table["repeats"] = table["repeats"].fillna(0).astype(int)
    table["cv_flag"] = table["output_tok_s_cv"] > CV_FLAG
    table["latency_cv_flag"] = table["latency_p50_s_cv"] > CV_FLAG
    table = table.reset_index()
    base = table[table["cell_id"] == baseline_id].set_index(["machine_id", *POINT])["output_tok_s"]
    joined = table.join(base.rename("baseline_tok_s"), on=["machine_id", *POINT])
    joined["vs_baseline"] = joined["output_tok_s"] / joined["baseline_tok_s"]
    joined["engine_ran"] = joined["effective_json"].map(describe_effective)
    marks = effective.same_as_rows(rows, baseline_id)
    joined["same_as"] = [marks.get(key) for key in zip(joined["machine_id"], joined["cell_id"], strict=True)]
    return joined.drop(columns=["baseline_tok_s"]).sort_values(["machine_id", *POINT, "cell_name"])


def worst_status(rows: pd.DataFrame) -> pd.Series:
    """Per point, the worst status of its rows (vectorised: 10,000 cells x 20 points in well under a second)."""
    rank = rows["status"].map({status: i for i, status in enumerate(_SEVERITY)})
    return rank.groupby([rows[k] for k in KEY]).max().map(dict(enumerate(_SEVERITY)))


def latency_spread(ok: pd.DataFrame) -> pd.DataFrame:
    """Spread of the median request latency over a point's repeats (min, max, population CV)
    and the mean of the serving percentiles present in the rows."""
    grouped = ok.groupby(KEY)["latency_p50_s"]
    spread = pd.DataFrame(
        {
            "latency_p50_s_min": grouped.min(),
            "latency_p50_s_max": grouped.max(),
            "latency_p50_s_cv": grouped.std(ddof=0) / grouped.mean(),
        }
    )
    present = [column for column in SERVE_MEANS if column in ok]
    return spread.join(ok.groupby(KEY)[present].mean()) if present else spread


def describe_effective(effective_json: str | None) -> str:
    """What the engine actually ran, in a few words (read inside the container after start)."""
    if not isinstance(effective_json, str):
        return "engine did not start"
    eff = json.loads(effective_json)
    # llama.cpp has no single dtype: it runs the GGUF's types (its quantization) as stored.
    parts = [eff.get("dtype", "?")] if eff.get("engine") != "llamacpp" else []
    if eff.get("quantization"):
        parts.append(eff["quantization"])
    if eff.get("enforce_eager"):
        parts.append("eager")
    elif eff.get("compilation_mode") not in (None, "None"):
        parts.append(f"compile={eff['compilation_mode'].split('.')[-1]}")
    if eff.get("mode") == "serve":
        parts.append("OpenAI server")
    if eff.get("max_num_seqs"):
        parts.append(f"max_num_seqs={eff['max_num_seqs']}")
    return ", ".join(str(p) for p in parts)


def fastest_per_point(points: pd.DataFrame) -> pd.DataFrame:
    """Per machine and point: the fastest ok cell, the runner-up, and by how much."""
    ok = points[(points["status"] == "ok") & points["output_tok_s"].notna()]
    rows = []
    for key, group in ok.groupby(["machine_id", *POINT]):
        ranked = group.sort_values("output_tok_s", ascending=False)
        best = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        rows.append(
            {
                **dict(zip(["machine_id", *POINT], key, strict=True)),
                "fastest": best["cell_name"],
                "output_tok_s": best["output_tok_s"],
                "vs_baseline": best["vs_baseline"],
                "runner_up": None if second is None else second["cell_name"],
                "margin": None if second is None else best["output_tok_s"] / second["output_tok_s"],
                "cells": len(ranked),
            }
        )
    return pd.DataFrame(rows)
