"""Tables a person reads: results/tables/summary.{md,csv}."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import polars as pl

from . import aggregate, paths
from .metrics import write_text_atomic

# Rows of one markdown table a person can read; beyond, the table shows the first ones and says
# where all of them are (summary.csv and summary.parquet have every row at any size).
LISTED_ROWS = 2000


def listed(frame: pd.DataFrame, what: str, where: str = "`summary.csv`") -> tuple[pd.DataFrame, list[str]]:
    """The first LISTED_ROWS rows of `frame`, and the line to print under the table if cut."""
    if len(frame) <= LISTED_ROWS:
        return frame, []
    return frame.head(LISTED_ROWS), ["", f"The first {LISTED_ROWS:,} of {len(frame):,} {what}; all are in {where}."]


def _fmt(value, spec: str = ".1f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return missing
    return format(value, spec)


def _ratio(value) -> str:
    return _fmt(value, ".2f") + "×" if value is not None and not pd.isna(value) else "—"


def _point(row) -> str:
    return f"{row['batch_size']} × {row['input_len']}→{row['output_len']}"


def _spread(row) -> str:
    if not row["repeats"]:
        return "—"
    text = f"{_fmt(row['output_tok_s_min'])}–{_fmt(row['output_tok_s_max'])}, CV {row['output_tok_s_cv']:.1%}"
    return text + (" ⚠" if row["cv_flag"] else "")


def _interval(row, low: str, high: str, spec: str = ".1f") -> str:
    if pd.isna(row.get(low)):
        return "—"
    return f"[{_fmt(row[low], spec)}, {_fmt(row[high], spec)}]"


def _rounds(row) -> str:
    """'3/3', or '2/3 (1 flagged)': rounds in the figures / rounds run."""
    used, total = int(row.get("rounds") or 0) if pd.notna(row.get("rounds")) else 0, row.get("rounds_total")
    text = f"{used}/{int(total)}" if pd.notna(total) else "—"
    notes = []
    if row.get("rounds_flagged"):
        notes.append(f"{int(row['rounds_flagged'])} flagged")
    if row.get("rounds_failed"):
        notes.append(f"{int(row['rounds_failed'])} failed")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _round_spread(row) -> str:
    """Between-round CV / within-round CV (repeats inside one engine load agree more closely)."""
    between, within = row.get("between_cv"), row.get("within_cv")
    if pd.isna(between) and pd.isna(within):
        return "—"
    return f"{_fmt(between, '.1%')} / {_fmt(within, '.1%')}"


def ratio_text(row, column: str = "vs_baseline", significance: str = "vs_baseline_significance") -> str:
    """'0.52× [0.50, 0.54]', '≈ 1.01× [0.97, 1.05]' (interval holds 1: no significant difference),
    or '1.01× (no interval)' with fewer than 2 rounds; `column`, `column`_low/_high hold the ratio."""
    value = row.get(column)
    if value is None or pd.isna(value):
        return "—"
    mark = row.get(significance)
    if mark == "unknown" or pd.isna(row.get(f"{column}_low")):
        return f"{_ratio(value)} (no interval)"
    interval = f"{_ratio(value)} [{_fmt(row[f'{column}_low'], '.2f')}, {_fmt(row[f'{column}_high'], '.2f')}]"
    return f"≈ {interval}" if mark == "same" else interval


def busy_cells(cells: pd.DataFrame, cores: int | None = None) -> list[str]:
    """Cells measured while the host was oversubscribed (load average above its core count)."""
    if cells.empty or "host_load_max" not in cells:
        return []
    cores = cores or os.cpu_count()
    return sorted(cells.loc[cells["host_load_max"] > cores, "cell_name"].unique())


def _latency(row) -> str:
    """Median request latency with the CV of its repeats (⚠ above the flag)."""
    if pd.isna(row["latency_p50_s"]):
        return "—"
    text = f"{row['latency_p50_s']:.3f} ±{row['latency_p50_s_cv']:.1%}"
    return text + (" ⚠" if row["latency_cv_flag"] else "")


def serving_markdown(points: pd.DataFrame) -> list[str]:
    """Serve-mode points: TTFT, TPOT, ITL and E2E latency (means over repeats of each percentile)."""
    if "itl_p50_s" not in points or points["itl_p50_s"].isna().all():
        return []
    served, cut = listed(points[points["itl_p50_s"].notna()], "served points")
    rows = [
        [r["machine_id"], r["cell_name"], _point(r)]
        + [_fmt(r[c] * 1000, ".1f") for c in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                                              "itl_p50_s", "itl_p99_s", "latency_p50_s", "latency_p99_s")]
        for _, r in served.iterrows()
    ]  # fmt: skip
    headers = ["machine", "cell", "batch × in→out", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
               "ITL p50", "ITL p99", "E2E p50", "E2E p99"]  # fmt: skip
    return ["", "## Serving latency (ms, vLLM's definitions)", "", markdown_table(headers, rows), *cut]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


MIN_ROUNDS = 2  # an interval needs two rounds; fewer and no verdict is stated


def withheld(points: pd.DataFrame) -> dict[str, str]:
    """Per machine whose verdicts are withheld, why and what to do: some measured point has fewer
    than MIN_ROUNDS trusted rounds, so no interval and no verdict can be stated as fact."""
    if points.empty:
        return {}
    reasons = {}
    for machine, group in _compared_ok(points).groupby("machine_id", sort=True):
        short = group[group["rounds"].fillna(0) < MIN_ROUNDS]
        if short.empty:
            continue
        cells = group.drop_duplicates("cell_id")
        flagged, total = int(cells["rounds_flagged"].sum()), int(cells["rounds_total"].max())
        why = f"{len(short)} of {len(group)} measured points have fewer than {MIN_ROUNDS} trusted rounds"
        if flagged:
            why += f" ({flagged} round(s) flagged: {cells['round_flag'].dropna().iloc[0]})"
        todo = (
            "quiet the host (`cellbench doctor` lists what disturbs it) and rerun"
            if flagged
            else f"add rounds (`sweep.rounds`, now {total}: each is a fresh engine load)"
        )
        reasons[machine] = f"{why}; {todo}"
    return reasons


def host_lines(points: pd.DataFrame) -> list[str]:
    """Flagged rounds and each machine's canary: is the host fit to be measured right now?"""
    if points.empty or "canary_matmul_1t_gflops" not in points:
        return []
    out = []
    cells = points.drop_duplicates(["machine_id", "cell_id"])
    for machine, group in cells.groupby("machine_id", sort=True):
        flagged = group[group["rounds_flagged"] > 0]
        canary = group["canary_matmul_1t_gflops"].median()
        memcpy = group["canary_memcpy_gb_s"].median()
        line = f"- **{machine}**: canary {_fmt(canary)} GFLOP/s matmul (1 thread), {_fmt(memcpy)} GB/s memcpy"
        if flagged.empty:
            line += "; no round flagged."
        else:
            names = ", ".join(
                f"{r['cell_name']} ({int(r['rounds_flagged'])}: {r['round_flag']})" for _, r in flagged.iterrows()
            )
            line += f"; flagged rounds, left out of the figures: {names}."
        out.append(line)
    return ["", "## Host", "", *out]


def _compared_ok(points: pd.DataFrame) -> pd.DataFrame:
    """The ok rows at points where two or more cells were measured. One measured cell at a point
    is no comparison: nothing there can flip, so nothing there is withheld."""
    ok = points[points["status"] == "ok"]
    return ok[ok.groupby(["machine_id", *aggregate.POINT])["cell_id"].transform("nunique") > 1]


def short_points(points: pd.DataFrame) -> set[tuple]:
    """(machine, batch, input, output) of every point where a measured cell has fewer than
    MIN_ROUNDS trusted rounds: no verdict is stated there."""
    ok = _compared_ok(points)
    ok = ok[ok["rounds"].fillna(0) < MIN_ROUNDS]
    return set(ok[["machine_id", "batch_size", "input_len", "output_len"]].itertuples(index=False, name=None))


def _fastest_rows(fastest: pd.DataFrame, short: set[tuple]) -> list[list[str]]:
    rows = []
    for _, row in fastest.iterrows():
        if (row["machine_id"], row["batch_size"], row["input_len"], row["output_len"]) in short:
            rows.append([row["machine_id"], _point(row), "withheld (see above)", "—", "—", "—"])
            continue
        if isinstance(row["fastest"], str):
            name = f"**{row['fastest']}**"
            margin = "only cell"
            if isinstance(row["runner_up"], str):
                interval = f"[{_fmt(row['margin_low'], '.2f')}, {_fmt(row['margin_high'], '.2f')}]"
                margin = f"{_ratio(row['margin'])} {interval} {row['runner_up']}"
        else:
            name = "tie: " + ", ".join(row["tied"])
            margin = "≈ no significant difference"
        rows.append(
            [row["machine_id"], _point(row), name, _fmt(row["output_tok_s"]), _ratio(row["vs_baseline"]), margin]
        )
    return rows


def summary_markdown(
    points: pd.DataFrame, fastest: pd.DataFrame, study: str, baseline_name: str, confidence: float = 0.95
) -> str:
    out = [f"# cellbench — {study}", ""]
    machines = sorted(points["machine_id"].unique()) if not points.empty else []
    cells = points.drop_duplicates(["machine_id", "cell_id"]) if not points.empty else points
    ok_cells = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    out.append(
        f"Machines: {', '.join(machines) or 'none'}. Cells: {len(cells)} ({ok_cells} ok). "
        f"Baseline: `{baseline_name}`. Figures are output tokens/s: the mean over rounds (each round a "
        f"fresh container and engine load) of the mean over repeats, with its {confidence:.0%} interval "
        "over rounds."
    )
    withheld_on = withheld(points)
    for machine, reason in withheld_on.items():
        out += [
            "",
            f"⚠ **Verdicts withheld on {machine}**: {reason}. At those points no cell is named fastest "
            "and no ratio is stated as a difference until then.",
        ]
    busy = busy_cells(cells)
    if busy:
        out += [
            "",
            f"⚠ {len(busy)} cell(s) ran while the host's load average exceeded its {os.cpu_count()} cores "
            f"({', '.join(busy)}): other work shared the CPU, so their figures are lower and noisier than "
            "on a quiet machine.",
        ]
    out += ["", "## Fastest configuration at each point", ""]
    if fastest.empty:
        out.append("No point was measured successfully.")
    else:
        out.append(
            "A cell is named fastest only when it is significantly faster than the runner-up (the "
            f"{confidence:.0%} interval of their ratio, paired by round, lies above 1); otherwise the "
            "cells not significantly slower than the best are listed as a tie."
        )
        out.append("")
        headers = ["machine", "batch × in→out", "fastest", "output tok/s", "× baseline", "ahead of runner-up by"]
        out.append(markdown_table(headers, _fastest_rows(fastest, short_points(points) if not points.empty else set())))
    out += host_lines(points)
    out += ["", "## Every cell and point", ""]
    shown, cut = listed(points, "cell points")
    rows = []
    for row in shown.to_dict("records"):  # iterrows builds a Series per row: minutes at 10,000 cells
        ratio = "baseline" if row["cell_name"] == baseline_name else ratio_text(row)
        rows.append(
            [
                row["machine_id"],
                row["cell_name"],
                row["status"],
                _point(row),
                _fmt(row["output_tok_s"]),
                _interval(row, "output_tok_s_low", "output_tok_s_high"),
                _rounds(row),
                _round_spread(row),
                _spread(row),
                ratio,
                _latency(row),
                _fmt(row["load_s"]),
                row["engine_ran"] + (f" ⚠ {row['same_as']}" if isinstance(row.get("same_as"), str) else ""),
            ]
        )
    out.append(
        markdown_table(
            [
                "machine",
                "cell",
                "status",
                "batch × in→out",
                "output tok/s",
                f"{confidence:.0%} interval",
                "rounds",
                "CV between / within rounds",
                "repeats min–max, CV",
                "× baseline [interval]",
                "p50 latency s ±CV",
                "load s",
                "engine actually ran",
            ],  # fmt: skip
            rows,
        )
    )
    out += cut
    out += serving_markdown(points)
    failed = cells[cells["status"] != "ok"] if not cells.empty else cells
    if not failed.empty:
        out += ["", "## Cells that did not finish", ""]
        failed, cut = listed(failed, "cells that did not finish")
        out.append(
            markdown_table(
                ["machine", "cell", "status", "error"],
                [[r["machine_id"], r["cell_name"], r["status"], r["error"] or ""] for _, r in failed.iterrows()],
            )
        )
        out += cut
    out += [
        "",
        "≈ marks a ratio whose interval contains 1: no significant difference. A round is flagged when "
        "other processes used CPU during its measurements or its host canary was off the machine's median; "
        "flagged rounds stay in `summary.parquet` but not in the figures.",
        f"⚠ marks a point whose repeats vary by more than {aggregate.CV_FLAG:.0%} (coefficient of variation); "
        "repeats share one engine load, so their spread understates a rerun's: the interval is over rounds.",
        f"Per-repeat rows with full provenance: `{paths.summary()}`; per round: "
        f"`{paths.round_dir('<cell_id>', '<k>')}/`.",
        "",
    ]
    return "\n".join(out)


def csv_text(frame: pd.DataFrame) -> str:
    """A table as CSV (polars writes it ten times faster than pandas at 200,000 rows)."""
    return pl.from_pandas(frame).write_csv()


def write_tables(
    points: pd.DataFrame, study: str, baseline_name: str, tables_dir: Path, confidence: float = 0.95
) -> list[Path]:
    fastest = aggregate.fastest_per_point(points, confidence) if not points.empty else pd.DataFrame()
    md = paths.summary_markdown(tables_dir)
    csv = paths.summary_csv(tables_dir)
    write_text_atomic(md, summary_markdown(points, fastest, study, baseline_name, confidence))
    dropped = ["effective_json", *aggregate.LIST_COLUMNS]
    write_text_atomic(csv, csv_text(points.drop(columns=dropped, errors="ignore")))
    return [md, csv]
