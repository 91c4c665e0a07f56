"""Results that explain themselves: per-cell diagnostics, verdicts, ratios in words, roofline.

Input is the point table of cellbench.aggregate (one row per machine x cell x point); output is
data (lists of dicts, DataFrames) and the Markdown tables results/tables/{diagnostics,verdicts}.md.
"""

from __future__ import annotations

import json

import pandas as pd

from . import roofline
from .effective import label
from .report import _fmt, _point, markdown_table

SEVERITY_MARK = {"error": "⛔", "warning": "⚠", "info": "ℹ"}


def _json_list(value) -> list:
    return json.loads(value) if isinstance(value, str) else []


def cells(points: pd.DataFrame) -> list[dict]:
    """One entry per machine x cell: status, error, findings, overrides and the same-as mark."""
    if points.empty:
        return []
    found = []
    for (machine, name), group in points.groupby(["machine_id", "cell_name"], sort=True):
        first = group.iloc[0]
        worst = next((s for s in ("timeout", "unsupported", "failed") if (group["status"] == s).any()), "ok")
        found.append(
            {
                "machine_id": machine,
                "cell_name": name,
                "cell_id": first["cell_id"],
                "status": worst,
                "error": first["error"] if worst != "ok" else None,
                "findings": _json_list(first.get("findings_json")),
                "overrides": _json_list(first.get("overrides_json")),
                "same_as": first.get("same_as") if isinstance(first.get("same_as"), str) else None,
                "engine_ran": first["engine_ran"],
            }
        )
    return found


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


def override_words(override: dict) -> str:
    return f"{label(override['setting'])}: asked {override['requested']}, engine used {override['effective']}"


def measured_text(verdict: dict) -> str:
    """The measured figure, or why there is none (the point failed, timed out...)."""
    if verdict.get("status") not in (None, "ok"):
        return verdict["status"]
    return _fmt(verdict.get("measured"), ".2f")


def diagnostics_markdown(entries: list[dict], study: str) -> str:
    out = [f"# cellbench — {study}: diagnostics", ""]
    out.append(
        "What each cell's engine log says (known signatures: `workflow/cellbench/data/signatures.yaml`), "
        "which requested settings the engine did not use as asked, and cells that measured the same "
        "thing as another cell."
    )
    if not entries:
        return "\n".join([*out, "", "No cell has run yet.", ""])
    rows = []
    for e in entries:
        what = [f"**{e['error']}**"] if e["error"] else []
        what += [f"{SEVERITY_MARK[f['severity']]} {f['finding']}" for f in e["findings"]]
        what += [f"↺ {override_words(o)}" for o in e["overrides"]]
        if e["same_as"]:
            what.append(f"= {e['same_as']}")
        rows.append([e["machine_id"], e["cell_name"], e["status"], "<br>".join(what) or "nothing known found"])
    out += ["", "## Per cell", "", markdown_table(["machine", "cell", "status", "findings"], rows)]
    seen = {}
    for e in entries:
        for f in e["findings"]:
            seen.setdefault(f["id"], {**f, "cells": []})["cells"].append(e["cell_name"])
    if seen:
        out += ["", "## What to do", ""]
        for f in seen.values():
            cells_text = ", ".join(sorted(set(f["cells"])))
            out += [
                f"### {SEVERITY_MARK[f['severity']]} {f['id']} ({cells_text})",
                "",
                f"{f['finding']}",
                "",
                f"- **Remediation:** {f['remediation']}",
                f"- **Log line:** `{f['line']}`" + (f" (×{f['count']})" if f["count"] > 1 else ""),
                f"- **Source:** {f['source']}",
                "",
            ]
    out += ["", "↺ a requested setting the engine changed; = same effective settings as another cell.", ""]
    return "\n".join(out)


def verdicts_markdown(verdicts: list[dict], sentences: list[str], points: pd.DataFrame, study: str) -> str:
    out = [f"# cellbench — {study}: verdicts", ""]
    out += ["## Expectations", ""]
    if verdicts:
        rows = [
            [
                v["verdict"],
                v["machine_id"],
                v["cell_name"],
                _point(v) if "batch_size" in v else "—",
                v["metric"],
                measured_text(v),
                f"{_fmt(v['min'], 'g', '…')}–{_fmt(v['max'], 'g', '…')}",
                v["source"],
            ]
            for v in verdicts
        ]
        out.append(
            markdown_table(["", "machine", "cell", "batch × in→out", "metric", "measured", "expected", "source"], rows)
        )
    else:
        out.append("The study declares no expectations (`expectations:` in the study file).")
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
        rows = [
            [
                r["machine_id"],
                r["cell_name"],
                _point(r),
                _fmt(r["weight_bytes"] / 1e6, ".0f"),
                _fmt(r["tpot_p50_s"] * 1e3, ".2f"),
                _fmt(r["bandwidth_gb_s"], "g"),
                f"{r['bound_fraction']:.1%}",
            ]
            for _, r in known.iterrows()
        ]
        out.append(
            markdown_table(
                ["machine", "cell", "batch × in→out", "weights MB", "TPOT p50 ms", "bandwidth GB/s", "of bound"], rows
            )
        )
        out += [
            "",
            "*of bound* = weight bytes / (TPOT × bandwidth): every decode step reads all weights once for the "
            "whole batch (KV cache and activations left out, so it understates the traffic).",
        ]
    out.append("")
    return "\n".join(out)
