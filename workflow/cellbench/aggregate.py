"""All rows -> one row per machine x cell x point: the repeat spread and the ratio to baseline."""

from __future__ import annotations

import json

import pandas as pd
import polars as pl
import pyarrow as pa

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
_SEVERITY = ("ok", "failed", "unsupported", "timeout")  # worst last
CV_FLAG = 0.05  # a point whose repeats spread more than this is flagged, not trusted silently


def cell_points(rows: pl.LazyFrame | pl.DataFrame | pa.Table | pd.DataFrame, baseline_id: str) -> pd.DataFrame:
    """Mean, min, max and coefficient of variation of output tok/s over repeats, per point,
    with the ratio to the baseline cell measured on the same machine at the same point.
    Computed lazily with polars, which reads only the columns used; returned as pandas."""
    frame = _lazy(rows)
    # In the schema's types; columns a row does not carry (added to the schema later) read as null.
    schema, names = metrics.polars_schema(), frame.collect_schema().names()
    frame = frame.with_columns(
        pl.col(c).cast(schema[c]) if c in names else pl.lit(None, schema[c]).alias(c) for c in metrics.COLUMNS
    )
    # Per-point columns: the first non-null value, repeats in order (a failed repeat's error shows).
    first = (
        frame.sort("repeat", nulls_last=True, maintain_order=True)
        .group_by(KEY, maintain_order=True)
        .agg(pl.col(CELL_COLUMNS).drop_nulls().first())
    )
    rank = pl.col("status").replace_strict(_SEVERITY, range(len(_SEVERITY)), default=None)
    # A point is ok only if every row of it is ok (a later failed repeat spoils the point).
    worst = frame.group_by(KEY).agg(rank.max().alias("_rank"))
    stats = _repeat_stats(frame.filter(pl.col("status") == "ok"))
    table = (
        first.join(stats, on=KEY, how="left", nulls_equal=True)
        .join(worst, on=KEY, how="left", nulls_equal=True)
        .with_columns(
            pl.col("_rank").replace_strict(range(len(_SEVERITY)), _SEVERITY, default=None).alias("status"),
            pl.col("repeats").fill_null(0).cast(pl.Int64),
            (pl.col("output_tok_s_cv") > CV_FLAG).fill_null(False).alias("cv_flag"),
            (pl.col("latency_p50_s_cv") > CV_FLAG).fill_null(False).alias("latency_cv_flag"),
        )
        .drop("_rank")
    )
    base = table.filter(pl.col("cell_id") == baseline_id).select("machine_id", *POINT, baseline_tok_s="output_tok_s")
    table = (
        table.join(base, on=["machine_id", *POINT], how="left", nulls_equal=True)
        .with_columns(vs_baseline=pl.col("output_tok_s") / pl.col("baseline_tok_s"))
        .drop("baseline_tok_s")
        .sort(["machine_id", *POINT, "cell_name"], maintain_order=True)
    )
    cells = (
        frame.filter(pl.col("settings_json").is_not_null())
        .unique(["machine_id", "cell_id"], keep="first", maintain_order=True)
        .select("machine_id", "cell_id", "settings_json", "effective_json")
    )
    table, cells = pl.collect_all([table, cells])
    if table.is_empty():
        return pd.DataFrame()
    # Described once per distinct record: a cell repeats its record at every point.
    described = {value: describe_effective(value) for value in table["effective_json"].drop_nulls().unique()}
    marks = effective.same_as_rows(cells.iter_rows(named=True), baseline_id)
    same_as = pl.DataFrame(
        [(machine, cell, mark) for (machine, cell), mark in marks.items()],
        schema={"machine_id": pl.String, "cell_id": pl.String, "same_as": pl.String},
        orient="row",
    )
    return (
        table.with_columns(
            engine_ran=pl.col("effective_json")
            .replace_strict(described, default=None, return_dtype=pl.String)
            .fill_null(describe_effective(None))
        )
        .join(same_as, on=["machine_id", "cell_id"], how="left", maintain_order="left")
        .to_pandas()
    )


def _repeat_stats(ok: pl.LazyFrame) -> pl.LazyFrame:
    """Per point, over its ok repeats: output tok/s mean, min, max, population CV (0 for one
    repeat); latency means; the spread of the median latency; the serving percentiles' means."""
    tok, p50 = pl.col("output_tok_s"), pl.col("latency_p50_s")
    means = ("latency_p50_s", "latency_p90_s", "latency_p99_s", "ttft_p50_s", "tpot_p50_s")
    return ok.group_by(KEY).agg(
        tok.count().alias("repeats"),
        tok.mean().alias("output_tok_s"),
        tok.min().alias("output_tok_s_min"),
        tok.max().alias("output_tok_s_max"),
        (tok.std(ddof=0) / tok.mean()).alias("output_tok_s_cv"),
        *(pl.col(c).mean() for c in means),
        p50.min().alias("latency_p50_s_min"),
        p50.max().alias("latency_p50_s_max"),
        (p50.std(ddof=0) / p50.mean()).alias("latency_p50_s_cv"),
        *(pl.col(c).mean() for c in SERVE_MEANS),
    )


def _lazy(rows) -> pl.LazyFrame:
    if isinstance(rows, pl.LazyFrame):
        return rows
    if isinstance(rows, pd.DataFrame):
        return pl.from_pandas(rows).lazy()
    return (rows.rechunk() if isinstance(rows, pl.DataFrame) else pl.from_arrow(rows)).lazy()


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
    # Only the columns used: each group's sort would otherwise move all of them (0.5 s at 10,000 cells).
    columns = ["machine_id", *POINT, "cell_name", "output_tok_s", "vs_baseline"]
    ok = points.loc[(points["status"] == "ok") & points["output_tok_s"].notna(), columns]
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
