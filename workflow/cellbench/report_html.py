"""results/report/index.html: one self-explaining page (tables, verdicts, diagnostics, plots)."""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from . import paths
from .explain import measured_text, override_words
from .report import _fmt, _point, ratio_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fff3f3} .note{color:#555;font-size:0.9em} img{max-width:100%;border:1px solid #ddd}
.same{color:#a15c00} .pass{color:#0a7a2f;font-weight:bold} .fail{color:#b00020;font-weight:bold}
"""
# Glyphs every common font has (the Markdown tables use the ✅/❌ emoji).
VERDICT_HTML = {"✅": "<span class=pass>✔ pass</span>", "❌": "<span class=fail>✘ fail</span>"}
SEVERITY_HTML = {"error": "<b class=fail>error</b>", "warning": "<b class=same>⚠ warning</b>", "info": "<b>ℹ info</b>"}


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None, numeric=()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        cls = f' class="{classes[index]}"' if classes and classes[index] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(
    study: str,
    baseline_name: str,
    points: pd.DataFrame,
    verdicts: list[dict],
    sentences: list[str],
    cells: list[dict],
    plots: list[Path],
    html_path: Path,
) -> str:
    machines = sorted(points["machine_id"].unique()) if not points.empty else []
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>cellbench — {_e(study)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>cellbench — {_e(study)}</h1>",
        f"<p>Machines: {_e(', '.join(machines) or 'none')}. Cells: {len(cells)}. "
        f"Baseline: <code>{_e(baseline_name)}</code>. Figures are means over repeats.</p>",
        "<h2 id=verdicts>Verdicts</h2>",
    ]
    if verdicts:
        rows = [
            [
                VERDICT_HTML.get(v["verdict"], _e(v["verdict"])),
                _e(v["machine_id"]),
                _e(v["cell_name"]),
                _e(_point(v)) if "batch_size" in v else "—",
                _e(v["metric"]),
                _e(measured_text(v)),
                _e(f"{_fmt(v['min'], 'g', '…')}–{_fmt(v['max'], 'g', '…')}"),
                _e(v["source"]),
            ]
            for v in verdicts
        ]
        headers = ["", "machine", "cell", "batch × in→out", "metric", "measured", "expected", "source"]
        parts.append(_table(headers, rows, ["bad" if v["verdict"] != "✅" else "" for v in verdicts], numeric={5}))
    else:
        parts.append("<p class=note>The study declares no expectations.</p>")
    parts.append("<ul>" + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>" if sentences else "")

    parts.append("<h2 id=summary>Every cell and point</h2>")
    rows, classes = [], []
    for _, r in points.iterrows():
        ran = _e(r["engine_ran"])
        if isinstance(r.get("same_as"), str):
            ran += f"<br><span class=same>⚠ {_e(r['same_as'])}</span>"
        bound = r.get("bound_fraction")
        rows.append(
            [
                _e(r["machine_id"]),
                _e(r["cell_name"]),
                _e(r["status"]),
                _e(_point(r)),
                _e(_fmt(r["output_tok_s"])),
                _e(_fmt(r.get("output_tok_s_low")) + "–" + _fmt(r.get("output_tok_s_high"))),
                _e(ratio_text(r)),
                _e(_fmt(r["latency_p50_s"], ".3f")),
                _e(_fmt(r["tpot_p50_s"] * 1e3 if pd.notna(r["tpot_p50_s"]) else None, ".2f")),
                _e(f"{bound:.1%}" if bound is not None and pd.notna(bound) else "—"),
                _e(_fmt(r["load_s"])),
                ran,
            ]
        )
        classes.append("bad" if r["status"] != "ok" else "")
    headers = [
        "machine", "cell", "status", "batch × in→out", "output tok/s", "95 % interval", "× baseline [interval]",
        "p50 latency s",
        "TPOT p50 ms", "of bandwidth bound", "load s", "engine actually ran",
    ]  # fmt: skip
    parts.append(_table(headers, rows, classes, numeric={4, 5, 6, 7, 8, 9, 10}))

    parts.append("<h2 id=diagnostics>Diagnostics</h2>")
    rows = []
    for c in cells:
        items = [
            f"{SEVERITY_HTML[f['severity']]} {_e(f['finding'])}<br><i>Do:</i> {_e(f['remediation'])} "
            f'(<a href="{_e(f["source"])}">source</a>)<br><code>{_e(f["line"])}</code>'
            for f in c["findings"]
        ]
        items += [f"↺ {_e(override_words(o))}" for o in c["overrides"]]
        if c["same_as"]:
            items.append(f"<span class=same>= {_e(c['same_as'])}</span>")
        if c["error"]:
            items.insert(0, f"<b>{_e(c['error'])}</b>")
        rows.append([_e(c["machine_id"]), _e(c["cell_name"]), _e(c["status"]), "<hr>".join(items) or "nothing known"])
    parts.append(
        _table(["machine", "cell", "status", "findings"], rows, ["bad" if c["status"] != "ok" else "" for c in cells])
    )

    parts.append("<h2 id=plots>Plots</h2>")
    for plot in plots:
        if plot.name == "machines.png" and len(machines) < 2:
            continue  # machine-by-machine bars say nothing with one machine
        src = os.path.relpath(plot, html_path.parent)
        parts.append(f'<p><img src="{_e(src)}" alt="{_e(plot.stem)}"></p>')
    parts.append(
        "<p class=note>× baseline: ratio to the baseline cell on the same machine at the same point. "
        "Of bandwidth bound: weight bytes / (TPOT × device bandwidth), each decode step reading all weights once. "
        "↺: a requested setting the engine changed. "
        f"Rows with provenance: <code>{paths.summary()}</code>; "
        f"per cell: <code>{paths.cell_dir('&lt;cell_id&gt;')}/provenance.json</code>.</p></body></html>"
    )
    return "\n".join(p for p in parts if p)
