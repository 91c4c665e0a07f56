"""Known log signatures -> findings with a remediation (the signatures are data: data/signatures.yaml)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .config import load_data_file

SIGNATURES_PATH = Path(__file__).with_name("data") / "signatures.yaml"
# `examples`, or `no_example` saying why the row has none (a pattern whose real line is unknown).
REQUIRED = ("id", "severity", "pattern", "finding", "remediation", "source")
SEVERITIES = ("error", "warning", "info")
MAX_LINE = 300


class SignatureError(ValueError):
    pass


def check_signature(row: dict) -> dict:
    """A signature row as loaded, with its regex compiled; a bad row is a one-line error."""
    where = f"{SIGNATURES_PATH.name}: signature {row.get('id', '?')!r}"
    missing = [key for key in REQUIRED if not row.get(key)]
    if not row.get("examples") and not row.get("no_example"):
        missing.append("examples")
    if missing:
        raise SignatureError(f"{where}: missing {', '.join(missing)}")
    if row["severity"] not in SEVERITIES:
        raise SignatureError(f"{where}: severity {row['severity']!r} not in {SEVERITIES}")
    try:
        regex = re.compile(row["pattern"])
    except re.error as exc:
        raise SignatureError(f"{where}: bad pattern ({exc})") from None
    if "above" in row and "value" not in regex.groupindex:
        raise SignatureError(f"{where}: `above` needs a named group (?P<value>...) in the pattern")
    return {**row, "regex": regex}


@functools.cache
def signatures() -> tuple[dict, ...]:
    rows = load_data_file(SIGNATURES_PATH)
    checked = tuple(check_signature(row) for row in rows)
    ids = [row["id"] for row in checked]
    if len(ids) != len(set(ids)):
        raise SignatureError(f"{SIGNATURES_PATH.name}: signature ids repeat")
    return checked


def match_line(signature: dict, line: str) -> re.Match | None:
    match = signature["regex"].search(line)
    if match and "above" in signature and float(match.group("value")) <= signature["above"]:
        return None
    return match


def findings(log_text: str, error: str | None = None, rows: tuple[dict, ...] | None = None) -> list[dict]:
    """One finding per signature found in the log (or the cell's error), with its first matching
    line and how many lines matched, in the data file's order."""
    lines = log_text.splitlines() + ([error] if error else [])
    found = []
    for signature in rows if rows is not None else signatures():
        hits = [(match, line) for line in lines if (match := match_line(signature, line))]
        if not hits:
            continue
        first, first_line = hits[0]
        values = {k: v for k, v in first.groupdict().items() if v is not None}
        found.append(
            {
                "id": signature["id"],
                "severity": signature["severity"],
                "finding": " ".join(signature["finding"].format(**values).split()),
                "remediation": " ".join(signature["remediation"].format(**values).split()),
                "source": signature["source"],
                "line": first_line.strip()[:MAX_LINE],
                "count": len(hits),
            }
        )
    return found
