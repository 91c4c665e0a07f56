"""Cross-machine comparison: the same cell at the same point, measured on several machines.

A cell id is the same on every machine (its hash covers only what is measured), so rows match
by (cell_id, point). Ratios are taken against a reference machine: this machine when it
measured the cell, else the first other one. Rows of a different method_version are shown but
not compared, with the reason; so are failed points. A different schema_version is compared: a
schema version only adds columns (metrics.COLUMN_HISTORY), which read as null where missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import atomic, contract, paths, report, stats
from .aggregate import POINT
from .tables import Table, fmt, fmt_point, fmt_ratio, listed, ratio_text

MATCH = ["cell_id", *POINT]
VERSIONS = ("schema_version", "method_version")
NOT_COMPARABLE = ("method_version",)  # how a figure is measured; a schema version only adds columns
COMPARED = [
    *MATCH, "cell_name", "machine_id", "reference_machine", "device_name", "status", "output_tok_s",
    "vs_reference", "vs_reference_low", "vs_reference_high", "significance", "compared", "note", *VERSIONS,
]  # fmt: skip


def device_text(rows: pd.DataFrame) -> str:
    """'NVIDIA H200 (sm_90)': each device a machine's rows ran on, with its GPU architecture."""
    names = set()
    for name, arch in rows[["device_name", "device_arch"]].drop_duplicates().itertuples(index=False):
        if isinstance(name, str):
            names.add(f"{name} ({arch})" if isinstance(arch, str) else name)
    return ", ".join(sorted(names)) or "—"


# Where imported metrics files are found (paths, so that the Snakefile need not import this
# module and pandas with it).
imported_metrics = paths.imported_metrics
newest_per_machine_cell = paths.newest_per_machine_cell


def machine_order(machines, local: str) -> list[str]:
    """This machine first, then the others by name."""
    machines = set(machines)
    return ([local] if local in machines else []) + sorted(machines - {local})


def compare(points: pd.DataFrame, local: str, confidence: float = stats.DEFAULT_CONFIDENCE) -> pd.DataFrame:
    """One row per machine x matching (cell, point) measured on at least two machines, with the
    ratio of output tok/s to the reference machine, or the reason it is not compared."""
    if points.empty:
        return pd.DataFrame(columns=COMPARED)
    rank = {machine: index for index, machine in enumerate(machine_order(points["machine_id"].unique(), local))}
    shared = points[points.groupby(MATCH)["machine_id"].transform("nunique") >= 2]
    if shared.empty:
        return pd.DataFrame(columns=COMPARED)
    shared = shared.assign(_rank=shared["machine_id"].map(rank)).sort_values([*MATCH, "_rank"])
    # The reference of a (cell, point) is its best-ranked machine: the first row after the sort.
    ref = shared.groupby(MATCH, sort=False)[["machine_id", "status", "output_tok_s", *VERSIONS]].transform("first")
    ratio, note = _versus(shared, ref)
    out = shared.assign(reference_machine=ref["machine_id"], vs_reference=ratio, compared=ratio.notna(), note=note)
    out = _with_intervals(out, confidence)
    return out[COMPARED].reset_index(drop=True)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _with_intervals(rows: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """Each compared ratio's interval over rounds (two machines' rounds did not run side by side,
    so it is unpaired: Welch on log round means; "≈" when it contains 1), and the engine packages
    whose version differs from the reference machine's row, added to its note."""
    from . import aggregate

    records = rows.to_dict("records")
    by_key = {(r["machine_id"], *(r[k] for k in MATCH)): r for r in records}
    lows, highs, marks, notes = [], [], [], []
    for r in records:
        ref = by_key.get((r["reference_machine"], *(r[k] for k in MATCH)), {})
        interval = None
        if r["compared"] and r["machine_id"] != r["reference_machine"]:
            interval = stats.ratio_interval(
                aggregate.round_dict(r), aggregate.round_dict(ref), confidence, paired=False
            )
        lows.append(None if interval is None else interval.low)
        highs.append(None if interval is None else interval.high)
        marks.append(stats.significance(interval) if r["compared"] else "unknown")
        mine, theirs = _versions(r.get("versions_json")), _versions(ref.get("versions_json"))
        differ = [
            f"{p} {mine[p]} vs {theirs[p]}"
            for p in contract.PACKAGES
            if p in mine and p in theirs and mine[p] != theirs[p]
        ]
        notes.append(_join(r["note"], f"⚠ versions differ: {', '.join(differ)}" if differ else ""))
    return rows.assign(vs_reference_low=lows, vs_reference_high=highs, significance=marks, note=notes)


def _versions(value) -> dict:
    return json.loads(value) if isinstance(value, str) else {}


def _versus(rows: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row, its ratio to its reference row and a note; the first reason not to compare wins."""
    reasons = [
        (rows[version] != ref[version], f"not compared: {version} " + rows[version].astype(str) + " vs "
         + ref[version].astype(str) + " on " + ref["machine_id"].astype(str))
        for version in NOT_COMPARABLE
    ]  # fmt: skip
    reasons += [
        ((rows["status"] != "ok") | rows["output_tok_s"].isna(),
         "not compared: " + rows["status"].astype(str) + " on " + rows["machine_id"].astype(str)),
        ((ref["status"] != "ok") | ref["output_tok_s"].isna() | (ref["output_tok_s"] == 0),
         "not compared: " + ref["status"].astype(str) + " on reference " + ref["machine_id"].astype(str)),
    ]  # fmt: skip
    note = pd.Series("", index=rows.index, dtype=object)
    refused = pd.Series(False, index=rows.index)
    for applies, text in reasons:
        note[applies & ~refused] = text[applies & ~refused]
        refused |= applies
    is_reference = ~refused & (rows["machine_id"] == ref["machine_id"])
    note[is_reference] = "reference"
    ratio = (rows["output_tok_s"] / ref["output_tok_s"]).astype(float).mask(refused).mask(is_reference, 1.0)
    return ratio, note


# The points' columns machines_markdown reads: a mask over all of them copies every column (0.4 s at 10,000 cells).
MARKDOWN_COLUMNS = ["machine_id", "device_name", "device_arch", "canary_matmul_1t_gflops", *VERSIONS, *MATCH]


def machines_markdown(points: pd.DataFrame, compared: pd.DataFrame, local: str) -> str:
    out = ["# cellbench — machines", ""]
    points = points[[c for c in dict.fromkeys(MARKDOWN_COLUMNS) if c in points]]
    order = machine_order(points["machine_id"].unique(), local) if not points.empty else []
    if len(order) < 2:
        out.append(
            f"Only one machine ({', '.join(order) or 'none'}) has results. Import an archive from another "
            "machine (`cellbench import FILE`), then `snakemake --cores 1` to compare."
        )
        return "\n".join(out) + "\n"
    out.append(
        "Output tokens/s of the same cell (same cell id: same image name, model, engine settings and sweep) "
        f"at the same point on each machine. Ratios are to the reference machine: `{local}` (this machine) "
        "when it measured the cell, else the first machine that did."
    )
    out += ["", "## Machines", ""]
    table = Table(["machine", "device", "cells", "canary GFLOP/s", "× canary", "schema_version", "method_version"])
    first = points[points["machine_id"] == order[0]]
    reference_canary = first["canary_matmul_1t_gflops"].median() if "canary_matmul_1t_gflops" in first else None
    for machine in order:
        mine = points[points["machine_id"] == machine]
        canary = mine["canary_matmul_1t_gflops"].median() if "canary_matmul_1t_gflops" in mine else None
        table.add(
            [
                machine + (" (this machine)" if machine == local else ""),
                device_text(mine),
                mine["cell_id"].nunique(),
                fmt(canary),
                fmt_ratio(canary / reference_canary) if canary and reference_canary else "—",
                ", ".join(str(v) for v in sorted(mine["schema_version"].unique())),
                ", ".join(str(v) for v in sorted(mine["method_version"].unique())),
            ]
        )
    out.append(table.markdown())
    out.append(
        "\nThe canary is a fixed matmul (1 thread) run in each round before the engine loads: a machine "
        "whose canary is much slower is a slower host today, whatever the configuration."
    )
    out += ["", "## Matching cells", ""]
    if compared.empty:
        out.append("No cell was measured at the same point on two machines.")
    else:
        headers = ["cell", "batch × in→out"]
        for index, machine in enumerate(order):
            headers.append(f"{machine} tok/s")
            if index:
                headers.append(f"{machine} ×")
        headers.append("notes")
        matching = compared[MATCH].drop_duplicates().sort_values(MATCH)
        shown, cut = listed(matching, "matching cell points", "`machines.csv`")
        table = Table(headers)
        for _, group in compared.merge(shown, on=MATCH).groupby(MATCH, sort=True):
            by_machine = group.set_index("machine_id")
            first = group.iloc[0]
            row = [first["cell_name"], fmt_point(first)]
            notes = []
            if first["reference_machine"] != order[0]:
                notes.append(f"reference: {first['reference_machine']}")
            for index, machine in enumerate(order):
                if machine not in by_machine.index:
                    row += ["—"] if not index else ["—", "—"]
                    continue
                entry = by_machine.loc[machine]
                row.append(fmt(entry["output_tok_s"]) if entry["status"] == "ok" else entry["status"])
                if index:
                    row.append(_ratio_text(entry) if entry["compared"] else "not compared")
                for note in entry["note"].split("; "):
                    if note.startswith(("not compared", "⚠")):
                        notes.append(note.removeprefix("not compared: "))
            table.add([*row, "; ".join(dict.fromkeys(notes))])
        out += [table.markdown(), *cut]
    single = points.groupby(MATCH)["machine_id"].nunique()
    only_one = int((single < 2).sum())
    out += [
        "",
        f"{only_one} cell point(s) measured on one machine only are in `summary.md`. "
        "Rows of a different method_version (how a figure is measured) are never compared.",
        "",
    ]
    return "\n".join(out)


def _ratio_text(entry) -> str:
    """The reference's own 1.00×, else the ratio with its interval (tables.ratio_text)."""
    if entry["note"].startswith("reference"):
        return fmt_ratio(entry["vs_reference"])
    return ratio_text(entry, "vs_reference", "significance")


def write_tables(points: pd.DataFrame, local: str, tables_dir: Path) -> list[Path]:
    compared = compare(points, local)
    md, csv = paths.machines_markdown(tables_dir), paths.machines_csv(tables_dir)
    atomic.write_text(md, machines_markdown(points, compared, local))
    atomic.write_text(csv, report.csv_text(compared))
    return [md, csv]
