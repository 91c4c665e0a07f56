"""Tables a person reads: results/tables/summary.{md,csv}."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import polars as pl

from . import aggregate
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


def summary_markdown(points: pd.DataFrame, fastest: pd.DataFrame, study: str, baseline_name: str) -> str:
    out = [f"# cellbench — {study}", ""]
    machines = sorted(points["machine_id"].unique()) if not points.empty else []
    cells = points.drop_duplicates(["machine_id", "cell_id"]) if not points.empty else points
    ok_cells = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    out.append(
        f"Machines: {', '.join(machines) or 'none'}. Cells: {len(cells)} ({ok_cells} ok). "
        f"Baseline: `{baseline_name}`. Figures are output tokens/s, mean over repeats."
    )
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
        rows = []
        for _, row in fastest.iterrows():
            margin = "only cell" if pd.isna(row["runner_up"]) else f"{_ratio(row['margin'])} {row['runner_up']}"
            rows.append(
                [
                    row["machine_id"],
                    _point(row),
                    f"**{row['fastest']}**",
                    _fmt(row["output_tok_s"]),
                    _ratio(row["vs_baseline"]),
                    margin,
                ]
            )
        out.append(
            markdown_table(
                ["machine", "batch × in→out", "fastest", "output tok/s", "× baseline", "ahead of runner-up by"],
                rows,
            )
        )
    out += ["", "## Every cell and point", ""]
    shown, cut = listed(points, "cell points")
    rows = []
    for row in shown.to_dict("records"):  # iterrows builds a Series per row: minutes at 10,000 cells
        rows.append(
            [
                row["machine_id"],
                row["cell_name"],
                row["status"],
                _point(row),
                _fmt(row["output_tok_s"]),
                _spread(row),
                _ratio(row["vs_baseline"]),
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
                "min–max, CV",
                "× baseline",
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
        f"⚠ marks a point whose repeats vary by more than {aggregate.CV_FLAG:.0%} (coefficient of variation).",
        "Per-repeat rows with full provenance: `results/summary.parquet`; per cell: `results/cells/<cell_id>/`.",
        "",
    ]
    return "\n".join(out)


def csv_text(frame: pd.DataFrame) -> str:
    """A table as CSV (polars writes it ten times faster than pandas at 200,000 rows)."""
    return pl.from_pandas(frame).write_csv()


def write_tables(points: pd.DataFrame, study: str, baseline_name: str, tables_dir: Path) -> list[Path]:
    fastest = aggregate.fastest_per_point(points) if not points.empty else pd.DataFrame()
    md = tables_dir / "summary.md"
    csv = tables_dir / "summary.csv"
    write_text_atomic(md, summary_markdown(points, fastest, study, baseline_name))
    write_text_atomic(csv, csv_text(points.drop(columns=["effective_json"], errors="ignore")))
    return [md, csv]
