"""Profiles: where a cell's time goes, and how two cells differ.

The container (scripts/bench_cell.py, measure_profile) runs the study's profile point `steps`
times under torch.profiler and writes profile.json: per op its calls, self and total time in µs
per step and its share of the step (self time over the sum of all self times: self times do
not overlap, so shares add up to 1; totals include children and do not). The host keeps those
rows as the round's profile.parquet; everything else here is pure: top ops, diffs, tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .tables import Table, fmt, isna

if TYPE_CHECKING:  # pandas only where profiles are read: `run-cell` writes them and must not import it
    import pandas as pd

SCHEMA = pa.schema(
    [
        ("op", pa.string()),
        ("calls", pa.float64()),  # per step: a mean over the profiled steps
        ("self_us", pa.float64()),
        ("total_us", pa.float64()),
        ("share", pa.float64()),
        ("phase", pa.string()),  # prefill / decode where the engine can tell; else null
    ]
)
TOP = 10  # ops per cell in the report's "Where the time goes"


class ProfileError(Exception):
    """A cell without a profile, or an unknown cell: one line for the terminal."""


def rows_of(profile_json: dict | None) -> list[dict]:
    """The op rows of the container's profile.json (none when no profile was taken)."""
    if not profile_json:
        return []
    return [{name: op.get(name) for name in SCHEMA.names} for op in profile_json.get("ops", [])]


def read_profile_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_parquet(path: Path, rows: list[dict]) -> None:
    from .metrics import rows_table  # pyarrow's own conversion imports pandas: every cell would pay for it

    table = rows_table(rows, SCHEMA)
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))


def read(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(pq.read_table(path).to_pylist(), columns=SCHEMA.names)  # a null phase stays None


PHASES = ("prefill", "decode", "mixed")


def by_op(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per op, its phases summed; `decode` = the share of the op's self time spent in
    decode steps (None where no phase is known)."""
    decode = frame["self_us"].where(frame["phase"] == "decode", 0.0)
    known = frame["self_us"].where(frame["phase"].notna(), 0.0)
    summed = (
        frame.assign(decode_us=decode, known_us=known)
        .groupby("op", as_index=False)[["calls", "self_us", "total_us", "share", "decode_us", "known_us"]]
        .sum()
    )
    summed["decode"] = (summed["decode_us"] / summed["known_us"]).where(summed["known_us"] > 0, None)
    return summed.drop(columns=["decode_us", "known_us"])


def phase_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Share of the profiled time per phase the engine told apart ({} when it told none)."""
    whole = frame["self_us"].sum()
    return {phase: float(frame.loc[frame["phase"] == phase, "self_us"].sum() / whole)
            for phase in PHASES if whole and (frame["phase"] == phase).any()}  # fmt: skip


def top(frame: pd.DataFrame, n: int = TOP) -> pd.DataFrame:
    """The n ops with the most self time per step (phases summed)."""
    return by_op(frame).sort_values(["self_us", "op"], ascending=[False, True]).head(n).reset_index(drop=True)


def diff(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per op, B against A: share of the step in points (B's share - A's, × 100) and self µs per
    step (B - A); an op only one cell ran counts as 0 in the other. Sorted by the size of the
    share change, largest first (what grew or shrank most of the step)."""
    keys = ["self_us", "share", "calls"]
    a, b = by_op(a), by_op(b)
    left = a.set_index("op")[keys].rename(columns=lambda c: f"{c}_a")
    right = b.set_index("op")[keys].rename(columns=lambda c: f"{c}_b")
    both = left.join(right, how="outer").fillna(0.0)
    both["share_points"] = (both["share_b"] - both["share_a"]) * 100
    both["self_us_delta"] = both["self_us_b"] - both["self_us_a"]
    both = both.reset_index()
    order = both["share_points"].abs().sort_values(ascending=False, kind="stable").index
    return both.loc[order].reset_index(drop=True)


def _percent(value) -> str:
    return "—" if isna(value) else fmt(100 * value, ".1f") + " %"


def top_table(frame: pd.DataFrame, n: int = TOP) -> Table:
    table = Table(["op", "calls/step", "self µs/step", "total µs/step", "share", "in decode"],
                  numeric=frozenset({1, 2, 3, 4, 5}))  # fmt: skip
    for _, row in top(frame, n).iterrows():
        table.add([row["op"], fmt(row["calls"], ".0f"), fmt(row["self_us"], ",.0f"), fmt(row["total_us"], ",.0f"),
                   _percent(row["share"]), _percent(row["decode"])])  # fmt: skip
    return table


def phase_text(frame: pd.DataFrame) -> str:
    """'prefill 71.0 % · decode 29.0 % of the profiled time', or '' when no phase is known."""
    shares = phase_shares(frame)
    return " · ".join(f"{phase} {_percent(share)}" for phase, share in shares.items()) + (
        " of the profiled time" if shares else ""
    )


def diff_table(frame: pd.DataFrame, n: int = TOP) -> Table:
    table = Table(["op", "share A", "share B", "Δ share (points)", "self µs/step A", "self µs/step B", "Δ µs/step"],
                  numeric=frozenset(range(1, 7)))  # fmt: skip
    for _, row in frame.head(n).iterrows():
        table.add([row["op"], fmt(100 * row["share_a"], ".1f") + " %", fmt(100 * row["share_b"], ".1f") + " %",
                   fmt(row["share_points"], "+.1f"), fmt(row["self_us_a"], ",.0f"), fmt(row["self_us_b"], ",.0f"),
                   fmt(row["self_us_delta"], "+,.0f")])  # fmt: skip
    return table


def find(cells: dict, name: str) -> dict:
    """A study cell by name or id; ProfileError naming the known ones otherwise."""
    for cell_id, cell in cells.items():
        if name in (cell_id, cell["name"]):
            return cell
    known = ", ".join(sorted(cell["name"] for cell in cells.values()))
    raise ProfileError(f"profile-diff: no cell {name!r} in the study (cells: {known})")


def load(cell: dict, results: Path) -> pd.DataFrame:
    """A cell's round-1 profile; ProfileError when it has none."""
    from . import paths

    path = paths.cell_profile(cell["id"], 1, results)
    if not cell.get("profile"):
        raise ProfileError(f"profile-diff: cell {cell['name']} has no profile (set `profile:` for it in the study)")
    frame = read(path) if path.exists() else None
    if frame is None or frame.empty:
        raise ProfileError(f"profile-diff: cell {cell['name']} has no profile rows in {path} (not run, or it failed)")
    return frame


def diff_text(name_a: str, name_b: str, a: pd.DataFrame, b: pd.DataFrame, n: int = TOP) -> str:
    """The terminal's diff: a heading naming A and B, then the table."""
    changed = diff(a, b)
    shown = min(n, len(changed))
    lines = [f"profile diff per profiled step: A = {name_a}, B = {name_b}; {shown} ops with the largest |Δ share|",
             "", diff_table(changed, n).markdown()]  # fmt: skip
    return "\n".join(lines)


def _title(cell: dict) -> str:
    point = cell["profile"]["point"]
    return f"{cell['name']} at {point['batch_size']} × {point['input_len']}→{point['output_len']}"


def report_sections(
    study_file: Path, results: Path | None = None, n: int = TOP, baseline: str | None = None
) -> list[tuple[str, Table]]:
    """Per profiled cell of the study with rows: a title (name, point, phase shares) and its top-n
    table; then, per point profiled in more than one cell, each cell's diff against the baseline
    (if it was profiled at that point) or else the first of them by name. The cell's name and
    profile point come from its round-1 provenance."""
    from . import paths

    results = results or paths.RESULTS
    found = []
    for cell_id in json.loads(Path(study_file).read_text())["cells"]:
        path = paths.cell_profile(cell_id, 1, results)
        try:
            frame = read(path)
            cell = json.loads(paths.cell_provenance(cell_id, 1, results).read_text())["cell"]
        except (OSError, ValueError, KeyError, pa.ArrowException):
            continue  # not run yet, made before profiles, or not readable: nothing to show
        if not frame.empty and cell.get("profile"):
            found.append((cell, frame))
    found.sort(key=lambda item: item[0]["name"])
    sections = []
    for cell, frame in found:
        phases = phase_text(frame)
        sections.append((_title(cell) + (f" ({phases})" if phases else ""), top_table(frame, n)))
    by_point: dict[str, list] = {}
    for cell, frame in found:
        by_point.setdefault(json.dumps(cell["profile"]["point"], sort_keys=True), []).append((cell, frame))
    for group in by_point.values():
        reference = next((item for item in group if item[0]["name"] == baseline), group[0])
        for cell, frame in group:
            if cell is not reference[0]:
                title = f"Diff: B = {_title(cell)} against A = {reference[0]['name']}, largest |Δ share| first"
                sections.append((title, diff_table(diff(reference[1], frame), n)))
    return sections


def markdown_section(sections: list[tuple[str, Table]]) -> list[str]:
    """summary.md's "Where the time goes" (nothing when no cell was profiled)."""
    if not sections:
        return []
    lines = ["## Where the time goes", "", f"Top {TOP} ops by self time per profiled step (share of the step; "
             "in decode: share of the op's time in decode steps), then diffs of cells profiled at one point "
             "(`cellbench profile-diff A B` for any two)."]  # fmt: skip
    for title, table in sections:
        lines += ["", f"### {title}", "", table.markdown()]
    return lines
