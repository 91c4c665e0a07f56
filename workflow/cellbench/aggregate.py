"""All rows -> one row per machine x cell x point: the repeat spread and the ratio to baseline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa

from . import config, contract, effective, metrics, quality, serving, stats

# A point: the sweep's point and, for a serve cell's load level, `load_point`: one string naming
# the level (load_point_expr), "" elsewhere, so older rows (null load columns) group as before.
POINT = [*metrics.POINT, "load_point"]
KEY = ["machine_id", "cell_id", *POINT]
# Per-point columns taken from the first row of a point.
POINT_COLUMNS = [
    "study", "cell_name", "engine", "image", "model", "dtype", "quantization", "status", "error",
    "effective_dtype", "effective_quantization", "effective_eager", "effective_json", "load_s",
    "peak_memory_mb", "device_name", "device_arch", "schema_version", "method_version", "host_load_max",
    "overrides_json", "findings_json", "weight_bytes", "versions_json", *metrics.LOAD,
    "dataset_kind", "dataset_name", "dataset_sha256", "dataset_prefix_len",
]  # fmt: skip
# The lengths of a point's requests, averaged over repeats (a dataset's differ from repeat to repeat).
DATASET_MEANS = ["prompt_tokens_mean", "prompt_tokens_p50", "prompt_tokens_p90",
                 "output_tokens_mean", "output_tokens_p50", "output_tokens_p90"]  # fmt: skip
# Serving figures averaged over repeats where the rows have them (serve-mode cells).
SERVE_MEANS = ["ttft_p99_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s", "ttft_p90_s", "tpot_p90_s", "requests_s",
               "slo_share", "goodput_rps", "requests_measured", "requests_failed"]  # fmt: skip


def load_point_expr() -> pl.Expr:
    """'sweep:concurrency=4', 'search:request_rate=2.5', 'sweep:request_rate=1.0 b0.5' (burstiness
    other than 1), or "" for a row that is not a load level."""
    value = pl.coalesce(pl.col("concurrency").cast(pl.String), pl.col("request_rate").cast(pl.String), pl.lit("?"))
    bursty = pl.when(pl.col("burstiness").is_not_null() & (pl.col("burstiness") != 1.0))
    level = pl.concat_str(
        [pl.col("load_phase").fill_null("sweep"), pl.lit(":"), pl.col("load_kind"), pl.lit("="), value,
         bursty.then(pl.concat_str([pl.lit(" b"), pl.col("burstiness").cast(pl.String)])).otherwise(pl.lit(""))]
    )  # fmt: skip
    return pl.when(pl.col("load_kind").is_null()).then(pl.lit("")).otherwise(level).alias("load_point")


_SEVERITY = ("ok", "failed", "unsupported", "timeout")  # worst last
CV_FLAG = 0.05  # a point whose repeats spread more than this is flagged, not trusted silently


def cell_points(
    rows: pl.LazyFrame | pl.DataFrame | pa.Table | pd.DataFrame,
    baseline_id: str,
    statistics: dict | None = None,
    quality_tolerance: dict | None = None,
) -> pd.DataFrame:
    """Per machine, cell and point: output tok/s as the mean of round means with its interval,
    the spread between and within rounds, the min/max/CV of the repeats, and the ratio to the
    baseline cell on the same machine and point with its interval and significance. Rounds the
    host canary or sentinel flagged are left out (kept as rows in summary.parquet). Each point
    carries its cell's quality against the same machine's baseline (cellbench.quality).
    Computed lazily with polars, which reads only the columns used; returned as pandas.

    In two steps, so that an aggregation can keep the first per cell (cellbench.pointcache):
    cell_parts, each cell from its own rows and its flagged rounds, and finish, what compares
    cells (the ratio to the baseline, quality, "same as")."""
    settings = config.statistics({"statistics": statistics or {}})  # the schema's defaults fill the rest
    frame = prepared(rows)
    flags = flags_of(round_table(frame), settings)
    parts = pl.collect_all(cell_parts(frame, flags, settings))
    return finish(*parts, baseline_id, settings, quality.tolerance({"quality_tolerance": quality_tolerance}))


def prepared(rows) -> pl.LazyFrame:
    """Rows in the schema's types (columns a row does not carry, added to the schema later, read
    as null), round 1 where rounds did not exist yet, and their load point."""
    frame = _lazy(rows)
    schema, names = metrics.polars_schema(), frame.collect_schema().names()
    frame = frame.with_columns(
        pl.col(c).cast(schema[c]) if c in names else pl.lit(None, schema[c]).alias(c) for c in metrics.COLUMNS
    )
    return frame.with_columns(pl.col("round").fill_null(1), load_point_expr())


# Where the ratio to the baseline joins a cell's point columns (the CSV's column order).
RATIO_COLUMNS = ["vs_baseline", "vs_baseline_low", "vs_baseline_high", "vs_baseline_significance"]
RATIOS_BEFORE = "rounds_total"


def cell_parts(frame: pl.LazyFrame, flags: pl.LazyFrame, settings: dict) -> list[pl.LazyFrame]:
    """What each cell's own rows (prepared) and its flagged rounds give: its points without the
    columns that compare it with other cells, its round means (for the ratio to the baseline),
    its settings (for "same as") and its quality figures. Each is a function of one cell's rows
    and flags alone, so an aggregation can keep them per cell."""
    frame = frame.join(flags, on=["machine_id", "cell_id", "round"], how="left")
    # A point none of whose ok rounds is clean keeps its flagged rounds as its figure (a busy
    # laptop still gets numbers), counted as 0 trusted rounds so that no verdict rests on it.
    clean = (
        frame.group_by(*KEY, "round")
        .agg(((pl.col("status") == "ok").all() & pl.col("round_flag").is_null().all()).alias("_clean"))
        .group_by(KEY)
        .agg(pl.col("_clean").any().alias("_has_clean"))
    )
    frame = frame.join(clean, on=KEY, how="left", nulls_equal=True)
    keep = pl.col("round_flag").is_null() | ~pl.col("_has_clean")
    trusted = frame.filter(keep) if settings["exclude_flagged"] else frame
    # Per-point columns: the first non-null value, repeats in order (a failed repeat's error shows).
    first = (
        frame.sort("repeat", nulls_last=True, maintain_order=True)
        .group_by(KEY, maintain_order=True)
        .agg(pl.col(POINT_COLUMNS).drop_nulls().first())
    )
    rank = pl.col("status").replace_strict(_SEVERITY, range(len(_SEVERITY)), default=None)
    # A round's point is ok only if every row of it is ok (a later failed repeat spoils it); a
    # point is ok when one of its rounds is, and the rounds that failed are counted beside it.
    per_round = frame.group_by(*KEY, "round").agg(rank.max().alias("_r"))
    worst = per_round.group_by(KEY).agg(
        pl.when(pl.col("_r").min() == 0).then(0).otherwise(pl.col("_r").max()).alias("_rank"),
        (pl.col("_r") > 0).sum().cast(pl.Int64).alias("rounds_failed"),
    )
    stats = _repeat_stats(trusted.filter(pl.col("status") == "ok"))
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
    means = round_means(trusted)
    # `flags` may hold other cells' rounds too: the join below keeps this cell's.
    flagged = flags.group_by("machine_id", "cell_id").agg(
        pl.len().alias("rounds_flagged"), pl.col("round_flag").sort().first().alias("round_flag")
    )
    canary = frame.group_by("machine_id", "cell_id").agg(pl.col(CANARY).median())
    table = (
        table.drop("output_tok_s")
        .join(point_intervals(means, settings["confidence"]), on=KEY, how="left", nulls_equal=True)
        .join(rounds_run(frame), on=KEY, how="left", nulls_equal=True)
        .join(flagged, on=["machine_id", "cell_id"], how="left")
        .join(canary, on=["machine_id", "cell_id"], how="left")
        .with_columns(pl.col("rounds_flagged").fill_null(0).cast(pl.Int64))
        .join(clean, on=KEY, how="left", nulls_equal=True)
        .with_columns(flagged_only=pl.col("rounds").is_not_null() & ~pl.col("_has_clean") & settings["exclude_flagged"])
        .with_columns(pl.when(pl.col("flagged_only")).then(0).otherwise(pl.col("rounds")).alias("rounds"))
        .drop("_has_clean")
    )
    cells = (
        frame.filter(pl.col("settings_json").is_not_null())
        .unique(["machine_id", "cell_id"], keep="first", maintain_order=True)
        .select("machine_id", "cell_id", "settings_json", "effective_json")
    )
    return [table, means, cells, quality_rows(frame)]


def finish(
    table: pl.DataFrame | pl.LazyFrame,
    means: pl.DataFrame,
    cells: pl.DataFrame,
    measured: pl.DataFrame,
    baseline_id: str,
    settings: dict,
    tolerance: dict,
    marks: tuple[pl.DataFrame, pl.DataFrame] | None = None,
    as_polars: bool = False,
) -> pd.DataFrame | pl.DataFrame:
    """The cells' parts (cell_parts, of any number of cells, in any order) -> the point table:
    with each point's ratio to the baseline, each cell's quality against the baseline's and
    its "same as" mark, sorted by machine, point and cell name. `marks`: cell_marks of these
    cells, where the caller kept them; as_polars: the table in polars (to_pandas makes the
    pandas one)."""
    # One order whatever order the parts came in (kept ones and new ones), so that an aggregation
    # through the cache and a full one give the same table.
    by_cell = ["machine_id", "cell_id"]
    table = table.lazy()
    cells, measured = sorted_cells(cells), measured.sort(by_cell, nulls_last=True)
    means = means.sort([*KEY, "round"], nulls_last=True)
    names = table.collect_schema().names()
    at = names.index(RATIOS_BEFORE)
    ratios = baseline_ratios(means.lazy(), baseline_id, settings["confidence"])
    assessed = assessed_quality(measured, baseline_id, tolerance).lazy()
    table = (  # lazily: one copy of the table made, not one per step
        table.join(ratios, on=KEY, how="left", nulls_equal=True)
        .select(*names[:at], *RATIO_COLUMNS, *names[at:])
        .sort(["machine_id", *POINT, "cell_name", "cell_id"], maintain_order=True)
        .join(assessed, on=by_cell, how="left", maintain_order="left")
        .with_columns(pl.col("quality_reason").fill_null("not measured"))  # cells none of whose rows has quality
        .collect()
    )
    if table.is_empty():
        return table if as_polars else pd.DataFrame()
    # Described once per distinct record: a cell repeats its record at every point.
    described = {value: describe_effective(value) for value in table["effective_json"].drop_nulls().unique()}
    same_as, serve = marks if marks is not None else cell_marks(cells, baseline_id)
    table = (
        table.with_columns(
            engine_ran=pl.col("effective_json")
            .replace_strict(described, default=None, return_dtype=pl.String)
            .fill_null(describe_effective(None))
        )
        .join(same_as, on=by_cell, how="left", maintain_order="left")
        .join(serve, on=by_cell, how="left", maintain_order="left")
    )
    return table if as_polars else table.to_pandas()


def to_pandas(table: pl.DataFrame) -> pd.DataFrame:
    """finish's table (as_polars) as finish returns it otherwise."""
    return pd.DataFrame() if table.is_empty() else table.to_pandas()


def sorted_cells(cells: pl.DataFrame) -> pl.DataFrame:
    """The cells part (cell_parts' third) in one order, whatever order its cells came in."""
    return cells.sort(["machine_id", "cell_id"], nulls_last=True)


def cell_marks(cells: pl.DataFrame, baseline_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What finish takes from the cells' settings alone (sorted_cells): each cell's "same as"
    mark (effective.same_as_rows) and its serve settings (serve_settings)."""
    marks = effective.same_as_rows(cells.iter_rows(named=True), baseline_id)
    same_as = pl.DataFrame(
        [(machine, cell, mark) for (machine, cell), mark in marks.items()],
        schema={"machine_id": pl.String, "cell_id": pl.String, "same_as": pl.String},
        orient="row",
    )
    return same_as, serve_settings(cells)


def serve_settings(cells: pl.DataFrame) -> pl.DataFrame:
    """Per machine and serve cell with load levels, its `serve` settings as JSON (`serve_json`:
    the SLO and the search its levels were judged by), with the defaults filled in."""
    found = []
    for row in cells.iter_rows(named=True):
        cell = json.loads(row["settings_json"])
        if cell.get("mode") == "serve" and serving.has_levels(cell.get("serve")):
            found.append((row["machine_id"], row["cell_id"], json.dumps(serving.settings(cell["serve"]))))
    schema = {"machine_id": pl.String, "cell_id": pl.String, "serve_json": pl.String}
    return pl.DataFrame(found, schema=schema, orient="row")


def quality_rows(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Per machine and cell, its quality figures: from the first row that has them (every row of
    round 1 does, whatever the host did then: quality is not a timing figure)."""
    return (
        frame.filter(pl.col("quality_status").is_not_null())
        .sort("round", "repeat", nulls_last=True, maintain_order=True)
        .unique(["machine_id", "cell_id"], keep="first", maintain_order=True)
        .select("machine_id", "cell_id", "settings_json", *quality.COLUMNS)
    )


_POLARS = {float: pl.Float64, int: pl.Int64, str: pl.String}


def assessed_quality(measured: pl.DataFrame, baseline_id: str, tolerance: dict) -> pl.DataFrame:
    """The measured cells' quality figures and verdicts (cellbench.quality.assess), without the
    greedy texts (kilobytes that every point would repeat). Cells absent here read as null:
    not measured."""
    schema = {"machine_id": pl.String, "cell_id": pl.String}
    schema |= {c: t for c, t in measured.schema.items() if c in quality.COLUMNS and c != "quality_greedy_json"}
    schema |= {c: _POLARS[t] for c, t in quality.ASSESSED.items()}
    judged = quality.assess(measured.to_dicts(), baseline_id, tolerance)
    return pl.DataFrame([{c: row[c] for c in schema} for row in judged], schema=schema)


CANARY = ["canary_matmul_1t_gflops", "canary_matmul_all_gflops", "canary_memcpy_gb_s"]
# The canary figures that flag a round. memcpy is recorded but does not flag: on a quiet shared
# VM it moved by +-20 % from round to round (11-17 GB/s) while matmul stayed within +-15 %.
CANARY_FLAGS = CANARY[:2]
ROUND = ["machine_id", "cell_id", "round"]


def round_flags(frame: pl.LazyFrame, settings: dict) -> pl.LazyFrame:
    """(machine, cell, round, reason) of every round the host disturbed: other processes used
    more than `host_cpu_max` cores (or the hypervisor stole as much) during a measured repeat, or
    its canary was off the machine's median canary for the same image by more than
    `canary_tolerance`. Rounds without sentinel or canary figures are never flagged."""
    return flags_of(round_table(frame), settings)


def round_table(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Per machine, cell, round and image: what the sentinel and canary measured (one cell's rows
    give its own; round_flags compares them across the machine's cells)."""
    return frame.group_by(ROUND + ["image"]).agg(
        pl.col("host_foreign_cpu").max().alias("_foreign"),
        pl.col("host_steal_cpu").max().alias("_steal"),
        *(pl.col(c).drop_nulls().first() for c in CANARY),
    )


def flags_of(per_round: pl.LazyFrame, settings: dict) -> pl.LazyFrame:
    """round_flags from every cell's round_table."""
    medians = per_round.group_by("machine_id", "image").agg(pl.col(c).median().alias(f"_median_{c}") for c in CANARY)
    per_round = per_round.join(medians, on=["machine_id", "image"], how="left", nulls_equal=True)
    limit, tolerance = settings["host_cpu_max"], settings["canary_tolerance"]
    reasons = [
        pl.when(pl.col("_foreign") > limit).then(
            pl.format("other processes used {} CPU cores", pl.col("_foreign").round(2))
        ),
        pl.when(pl.col("_steal") > limit).then(
            pl.format("the hypervisor stole {} CPU cores", pl.col("_steal").round(2))
        ),
        *(
            pl.when((pl.col(c) / pl.col(f"_median_{c}") - 1).abs() > tolerance).then(
                pl.format("canary {} at {}× the machine's median", pl.lit(c.removeprefix("canary_")),
                          (pl.col(c) / pl.col(f"_median_{c}")).round(2))
            )
            for c in CANARY_FLAGS
        ),
    ]  # fmt: skip
    return (
        per_round.with_columns(pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("round_flag"))
        .filter(pl.col("round_flag").is_not_null() & (pl.col("round_flag") != ""))
        .select(*ROUND, "round_flag")
    )


def round_means(trusted: pl.LazyFrame) -> pl.LazyFrame:
    """Per point and round: the mean output tok/s of its repeats, their count and variance; only
    rounds whose every row at that point is ok (a round that failed midway does not count)."""
    return (
        trusted.group_by(*KEY, "round")
        .agg(
            (pl.col("status") == "ok").all().alias("_ok"),
            pl.col("output_tok_s").mean().alias("round_tok_s"),
            pl.col("output_tok_s").count().alias("round_repeats"),
            pl.col("output_tok_s").var(ddof=1).alias("round_var"),
        )
        .filter(pl.col("_ok") & pl.col("round_tok_s").is_not_null())
        .drop("_ok")
    )


def rounds_run(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Per point: how many rounds ran at all (ok, failed or flagged)."""
    return frame.group_by(KEY).agg(pl.col("round").n_unique().alias("rounds_total"))


def _t(confidence: float, df: pl.Expr) -> pl.Expr:
    """Student's t critical value per row (stats.t_quantile of each distinct df: a handful; NaN
    where df is null, as scipy's stdtrit of the column gave)."""

    def quantiles(s: pl.Series) -> pl.Series:
        values = s.cast(pl.Float64).to_numpy()
        distinct, where = np.unique(values, return_inverse=True)
        found = np.array([stats.t_quantile(confidence, float(v)) for v in distinct], dtype=np.float64)
        return pl.Series(found[where.reshape(-1)] if len(values) else np.array([], dtype=np.float64))

    return df.map_batches(quantiles, return_dtype=pl.Float64)


def point_intervals(means: pl.LazyFrame, confidence: float) -> pl.LazyFrame:
    """Mean of round means, its t interval (rounds >= 2), between- and within-round CV."""
    n, mean, sd = pl.col("rounds"), pl.col("output_tok_s"), pl.col("_sd")
    half = _t(confidence, n - 1) * sd / n.cast(pl.Float64).sqrt()
    pooled = (pl.col("round_var") * (pl.col("round_repeats") - 1)).sum() / (pl.col("round_repeats") - 1).filter(
        pl.col("round_var").is_not_null()
    ).sum()
    return (
        means.group_by(KEY)
        .agg(
            pl.len().alias("rounds"),
            pl.col("round_tok_s").mean().alias("output_tok_s"),
            pl.col("round_tok_s").std(ddof=1).alias("_sd"),
            pooled.alias("_within_var"),
            # Kept for verdicts that compare two cells round by round (not written to CSV).
            pl.col("round").sort().alias("round_numbers"),
            pl.col("round_tok_s").sort_by("round").alias("round_means"),
        )
        .with_columns(
            pl.when(n >= 2).then(mean - half).alias("output_tok_s_low"),
            pl.when(n >= 2).then(mean + half).alias("output_tok_s_high"),
            (sd / mean).alias("between_cv"),
            (pl.col("_within_var").sqrt() / mean).alias("within_cv"),
        )
        .drop("_sd", "_within_var")
    )


def baseline_ratios(means: pl.LazyFrame, baseline_id: str, confidence: float) -> pl.LazyFrame:
    """Ratio of each cell to the baseline at the same machine and point: paired on rounds (log
    differences, t interval) where they share 2 or more, else the ratio of geometric means of
    the round means with no interval. See stats.py for why."""
    base = means.filter(pl.col("cell_id") == baseline_id).select(
        "machine_id", *POINT, "round", _base=pl.col("round_tok_s")
    )
    paired = means.join(base, on=["machine_id", *POINT, "round"], how="inner", nulls_equal=True).with_columns(
        _d=(pl.col("round_tok_s") / pl.col("_base")).log()
    )
    n, mean = pl.col("_pairs"), pl.col("_d_mean")
    half = _t(confidence, n - 1) * pl.col("_d_sd") / n.cast(pl.Float64).sqrt()
    paired = (
        paired.group_by(KEY)
        .agg(pl.len().alias("_pairs"), pl.col("_d").mean().alias("_d_mean"), pl.col("_d").std(ddof=1).alias("_d_sd"))
        .filter(n >= 2)
        .with_columns(
            mean.exp().alias("vs_baseline"),
            (mean - half).exp().alias("vs_baseline_low"),
            (mean + half).exp().alias("vs_baseline_high"),
        )
    )
    geo = means.group_by(KEY).agg(pl.col("round_tok_s").log().mean().alias("_log"))
    base_geo = geo.filter(pl.col("cell_id") == baseline_id).select("machine_id", *POINT, _base_log=pl.col("_log"))
    unpaired = geo.join(base_geo, on=["machine_id", *POINT], how="inner", nulls_equal=True).select(
        *KEY, (pl.col("_log") - pl.col("_base_log")).exp().alias("_geo_ratio")
    )
    low, high = pl.col("vs_baseline_low"), pl.col("vs_baseline_high")
    return (
        unpaired.join(paired, on=KEY, how="left", nulls_equal=True)
        .with_columns(
            pl.col("vs_baseline").fill_null(pl.col("_geo_ratio")),
            pl.when(low > 1)
            .then(pl.lit("faster"))
            .when(high < 1)
            .then(pl.lit("slower"))
            .when(low.is_not_null())
            .then(pl.lit("same"))
            .otherwise(pl.lit("unknown"))
            .alias("vs_baseline_significance"),
        )
        .select(*KEY, "vs_baseline", "vs_baseline_low", "vs_baseline_high", "vs_baseline_significance")
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
        *(pl.col(c).mean() for c in DATASET_MEANS),
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
    # An engine that runs its weights as stored (llama.cpp: the GGUF's types) has no single dtype.
    engine = contract.ENGINES.get(eff.get("engine", "vllm"))
    parts = [eff.get("dtype", "?")] if engine is None or "dtype" in engine.decides else []
    if eff.get("quantization"):
        parts.append(eff["quantization"])
    if eff.get("enforce_eager"):
        parts.append("eager")
    elif eff.get("compilation_mode") not in (None, "None"):
        parts.append(f"compile={eff['compilation_mode'].split('.')[-1]}")
    if eff.get("mode") == "serve":
        parts.append(eff.get("server", "OpenAI server"))
    if eff.get("n_slots"):  # llama-server's parallel slots
        parts.append(f"slots={eff['n_slots']}")
    if eff.get("max_num_seqs"):
        parts.append(f"max_num_seqs={eff['max_num_seqs']}")
    return ", ".join(str(p) for p in parts)


LIST_COLUMNS = ["round_numbers", "round_means"]


def round_dict(row) -> dict[int, float]:
    """{round: mean output tok/s} of a point row."""
    numbers, means = row.get("round_numbers"), row.get("round_means")
    if numbers is None or means is None or (isinstance(numbers, float) and pd.isna(numbers)):
        return {}
    return {int(k): float(v) for k, v in zip(numbers, means, strict=True)}


def _round_dicts(numbers: list, means: list) -> list[dict[int, float]]:
    """round_dict of every row of the two columns (numpy arrays, as pandas holds them): the
    arrays joined into one and made Python lists once, then sliced (a tolist per row took 0.8 s
    at 10,000 cells)."""
    arrays = [
        isinstance(n, np.ndarray)
        and isinstance(m, np.ndarray)
        and n.dtype == np.int64
        and m.dtype == np.float64
        and len(n) == len(m)
        for n, m in zip(numbers, means, strict=True)
    ]
    if not all(arrays):  # not as cell_points makes them: one row at a time
        return [round_dict({"round_numbers": n, "round_means": m}) for n, m in zip(numbers, means, strict=True)]
    if not numbers:
        return []
    flat_numbers, flat_means = np.concatenate(numbers).tolist(), np.concatenate(means).tolist()
    ends = np.cumsum([len(n) for n in numbers]).tolist()
    return [
        {flat_numbers[a]: flat_means[a]} if b - a == 1 else dict(zip(flat_numbers[a:b], flat_means[a:b], strict=True))
        for a, b in zip([0, *ends], ends, strict=False)
    ]


def as_pandas_types(table: pl.DataFrame) -> pl.DataFrame:
    """The frame in the types pl.from_pandas(table.to_pandas()) gives it, without the round trip
    (0.5 s at 10,000 cells): pandas holds an integer column with nulls as floats (so "3.0" in
    CSV, 3.0 in a cell) and NaN as null. Other types give the same values either way (an all-null
    boolean column, which comes back as strings, is empty in both)."""
    return table.with_columns(
        [pl.col(n).cast(pl.Float64) for n, t in table.schema.items() if t.is_integer() and table[n].null_count()]
        + [pl.col(n).fill_nan(None) for n, t in table.schema.items() if t.is_float()]
    )


def fastest_per_point(
    points: pd.DataFrame, confidence: float = stats.DEFAULT_CONFIDENCE, table: pl.DataFrame | None = None
) -> pd.DataFrame:
    """Per machine and point: the fastest ok cell whose quality did not diverge, named only when
    it is significantly faster than the runner-up (else the tie: every cell not significantly
    slower than the best), with the margin over the runner-up and its interval; `excluded` lists
    the cells faster than it that diverged in quality, (name, speed ratio to it, reason).
    `table`: the same points in polars (finish's as_polars), where the caller has them: the
    groups' columns are then taken from it (1 s less at 10,000 cells), to the same frame."""
    # Only the columns used: each group's sort would otherwise move all of them (0.5 s at 10,000 cells).
    judged = [c for c in ("quality_verdict", "quality_reason") if c in points]
    columns = ["machine_id", *POINT, "cell_name", "output_tok_s", "vs_baseline", *LIST_COLUMNS, *judged]
    keys = ["machine_id", *POINT]
    if table is not None:
        groups, lists = _fastest_columns_polars(table, keys, columns)
    else:
        groups, lists = _fastest_columns(points, keys, columns)
    key_columns = [lists[k] for k in keys]
    names, speeds, ratios, rounds = lists["cell_name"], lists["output_tok_s"], lists["vs_baseline"], lists["rounds"]
    verdicts = lists["quality_verdict"] if judged else [None] * len(names)
    reasons = lists["quality_reason"] if judged else [None] * len(names)
    rows = []
    for members in groups:
        if not members:
            continue
        out = {i: judged and quality.excluded(verdicts[i]) for i in members}
        kept = [i for i in members if not out[i]]
        dropped = [i for i in members if out[i]]
        row = {
            **{k: column[members[0]] for k, column in zip(keys, key_columns, strict=True)},
            "fastest": None, "tied": [], "output_tok_s": None, "vs_baseline": None, "runner_up": None,
            "margin": None, "margin_low": None, "margin_high": None, "cells": len(members),
            "quality_excluded": len(dropped),
        }  # fmt: skip
        if kept:
            means = {names[i]: rounds[i] for i in kept}
            leaders, margin, runner_up = stats.rank(means, confidence)
            best = next(i for i in kept if names[i] == leaders[0])
            row.update(
                fastest=leaders[0] if len(leaders) == 1 else None,
                tied=leaders if len(leaders) > 1 else [],
                output_tok_s=speeds[best],
                vs_baseline=ratios[best],
                runner_up=runner_up,
                margin=None if margin is None else margin.estimate,
                margin_low=None if margin is None else margin.low,
                margin_high=None if margin is None else margin.high,
            )
        best_speed = row["output_tok_s"]
        faster = dropped if best_speed is None else [i for i in dropped if speeds[i] > best_speed]
        row["excluded"] = [
            (names[i], None if best_speed is None else speeds[i] / best_speed, reasons[i])
            for i in sorted(faster, key=lambda i: -speeds[i])
        ]
        rows.append(row)
    return pd.DataFrame(rows)


def _fastest_columns(points: pd.DataFrame, keys: list[str], columns: list[str]) -> tuple[list[list[int]], dict]:
    """fastest_per_point's groups (each its rows' positions, in pandas' group order: sorted keys,
    null keys left out) and the ok rows' columns as Python lists (pandas per group, slices,
    set_index and to_dict, took 4 s at 10,000 cells), "rounds" their {round: mean}."""
    # A capacity search's probes are the search's, not points cells are compared at.
    probe = points["load_phase"].eq("search") if "load_phase" in points else False
    ok = points.loc[(points["status"] == "ok") & points["output_tok_s"].notna() & ~probe, columns]
    number = ok.groupby(keys, sort=True).ngroup().to_numpy()
    order = np.argsort(number, kind="stable")
    starts = np.searchsorted(number[order], np.arange(number.max() + 2 if len(number) else 1))
    groups = [order[starts[g] : starts[g + 1]].tolist() for g in range(len(starts) - 1)]
    lists = {c: ok[c].tolist() for c in columns if c not in LIST_COLUMNS}
    lists["rounds"] = _round_dicts(ok["round_numbers"].tolist(), ok["round_means"].tolist())
    return groups, lists


def _fastest_columns_polars(table: pl.DataFrame, keys: list[str], columns: list[str]) -> tuple[list[list[int]], dict]:
    """_fastest_columns from finish's polars points, which it sorted by machine and point: each
    run of equal keys is a group, in pandas' group order (sorted keys; polars and Python order
    strings alike, by code point), with the same values (as_pandas_types)."""
    probe = pl.col("load_phase").eq("search").fill_null(False) if "load_phase" in table.columns else pl.lit(False)
    ok = (
        as_pandas_types(table.select(*columns, "status", *(["load_phase"] if "load_phase" in table.columns else [])))
        .filter((pl.col("status") == "ok") & pl.col("output_tok_s").is_not_null() & ~probe)
        .filter(pl.all_horizontal(pl.col(keys).is_not_null()))
    )
    ends = ok.select(pl.struct(keys).rle().struct.field("len")).to_series().cum_sum().to_list()
    groups = [list(range(start, end)) for start, end in zip([0, *ends], ends, strict=False)]
    lists = {c: ok[c].to_list() for c in columns if c not in LIST_COLUMNS}
    (numbers, ends, valid), (means, ends_means, valid_means) = (_flat(ok[c]) for c in LIST_COLUMNS)
    if ends != ends_means or valid != valid_means:  # not as cell_parts makes them
        raise ValueError("round_numbers and round_means differ in length")
    # Each row's {round: mean} from the flat lists (the Series' to_list took 0.7 s per column at
    # 10,000 cells); a null list: {} (round_dict).
    lists["rounds"] = [
        ({numbers[a]: means[a]} if b - a == 1 else dict(zip(numbers[a:b], means[a:b], strict=True))) if v else {}
        for a, b, v in zip([0, *ends], ends, valid, strict=False)
    ]
    return groups, lists


def _flat(column: pl.Series) -> tuple[list, list[int], list[bool]]:
    """A list column as its values in one Python list, where each row ends in it, and which rows are not null."""
    array = column.to_arrow()
    offsets = array.offsets.to_numpy()
    # .values, not .flatten(), which leaves out what a null row spans and so shifts the ends
    values = array.values[offsets[0] : offsets[-1]].to_numpy(zero_copy_only=False).tolist() if len(array) else []
    return values, (offsets[1:] - offsets[0]).tolist(), array.is_valid().to_numpy(zero_copy_only=False).tolist()


def capacities(points: pd.DataFrame, baseline_name: str) -> pd.DataFrame:
    """Per machine and cell that ran a capacity search: its answer (cellbench.serving.outcome)
    from its probes pooled over rounds, each probe held when its mean SLO share over rounds
    reaches the search's slo_share (a probe whose requests all failed did not hold), and the
    ratio of its capacity to the baseline cell's on the same machine (same metric)."""
    columns = ["machine_id", "cell_id", "cell_name", "metric", "capacity", "bound", "reason", "slo", "slo_share",
               "probes", "vs_baseline"]  # fmt: skip
    if points.empty or "serve_json" not in points or points["serve_json"].isna().all():
        return pd.DataFrame(columns=columns)
    rows = []
    for (machine, cell_id), group in points[points["serve_json"].notna()].groupby(["machine_id", "cell_id"]):
        serve = json.loads(group["serve_json"].iloc[0])
        search = serve.get("search")
        if not search:
            continue
        probes_rows = group[group["load_phase"] == "search"]
        values = probes_rows["concurrency" if search["metric"] == "concurrency" else "request_rate"]
        measured = probes_rows[values.notna()]
        share = search["slo_share"]
        probes = [
            (float(load), row["status"] == "ok" and pd.notna(row["slo_share"]) and row["slo_share"] >= share)
            for load, row in zip(values[values.notna()], measured.to_dict("records"), strict=True)
        ]
        found = serving.outcome(probes, search)
        unfinished = probes_rows[values.isna() & (probes_rows["status"] != "ok")]
        if not unfinished.empty:
            error = unfinished["error"].dropna()
            found = {
                "capacity": None,
                "bound": "none",
                "reason": "search did not finish: " + (error.iloc[0] if not error.empty else "no error recorded"),
            }
        rows.append({"machine_id": machine, "cell_id": cell_id, "cell_name": group["cell_name"].iloc[0],
                     "metric": search["metric"], **found, "slo": serve["slo"], "slo_share": search["slo_share"],
                     "probes": len(probes)})  # fmt: skip
    table = pd.DataFrame(rows, columns=columns[:-1])
    base = table[table["cell_name"] == baseline_name][["machine_id", "metric", "capacity"]]
    table = table.merge(base.rename(columns={"capacity": "_base"}), on=["machine_id", "metric"], how="left")
    table["vs_baseline"] = [
        c / b if pd.notna(c) and pd.notna(b) and b else None
        for c, b in zip(table["capacity"], table["_base"], strict=True)
    ]
    return table.drop(columns="_base").sort_values(["machine_id", "cell_name"]).reset_index(drop=True)
