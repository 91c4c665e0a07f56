"""Per-cell diagnostics: what each cell's engine log says, which requested settings the engine
changed, and cells that measured the same thing as another; results/tables/diagnostics.md and
the report's diagnostics table.

Input is the point table of cellbench.aggregate (one row per machine x cell x point).
"""

from __future__ import annotations

import json

import pandas as pd

from .effective import label
from .tables import SEVERITY_MARK, Finding, Mark, Stack, Table


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


def override_words(override: dict) -> str:
    return f"{label(override['setting'])}: asked {override['requested']}, engine used {override['effective']}"


def findings_cell(entry: dict) -> Stack | str:
    """The error, the log's findings, the overrides and the same-as mark of one cell."""
    items = [Mark("strong", entry["error"])] if entry["error"] else []
    items += [Finding(f["severity"], f["finding"], f["remediation"], f["source"], f["line"]) for f in entry["findings"]]
    items += [f"↺ {override_words(o)}" for o in entry["overrides"]]
    if entry["same_as"]:
        items.append(Mark("same", f"= {entry['same_as']}"))
    return Stack(tuple(items)) if items else "nothing known found"


def table(entries: list[dict]) -> Table:
    found = Table(["machine", "cell", "status", "findings"])
    for e in entries:
        found.add([e["machine_id"], e["cell_name"], e["status"], findings_cell(e)], bad=e["status"] != "ok")
    return found


def diagnostics_markdown(entries: list[dict], study: str) -> str:
    out = [f"# cellbench — {study}: diagnostics", ""]
    out.append(
        "What each cell's engine log says (known signatures: `workflow/cellbench/data/signatures.yaml`), "
        "which requested settings the engine did not use as asked, and cells that measured the same "
        "thing as another cell."
    )
    if not entries:
        return "\n".join([*out, "", "No cell has run yet.", ""])
    out += ["", "## Per cell", "", table(entries).markdown()]
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
