"""Runs of a study on one machine, kept side by side, and `cellbench compare RUN_A RUN_B`.

A run is a snapshot of this machine's rows taken when the tables were aggregated and the rows
had changed (`results/runs/<stamp>.parquet`), so "did the new image make it faster?" keeps the
"before" after the cells were rerun. Like pyperf's compare_to, a change is stated with its
interval and called significant only when that interval excludes 1. Rounds of two runs did not
run side by side, so the ratio is unpaired (Welch's t on log round means).
"""

from __future__ import annotations

import glob
import re
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import polars as pl

from . import aggregate, atomic, metrics, paths, stats
from .aggregate import POINT
from .tables import fmt

RUN_ID = re.compile(r"\d{8}T\d{6}Z")


class CompareError(ValueError):
    """Runs that cannot be compared; the message is one line."""


def snapshot(summary: Path, machine_id: str, runs: Path | None = None) -> Path | None:
    """Keep this machine's rows of `summary` as a new run when they differ from the newest run's
    (by the set of round executions, `run_id`); return its path, or None when nothing changed."""
    runs = runs or paths.runs_dir()
    rows = pl.scan_parquet(summary).filter(pl.col("machine_id") == machine_id)
    executions = set(rows.select("run_id").unique().collect()["run_id"].to_list())
    if not executions:
        return None
    known = sorted(glob.glob(str(runs / "*.parquet")))
    if known:
        last = set(pl.scan_parquet(known[-1]).select("run_id").unique().collect()["run_id"].to_list())
        if last == executions:
            return None
    out = runs / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.parquet"
    atomic.write_with(out, lambda tmp: rows.sink_parquet(tmp))
    return out


def list_runs(runs: Path | None = None) -> list[str]:
    runs = runs or paths.runs_dir()
    return sorted(Path(p).stem for p in glob.glob(str(runs / "*.parquet")) if RUN_ID.fullmatch(Path(p).stem))


def locate(ref: str, runs: Path | None = None) -> Path:
    """A run id of results/runs/, a metrics/summary Parquet file, or a results folder."""
    runs = runs or paths.runs_dir()
    path = Path(ref)
    if RUN_ID.fullmatch(ref):
        found = runs / f"{ref}.parquet"
        if found.is_file():
            return found
    elif path.is_file():
        return path
    elif paths.summary(path).is_file():
        return paths.summary(path)
    elif (path / paths.summary()).is_file():
        return path / paths.summary()
    known = ", ".join(list_runs(runs)[-5:]) or "none yet"
    raise CompareError(f"{ref}: no such run (runs here: {known}; or give a summary.parquet or a results folder)")


def load(ref: str, runs: Path | None = None) -> pd.DataFrame:
    path = locate(ref, runs)
    try:
        frame = metrics.scan_metrics([path])
        return aggregate.cell_points(frame, baseline_id="")
    except (metrics.SchemaError, pl.exceptions.PolarsError, OSError) as exc:
        raise CompareError(f"{ref}: {str(exc).splitlines()[0]}") from None


def compare(a: pd.DataFrame, b: pd.DataFrame, confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """Per machine, cell and point measured in both: B / A with its interval and significance."""
    # Not schema_version: a schema version only adds columns, null in older rows (metrics.COLUMN_HISTORY).
    for column, what in (("study", "studies"), ("method_version", "method versions")):
        found_a, found_b = set(a[column].dropna()), set(b[column].dropna())
        if found_a and found_b and found_a != found_b:
            raise CompareError(f"runs of different {what} ({', '.join(map(str, sorted(found_a)))} vs "
                               f"{', '.join(map(str, sorted(found_b)))}): not comparable")  # fmt: skip
    key = ["machine_id", "cell_id", *POINT]
    ok_a = a[a["status"] == "ok"].set_index(key)
    ok_b = b[b["status"] == "ok"].set_index(key)
    rows = []
    for index in ok_a.index.intersection(ok_b.index):
        row_a, row_b = ok_a.loc[index], ok_b.loc[index]
        interval = stats.ratio_interval(
            aggregate.round_dict(row_b), aggregate.round_dict(row_a), confidence, paired=False
        )
        rows.append(
            {
                **dict(zip(key, index, strict=True)),
                "cell_name": row_a["cell_name"],
                "a_tok_s": row_a["output_tok_s"], "a_low": row_a["output_tok_s_low"],
                "a_high": row_a["output_tok_s_high"], "a_rounds": row_a["rounds"],
                "b_tok_s": row_b["output_tok_s"], "b_low": row_b["output_tok_s_low"],
                "b_high": row_b["output_tok_s_high"], "b_rounds": row_b["rounds"],
                "ratio": None if interval is None else interval.estimate,
                "ratio_low": None if interval is None else interval.low,
                "ratio_high": None if interval is None else interval.high,
                "significance": stats.significance(interval),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def render(table: pd.DataFrame, name_a: str, name_b: str, confidence: float) -> str:
    """pyperf compare_to's shape: one line per cell and point, the change and whether it is significant."""
    if table.empty:
        return f"{name_a} and {name_b} share no measured cell and point"
    lines = [
        f"B / A output tok/s, {confidence:.0%} interval over rounds (Welch, log scale). A = {name_a}, B = {name_b}"
    ]
    for _, r in table.sort_values(["machine_id", "cell_name", *POINT]).iterrows():
        point = f"{r['batch_size']}×{r['input_len']}→{r['output_len']}"
        if r.get("load_point"):  # a serve load level: 'sweep:concurrency=4'
            point = f"{r['load_point']} {r['input_len']}→{r['output_len']}"
        a = f"{fmt(r['a_tok_s'])} [{fmt(r['a_low'])}, {fmt(r['a_high'])}]"
        b = f"{fmt(r['b_tok_s'])} [{fmt(r['b_low'])}, {fmt(r['b_high'])}]"
        if r["significance"] == "unknown":
            change = f"{fmt(r['ratio'], '.2f')}×: no interval (fewer than 2 rounds on a side)"
        else:
            interval = f"{fmt(r['ratio'], '.2f')}× [{fmt(r['ratio_low'], '.2f')}, {fmt(r['ratio_high'], '.2f')}]"
            change = {
                "faster": f"{interval} faster: significant",
                "slower": f"{interval} slower: significant",
                "same": f"{interval}: not significant",
            }[r["significance"]]
        lines.append(f"{r['machine_id']} {r['cell_name']} {point}: {a} -> {b} tok/s: {change}")
    changed = int(table["significance"].isin(["faster", "slower"]).sum())
    lines.append(f"{changed} of {len(table)} cell points changed significantly")
    return "\n".join(lines)
