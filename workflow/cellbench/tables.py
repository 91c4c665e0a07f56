"""One table model for every table a person reads, rendered as Markdown or (through the
report's Jinja template) as HTML, and the formatting helpers the tables share.

A table is built once: headers, rows of already-formatted cells, which rows are bad and which
columns are numeric. A cell is plain text, a `Mark` (text with a meaning: pass, fail, same,
strong), a `Finding` from an engine log, or a `Stack` of those shown one above the other.
Markdown writes each as text; HTML escapes every piece (Jinja's autoescape) and styles it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # pandas loads where tables are made, not in `run-cell` (which imports this via profiles)
    import pandas as pd

# Rows of one markdown table a person can read; beyond, the table shows the first ones and says
# where all of them are (summary.csv and summary.parquet have every row at any size).
LISTED_ROWS = 2000
SEVERITY_MARK = {"error": "⛔", "warning": "⚠", "info": "ℹ"}


def listed(frame: pd.DataFrame, what: str, where: str = "`summary.csv`") -> tuple[pd.DataFrame, list[str]]:
    """The first LISTED_ROWS rows of `frame`, and the line to print under the table if cut."""
    if len(frame) <= LISTED_ROWS:
        return frame, []
    return frame.head(LISTED_ROWS), ["", f"The first {LISTED_ROWS:,} of {len(frame):,} {what}; all are in {where}."]


def isna(value) -> bool:
    """pandas.isna of one value, without importing pandas for None and floats (NaN is not itself)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    import pandas as pd

    return bool(pd.isna(value))


def fmt(value, spec: str = ".1f", missing: str = "—") -> str:
    """A number in `spec`, or `missing` for None and NaN."""
    if value is None or (isinstance(value, float) and isna(value)):
        return missing
    return format(value, spec)


def fmt_ratio(value) -> str:
    """'0.52×', or '—'."""
    return fmt(value, ".2f") + "×" if value is not None and not isna(value) else "—"


def fmt_point(row) -> str:
    """'8 × 128→64': batch size × input→output tokens; '8 × shakespeare' where each request has
    its own lengths, from a dataset (input_len and output_len 0); a serve load level:
    'concurrency 4 · 128→64', 'rate 2.5 req/s · 128→64', '… (search)'."""
    from_dataset = row["input_len"] == 0 and row["output_len"] == 0
    name = row.get("dataset_name")
    dataset = name if isinstance(name, str) else "dataset"
    if isinstance(row.get("load_kind"), str):
        return f"{load_label(row)} · " + (dataset if from_dataset else f"{row['input_len']}→{row['output_len']}")
    if from_dataset:
        return f"{row['batch_size']} × {dataset}"
    return f"{row['batch_size']} × {row['input_len']}→{row['output_len']}"


def load_label(row) -> str:
    """A row's load level in words (cellbench.serving.label); null figures from pandas are NaN."""
    from . import serving

    def value(key):
        found = row.get(key)
        return None if isna(found) else found

    kind = row["load_kind"]
    if value("concurrency" if kind == "concurrency" else "request_rate") is None:
        return f"{kind.replace('_', ' ')} ?" + (" (search)" if row.get("load_phase") == "search" else "")
    load = {"load_kind": kind, "concurrency": value("concurrency"), "request_rate": value("request_rate"),
            "burstiness": value("burstiness"), "load_phase": value("load_phase")}  # fmt: skip
    if load["concurrency"] is not None:
        load["concurrency"] = int(load["concurrency"])
    return serving.label(load)


def ratio_text(row, column: str = "vs_baseline", significance: str = "vs_baseline_significance") -> str:
    """'0.52× [0.50, 0.54]', '≈ 1.01× [0.97, 1.05]' (interval holds 1: no significant difference),
    or '1.01× (no interval)' with fewer than 2 rounds; `column`, `column`_low/_high hold the ratio."""
    value = row.get(column)
    if value is None or isna(value):
        return "—"
    mark = row.get(significance)
    if mark == "unknown" or isna(row.get(f"{column}_low")):
        return f"{fmt_ratio(value)} (no interval)"
    interval = f"{fmt_ratio(value)} [{fmt(row[f'{column}_low'], '.2f')}, {fmt(row[f'{column}_high'], '.2f')}]"
    return f"≈ {interval}" if mark == "same" else interval


@dataclass(frozen=True)
class Mark:
    """Text with a meaning: style "pass" or "fail" (a verdict), "same" (measured the same thing
    as another cell), "strong" (bold)."""

    style: str
    text: str
    form: ClassVar[str] = "mark"

    def markdown(self) -> str:
        return f"**{self.text}**" if self.style == "strong" else self.text


@dataclass(frozen=True)
class Finding:
    """A known signature found in an engine log (cellbench.diagnose): Markdown shows its mark and
    words; HTML adds what to do, its source and the log line."""

    severity: str
    finding: str
    remediation: str
    source: str
    line: str
    form: ClassVar[str] = "finding"

    def markdown(self) -> str:
        return f"{SEVERITY_MARK[self.severity]} {self.finding}"


@dataclass(frozen=True)
class Stack:
    """Pieces of one cell, one above the other in HTML; joined by `joint` in Markdown."""

    items: tuple
    joint: str = "<br>"
    form: ClassVar[str] = "stack"

    def markdown(self) -> str:
        return self.joint.join(markdown_cell(item) for item in self.items)


def markdown_cell(cell) -> str:
    return cell.markdown() if hasattr(cell, "markdown") else str(cell)


@dataclass
class Table:
    """Headers and rows of formatted cells; `bad` marks rows HTML highlights (failed cells,
    verdicts not passed) and `numeric` the columns HTML aligns right."""

    headers: list[str]
    rows: list[list] = field(default_factory=list)
    bad: list[bool] = field(default_factory=list)
    numeric: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self.bad = self.bad or [False] * len(self.rows)

    def add(self, row: list, bad: bool = False) -> None:
        self.rows.append(row)
        self.bad.append(bad)

    def markdown(self) -> str:
        return markdown_table(self.headers, [[markdown_cell(c) for c in row] for row in self.rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
