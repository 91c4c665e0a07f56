"""PNG plots of the point table (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from . import paths, quality  # noqa: E402
from .atomic import write_with  # noqa: E402
from .metrics import POINT  # noqa: E402

PLOTS = paths.PLOTS


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _ok(points: pd.DataFrame) -> pd.DataFrame:
    """Points measured successfully that are no serve load level (those have plots of their own)."""
    if points.empty:
        return points
    levels = points["load_kind"].notna() if "load_kind" in points else False
    return points[(points["status"] == "ok") & points["output_tok_s"].notna() & ~levels]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _grouped_bars(ax, series: dict[str, pd.Series], labels: list[str], ylabel: str, title: str, **tick_options) -> None:
    """One group of bars per label, one bar per series (missing values drawn as 0), centred."""
    width = 0.8 / len(series)
    for index, (name, values) in enumerate(series.items()):
        xs = [x + (index - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values.fillna(0), width=width, label=name)
    ax.set_xticks(range(len(labels)), labels=labels, fontsize=7, rotation=30, **tick_options)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _figure(points: pd.DataFrame, path: Path, draw) -> None:
    """One figure of the points measured successfully, drawn by `draw(ax, ok)`; a note instead
    when there is none."""
    ok = _ok(points)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if ok.empty:
        _empty(ax, "no point measured successfully")
    else:
        draw(ax, ok)
    _save(fig, path)


def _throughput(ax, ok: pd.DataFrame) -> None:
    several = ok["machine_id"].nunique() > 1
    for key, group in ok.groupby(["machine_id", "cell_name", "input_len", "output_len"]):
        machine, cell, inp, out = key
        name = f"{cell} @ {machine}" if several else cell
        group = group.sort_values("batch_size")
        # Error bars: the interval over rounds (none where a point has fewer than 2 rounds).
        low = (group["output_tok_s"] - group["output_tok_s_low"]).fillna(0) if "output_tok_s_low" in group else None
        high = (group["output_tok_s_high"] - group["output_tok_s"]).fillna(0) if "output_tok_s_high" in group else None
        ax.errorbar(
            group["batch_size"],
            group["output_tok_s"],
            yerr=None if low is None else [low, high],
            marker="o",
            capsize=3,
            label=f"{name} ({inp}→{out})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ok["batch_size"].unique()), labels=[str(b) for b in sorted(ok["batch_size"].unique())])
    ax.set_xlabel("batch size (requests submitted together)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Decode throughput by batch size (bars: interval over rounds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _latency(ax, ok: pd.DataFrame) -> None:
    ok = ok.sort_values(["machine_id", "cell_name", "batch_size"])
    several = ok["machine_id"].nunique() > 1
    labels = [f"{r.cell_name}{' @ ' + r.machine_id if several else ''}\nbatch {r.batch_size}" for r in ok.itertuples()]
    columns = ("latency_p50_s", "latency_p90_s", "latency_p99_s")
    series = {c.split("_")[1]: ok[c] for c in columns}
    title = "Latency percentiles per cell and batch size"
    _grouped_bars(ax, series, labels, "end-to-end request latency, s", title, ha="right")
    ax.legend()


def _machines(ax, ok: pd.DataFrame) -> None:
    table = ok.pivot_table(index=["cell_name", "batch_size"], columns="machine_id", values="output_tok_s")
    labels = [f"{c}\nbatch {b}" for c, b in table.index]
    title = f"Machine by machine ({len(table.columns)} machine{'s' if len(table.columns) > 1 else ''})"
    _grouped_bars(ax, {machine: table[machine] for machine in table.columns}, labels, "output tokens / s", title)
    ax.legend(fontsize=8)


QUALITY_PANELS = 6  # points drawn side by side; more would be unreadable (the table has them all)


def _speed_vs_quality(ax, ok: pd.DataFrame) -> None:
    """Output tok/s against bits per byte, one marker per cell, the Pareto front joined: over the
    cells whose quality did not diverge (a fast garbage model is no trade-off)."""
    kept = ok[ok["quality_verdict"] != quality.DIVERGED]
    front = quality.pareto_front(list(zip(kept["output_tok_s"], kept["quality_bits_per_byte"], strict=True)))
    on_front = pd.Series(False, index=ok.index)
    on_front[kept.index] = front
    ok = ok.assign(on_front=on_front)
    for row in ok.itertuples():
        diverged = row.quality_verdict == quality.DIVERGED
        ax.scatter(
            row.quality_bits_per_byte,
            row.output_tok_s,
            marker="x" if diverged else "o",
            color="#b00020" if diverged else ("#0a7a2f" if row.on_front else "#777777"),
            zorder=3,
        )
        ax.annotate(row.cell_name, (row.quality_bits_per_byte, row.output_tok_s), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    line = ok[ok["on_front"]].sort_values("quality_bits_per_byte")
    ax.plot(line["quality_bits_per_byte"], line["output_tok_s"], color="#0a7a2f", alpha=0.6, label="Pareto front")
    ax.set_xlabel("bits per byte of the reference text (lower is better)")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)


def speed_vs_quality(points: pd.DataFrame, path: Path) -> None:
    """Per machine and point (the first QUALITY_PANELS), speed against quality, Pareto front
    marked; a note instead when no cell measured quality."""
    ok = _ok(points)
    if not ok.empty and "quality_bits_per_byte" in ok:
        ok = ok[ok["quality_bits_per_byte"].notna()]
    groups = list(ok.groupby(["machine_id", *POINT])) if not ok.empty else []
    shown = groups[:QUALITY_PANELS]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(max(4.5 * len(shown), 8), 4.5), squeeze=False)
    if not shown:
        _empty(axes[0][0], "no cell measured quality")
    several = ok["machine_id"].nunique() > 1 if not ok.empty else False
    for ax, ((machine, batch, inp, out), group) in zip(axes[0], shown, strict=False):
        _speed_vs_quality(ax, group)
        ax.set_title(f"{machine + ': ' if several else ''}batch {batch}, {inp}→{out}", fontsize=9)
    if len(groups) > len(shown):
        fig.suptitle(f"Speed vs quality: the first {len(shown)} of {len(groups)} points", fontsize=10)
    elif shown:
        fig.suptitle("Speed vs quality (green line: Pareto front; ×: quality diverged)", fontsize=10)
    _save(fig, path)


def throughput(points: pd.DataFrame, path: Path) -> None:
    """Output tok/s against batch size, one line per machine x cell (x prompt shape)."""
    _figure(points, path, _throughput)


def latency(points: pd.DataFrame, path: Path) -> None:
    """End-to-end latency p50 / p90 / p99 per cell and point (grouped bars)."""
    _figure(points, path, _latency)


def machines(points: pd.DataFrame, path: Path) -> None:
    """Output tok/s per cell and point, one bar per machine."""
    _figure(points, path, _machines)


def _levels(points: pd.DataFrame) -> pd.DataFrame:
    """The serve load levels measured successfully."""
    if points.empty or "load_kind" not in points:
        return points.iloc[0:0]
    return points[(points["status"] == "ok") & points["load_kind"].notna()]


MS_COLUMNS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")  # drawn in ms
SERIES_NAMES = {"ttft_p50_s": "p50", "ttft_p90_s": "p90", "tpot_p50_s": "p50", "tpot_p90_s": "p90",
                "goodput_rps": "goodput", "requests_s": "req/s"}  # fmt: skip
LOAD_AXIS = {"concurrency": "concurrency (requests in flight)", "request_rate": "request rate (req/s, offered)"}


def _load_panels(points: pd.DataFrame, path: Path, rows: list[tuple[str, list[tuple[str, str]]]], title: str) -> None:
    """One column of panels per load kind, one row per (y label, [(column, line style)]): a line
    per machine x cell x prompt shape over its swept levels, its search probes as crosses."""
    levels = _levels(points)
    kinds = [k for k in ("concurrency", "request_rate") if not levels.empty and (levels["load_kind"] == k).any()]
    fig, axes = plt.subplots(len(rows), max(1, len(kinds)), figsize=(max(6, 5.5 * len(kinds)), 3.6 * len(rows)),
                             squeeze=False)  # fmt: skip
    if not kinds:
        for ax in axes.flat:
            _empty(ax, "no serve load level measured")
    several = levels["machine_id"].nunique() > 1 if not levels.empty else False
    for column, kind in enumerate(kinds):
        of_kind = levels[levels["load_kind"] == kind]
        for (machine, cell, inp, out), group in of_kind.groupby(["machine_id", "cell_name", "input_len", "output_len"]):
            name = f"{cell}{' @ ' + machine if several else ''} ({inp}→{out})"
            group = group.sort_values(kind)
            sweep, probes = group[group["load_phase"] != "search"], group[group["load_phase"] == "search"]
            for row, (ylabel, series) in enumerate(rows):
                ax, colour = axes[row][column], None
                for metric, style in series:  # one colour per cell: p50 and p90 (or goodput and req/s) alike
                    scale = 1000 if metric in MS_COLUMNS else 1
                    label = f"{name} {SERIES_NAMES[metric]}" if len(series) > 1 else name
                    (line,) = ax.plot(sweep[kind], sweep[metric] * scale, style, marker="o", color=colour, label=label)
                    colour = line.get_color()
                    ax.scatter(probes[kind], probes[metric] * scale, marker="x", color=colour)
                ax.set_ylabel(ylabel)
                ax.set_xlabel(LOAD_AXIS[kind])
                ax.grid(alpha=0.3)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def serve_latency(points: pd.DataFrame, path: Path) -> None:
    """TTFT and TPOT p50 (solid) and p90 (dashed) against the load, per cell (ms)."""
    rows = [("TTFT, ms", [("ttft_p50_s", "-"), ("ttft_p90_s", "--")]),
            ("TPOT, ms", [("tpot_p50_s", "-"), ("tpot_p90_s", "--")])]  # fmt: skip
    _load_panels(points, path, rows, "Serving latency vs load (p50 solid, p90 dashed; ×: capacity-search probes)")


def serve_goodput(points: pd.DataFrame, path: Path) -> None:
    """Goodput (requests meeting the SLO per second) and request throughput against the load."""
    rows = [("requests / s", [("goodput_rps", "-"), ("requests_s", ":")])]
    _load_panels(points, path, rows, "Goodput (solid) and request throughput (dotted) vs load")


SPAN_COLOURS = ("C2", "C4", "C1", "C6", "C8", "C9", "C5")  # not the lines' blue (CPU) and red (memory)


def telemetry(rounds: list[dict], path: Path) -> None:
    """CPU cores and memory of each cell's container over one round (telemetry.report_rounds),
    one panel per cell, every measured repeat shaded (the same point the same colour)."""
    fig, axes = plt.subplots(max(1, len(rounds)), 1, figsize=(8, 2.4 * max(1, len(rounds))), squeeze=False)
    if not rounds:
        _empty(axes[0][0], "no round has telemetry yet")
    for ax, entry in zip(axes[:, 0], rounds, strict=False):
        box = [s for s in entry["samples"] if s["gpu"] is None]
        ax.plot([s["t_rel_s"] for s in box], [s["cpu_cores"] for s in box], color="tab:blue", label="CPU cores")
        ax.set_ylabel("CPU cores", color="tab:blue")
        memory = ax.twinx()
        memory.plot([s["t_rel_s"] for s in box], [s["memory_mb"] for s in box], color="tab:red", ls="--",
                    label="memory MiB")  # fmt: skip
        memory.set_ylabel("memory MiB", color="tab:red")
        colours = {}
        for start, end, label in entry["marks"]:
            point = label.rsplit(", repeat", 1)[0]
            first = point not in colours
            colour = colours.setdefault(point, SPAN_COLOURS[len(colours) % len(SPAN_COLOURS)])
            ax.axvspan(start, end, color=colour, alpha=0.2, lw=0, label=point if first else None)
        ax.set_title(f"{entry['cell_name']}, round {entry['round']}: CPU and memory (shaded: measured repeats)",
                     fontsize=9)  # fmt: skip
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles, labels, fontsize=7, loc="upper left")
    axes[-1][0].set_xlabel("seconds since the container started")
    _save(fig, path)


def write_plots(points: pd.DataFrame, plots_dir: Path, telemetry_rounds: list[dict] | None = None) -> list[Path]:
    written = []
    for name, draw in zip(PLOTS[:4], (throughput, latency, machines, speed_vs_quality), strict=True):
        draw(points, paths.plot(name, plots_dir))
        written.append(paths.plot(name, plots_dir))
    telemetry(telemetry_rounds or [], paths.plot("telemetry.png", plots_dir))
    written.append(paths.plot("telemetry.png", plots_dir))
    for name, draw in (("serve-latency.png", serve_latency), ("serve-goodput.png", serve_goodput)):
        draw(points, paths.plot(name, plots_dir))
        written.append(paths.plot(name, plots_dir))
    return written
