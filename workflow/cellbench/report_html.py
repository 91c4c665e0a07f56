"""results/report/index.html: one self-explaining page (tables, verdicts, diagnostics, plots).

The tables are cellbench.tables models, the same ones the Markdown files are written from; the
page is templates/report.html.j2, rendered by Jinja with autoescape on, so no value reaches the
page unescaped.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jinja2
import pandas as pd

from . import diagnostics, paths, quality
from .aggregate import capacities
from .report import (
    POINT_HEADERS,
    capacity_table,
    engine_ran,
    levels_table,
    load_levels,
    point_cells,
    quality_cell,
    quality_method,
    quality_table,
)
from .tables import Table, fmt, ratio_text
from .verdicts import verdict_table

TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )


def points_table(points: pd.DataFrame) -> Table:
    """The page's table of every cell and point: figures, ratio, latency, TPOT and the bound."""
    table = Table(
        [
            *POINT_HEADERS,
            "95 % interval",
            "× baseline [interval]",
            "quality vs baseline",
            "p50 latency s",
            "TPOT p50 ms",
            "of bandwidth bound",
            "load s",
            "engine actually ran",
        ],  # fmt: skip
        numeric=frozenset({4, 5, 6, 8, 9, 10, 11}),
    )
    for _, r in points.iterrows():
        bound = r.get("bound_fraction")
        table.add(
            [
                *point_cells(r),
                fmt(r.get("output_tok_s_low")) + "–" + fmt(r.get("output_tok_s_high")),
                ratio_text(r),
                quality_cell(r),
                fmt(r["latency_p50_s"], ".3f"),
                fmt(r["tpot_p50_s"] * 1e3 if pd.notna(r["tpot_p50_s"]) else None, ".2f"),
                f"{bound:.1%}" if bound is not None and pd.notna(bound) else "—",
                fmt(r["load_s"]),
                engine_ran(r),
            ],
            bad=r["status"] != "ok",
        )
    return table


def page(
    study: str,
    baseline_name: str,
    points: pd.DataFrame,
    verdicts: list[dict],
    sentences: list[str],
    cells: list[dict],
    plots: list[Path],
    html_path: Path,
    tolerance: dict | None = None,
    profiles: list[tuple[str, Table]] | None = None,
) -> str:
    machines = sorted(points["machine_id"].unique()) if not points.empty else []
    measured = quality.measured(points)
    served = not load_levels(points).empty
    capacity = capacities(points, baseline_name) if served else None
    tolerance = quality.tolerance({"quality_tolerance": tolerance})
    shown = [
        (os.path.relpath(plot, html_path.parent), plot.stem)
        for plot in plots
        # machine-by-machine bars say nothing with one machine, speed vs quality nothing without quality
        if not (plot.name == "machines.png" and len(machines) < 2)
        and not (plot.name == "quality.png" and not measured)
        and not (plot.name.startswith("serve-") and not served)
    ]
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            study=study,
            baseline_name=baseline_name,
            machines=machines,
            cell_count=len(cells),
            verdicts=verdict_table(verdicts) if verdicts else None,
            sentences=sentences,
            points=points_table(points),
            capacity=capacity_table(capacity, baseline_name) if capacity is not None and not capacity.empty else None,
            levels=levels_table(points)[0] if served else None,
            quality=quality_table(points)[0] if measured else None,
            quality_method=quality_method(points, tolerance) if measured else "",
            diagnostics=diagnostics.table(cells),
            profiles=profiles or [],
            plots=shown,
            summary_path=str(paths.summary()),
            provenance_path=str(paths.cell_provenance("<cell_id>", "<k>")),
        )
    )
