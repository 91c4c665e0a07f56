"""Expected ranges from the study -> verdicts per point, and ratios to the baseline in words."""

from __future__ import annotations

import fnmatch
import re

import pandas as pd

from .metrics import POINT

PASS, FAIL, MISSING = "✅", "❌", "— not measured"


def cell_globs(expectation: dict) -> list[str]:
    cells = expectation["cells"]
    return [cells] if isinstance(cells, str) else list(cells)


def matches_cell(expectation: dict, cell_name: str) -> bool:
    return any(fnmatch.fnmatchcase(cell_name, glob) for glob in cell_globs(expectation))


def _selected(points: pd.DataFrame, expectation: dict) -> pd.DataFrame:
    keep = points["cell_name"].map(lambda name: matches_cell(expectation, name))
    keep &= points["machine_id"].map(lambda m: fnmatch.fnmatchcase(m, expectation.get("machine", "*")))
    if expectation.get("device"):  # a range written for one kind of GPU judges no other
        names = points["device_name"] if "device_name" in points else pd.Series("", index=points.index)
        keep &= names.map(lambda name: bool(re.search(expectation["device"], str(name or ""), re.IGNORECASE)))
    for key in POINT:
        if key in expectation:
            keep &= points[key] == expectation[key]
    return points[keep]


def in_range(value, low, high) -> bool:
    return (
        value is not None and not pd.isna(value) and (low is None or value >= low) and (high is None or value <= high)
    )


def verdicts(points: pd.DataFrame, expectations: list[dict]) -> list[dict]:
    """One verdict per expectation x matching measured point (a point that failed is ❌ with its
    status; an expectation no point matched is one 'not measured' row)."""
    rows = []
    for index, exp in enumerate(expectations):
        low, high, metric = exp.get("min"), exp.get("max"), exp["metric"]
        chosen = _selected(points, exp) if not points.empty else points
        base = {"expectation": index, "metric": metric, "min": low, "max": high, "source": exp.get("source", "")}
        if chosen.empty:
            rows.append({**base, "machine_id": "", "cell_name": ", ".join(cell_globs(exp)), "verdict": MISSING})
            continue
        for _, point in chosen.iterrows():
            value = point[metric] if point["status"] == "ok" else None
            rows.append(
                {
                    **base,
                    "machine_id": point["machine_id"],
                    "cell_name": point["cell_name"],
                    **{key: int(point[key]) for key in POINT},
                    "measured": value,
                    "status": point["status"],
                    "verdict": PASS if in_range(value, low, high) else FAIL,
                }
            )
    return rows


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def _with_interval(row) -> str:
    """'0.52× [0.50, 0.54]', '≈ 1.01× [0.97, 1.05] (no significant difference)', or the bare ratio
    with '(no interval)' when fewer than two paired rounds give one."""
    low, high = row.get("vs_baseline_low"), row.get("vs_baseline_high")
    if low is None or pd.isna(low):
        return _times(row["vs_baseline"])
    text = f"{_times(row['vs_baseline'])} [{low:.2f}, {high:.2f}]"
    if row.get("vs_baseline_significance") == "same":
        return f"≈ {text} (no significant difference)"
    return text


def ratio_sentences(points: pd.DataFrame, baseline_name: str) -> list[str]:
    """'vllm-float32 is 0.52× vllm-bfloat16 at batch 1; 0.61× at batch 8' per machine and cell."""
    if points.empty:
        return []
    sentences = []
    several_shapes = points[["input_len", "output_len"]].drop_duplicates().shape[0] > 1
    machines = points["machine_id"].unique()
    for (machine, cell), group in points.groupby(["machine_id", "cell_name"], sort=True):
        if cell == baseline_name:
            continue
        parts = []
        for _, row in group.sort_values(list(POINT)).iterrows():
            if pd.isna(row["vs_baseline"]):
                continue
            where = f"batch {row['batch_size']}"
            if several_shapes:
                where += f" ({row['input_len']}→{row['output_len']} tokens)"
            parts.append((_with_interval(row), where))
        if not parts:
            continue
        on = f" on {machine}" if len(machines) > 1 else ""
        (ratio, where), rest = parts[0], parts[1:]
        text = f"{cell} is {ratio} {baseline_name} at {where}{on}" + "".join(f"; {r} at {w}" for r, w in rest)
        if group["vs_baseline_low"].isna().any() if "vs_baseline_low" in group else True:
            text += " (no interval: fewer than 2 rounds paired with the baseline)"
        mark = group["same_as"].iloc[0] if "same_as" in group else None
        # Equal effective settings: whatever the ratio says, it is run-to-run spread, not the setting.
        sentences.append(text + (f" ({mark}: the difference is run-to-run spread)" if isinstance(mark, str) else ""))
    return sentences
