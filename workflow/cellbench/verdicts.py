"""results/tables/verdicts.md and the report's verdict table: each expectation's ✅/❌ at the
points it matches, ratios to the baseline in words, and decode against the bandwidth bound.

Input is the point table of cellbench.aggregate (one row per machine x cell x point) and the
verdicts of cellbench.expectations.
"""

from __future__ import annotations

import pandas as pd

from . import quality, report, roofline
from .expectations import FAIL, PASS
from .tables import Mark, Table, fmt, fmt_point


def with_roofline(points: pd.DataFrame, study_table: dict[str, float]) -> pd.DataFrame:
    """Points with the device bandwidth, the decode bound and the fraction of it reached."""
    points = points.copy()
    found = points["device_name"].map(lambda name: roofline.bandwidth(name, study_table))
    points["bandwidth_gb_s"] = found.map(lambda f: f[0] if f else None)
    points["bandwidth_source"] = found.map(lambda f: f[1] if f else None)
    points["bound_fraction"] = [
        roofline.decode_fraction(w if pd.notna(w) else None, t if pd.notna(t) else None, b)
        for w, t, b in zip(points["weight_bytes"], points["tpot_p50_s"], points["bandwidth_gb_s"], strict=True)
    ]
    return points


def measured_text(verdict: dict) -> str:
    """The measured figure, or why there is none (the point failed, timed out...)."""
    if verdict.get("status") not in (None, "ok"):
        return verdict["status"]
    return fmt(verdict.get("measured"), ".2f")


def verdict_table(verdicts: list[dict]) -> Table:
    """One row per verdict: ✅ or ❌ (or not measured), where, the figure and the expected range."""
    table = Table(
        ["", "machine", "cell", "batch × in→out", "metric", "measured", "expected", "source"], numeric=frozenset({5})
    )
    for v in verdicts:
        mark = {PASS: Mark("pass", PASS), FAIL: Mark("fail", FAIL)}.get(v["verdict"], v["verdict"])
        table.add(
            [
                mark,
                v["machine_id"],
                v["cell_name"],
                fmt_point(v) if "batch_size" in v else "—",
                v["metric"],
                measured_text(v),
                f"{fmt(v['min'], 'g', '…')}–{fmt(v['max'], 'g', '…')}",
                v["source"],
            ],
            bad=v["verdict"] != PASS,
        )
    return table


def roofline_table(known: pd.DataFrame) -> Table:
    """Points with a known bound: weights, TPOT, bandwidth and the fraction of the bound reached."""
    table = Table(
        ["machine", "cell", "batch × in→out", "weights MB", "TPOT p50 ms", "bandwidth GB/s", "of bound"],
        numeric=frozenset(range(3, 7)),
    )
    for _, r in known.iterrows():
        table.add(
            [
                r["machine_id"],
                r["cell_name"],
                fmt_point(r),
                fmt(r["weight_bytes"] / 1e6, ".0f"),
                fmt(r["tpot_p50_s"] * 1e3, ".2f"),
                fmt(r["bandwidth_gb_s"], "g"),
                f"{r['bound_fraction']:.1%}",
            ]
        )
    return table


def verdicts_markdown(
    verdicts: list[dict], sentences: list[str], points: pd.DataFrame, study: str, tolerance: dict | None = None
) -> str:
    out = [f"# cellbench — {study}: verdicts", ""]
    out += ["## Expectations", ""]
    if verdicts:
        out.append(verdict_table(verdicts).markdown())
    else:
        out.append("The study declares no expectations (`expectations:` in the study file).")
    out += report.quality_markdown(points, quality.tolerance({"quality_tolerance": tolerance}))
    out += ["", "## Ratios to the baseline", ""]
    out += [f"- {s}." for s in sentences] or ["No cell besides the baseline was measured."]
    out += ["", "## Decode against the memory-bandwidth bound", ""]
    known = points[points["bound_fraction"].notna()] if not points.empty else points
    if known.empty:
        out.append(
            "No point has a known device bandwidth and a measured TPOT: give the device's bandwidth in the "
            "study (`bandwidth_gb_s: {device-name regex: GB/s}`) to see this table."
        )
    else:
        out.append(roofline_table(known).markdown())
        out += [
            "",
            "*of bound* = weight bytes / (TPOT × bandwidth): every decode step reads all weights once for the "
            "whole batch (KV cache and activations left out, so it understates the traffic).",
        ]
    out.append("")
    return "\n".join(out)
