"""Tables a person reads: results/tables/summary.{md,csv}."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import polars as pl

from . import aggregate, atomic, paths, quality, serving
from .tables import Mark, Stack, Table, fmt, fmt_point, fmt_ratio, listed, ratio_text


def _spread(row) -> str:
    if not row["repeats"]:
        return "—"
    text = f"{fmt(row['output_tok_s_min'])}–{fmt(row['output_tok_s_max'])}, CV {row['output_tok_s_cv']:.1%}"
    return text + (" ⚠" if row["cv_flag"] else "")


def _interval(row, low: str, high: str, spec: str = ".1f") -> str:
    if pd.isna(row.get(low)):
        return "—"
    return f"[{fmt(row[low], spec)}, {fmt(row[high], spec)}]"


def _rounds(row) -> str:
    """'3/3', or '2/3 (1 flagged)': rounds in the figures / rounds run."""
    used, total = int(row.get("rounds") or 0) if pd.notna(row.get("rounds")) else 0, row.get("rounds_total")
    text = f"{used}/{int(total)}" if pd.notna(total) else "—"
    notes = []
    if row.get("rounds_flagged"):
        only = " ⚠ figure from these alone" if row.get("flagged_only") in (True,) else ""
        notes.append(f"{int(row['rounds_flagged'])} flagged{only}")
    if row.get("rounds_failed"):
        notes.append(f"{int(row['rounds_failed'])} failed")
    return text + (f" ({', '.join(notes)})" if notes else "")


def _round_spread(row) -> str:
    """Between-round CV / within-round CV (repeats inside one engine load agree more closely)."""
    between, within = row.get("between_cv"), row.get("within_cv")
    if pd.isna(between) and pd.isna(within):
        return "—"
    return f"{fmt(between, '.1%')} / {fmt(within, '.1%')}"


def busy_cells(cells: pd.DataFrame, cores: int | None = None) -> list[str]:
    """Cells measured while the host was oversubscribed (load average above its core count)."""
    if cells.empty or "host_load_max" not in cells:
        return []
    cores = cores or os.cpu_count()
    return sorted(cells.loc[cells["host_load_max"] > cores, "cell_name"].unique())


def _latency(row) -> str:
    """Median request latency with the CV of its repeats (⚠ above the flag)."""
    if pd.isna(row["latency_p50_s"]):
        return "—"
    text = f"{row['latency_p50_s']:.3f} ±{row['latency_p50_s_cv']:.1%}"
    return text + (" ⚠" if row["latency_cv_flag"] else "")


SERVING_COLUMNS = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s",
                   "latency_p50_s", "latency_p99_s")  # fmt: skip


def serving_table(points: pd.DataFrame) -> tuple[Table, list[str]]:
    """Serve-mode points: TTFT, TPOT, ITL and E2E latency in ms (means over repeats of each
    percentile), and the line saying where the rest are when the table is cut."""
    levels = points["load_kind"].notna() if "load_kind" in points else False  # their own table
    served, cut = listed(points[points["itl_p50_s"].notna() & ~levels], "served points")
    table = Table(["machine", "cell", "batch × in→out", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                   "ITL p50", "ITL p99", "E2E p50", "E2E p99"], numeric=frozenset(range(3, 11)))  # fmt: skip
    for _, r in served.iterrows():
        table.add([r["machine_id"], r["cell_name"], fmt_point(r)] + [fmt(r[c] * 1000, ".1f") for c in SERVING_COLUMNS])
    return table, cut


def _dataset(row) -> str:
    """'shipped shakespeare', 'jsonl chat.jsonl', 'shared_prefix 96 tokens'."""
    kind = row.get("dataset_kind")
    if kind == "shared_prefix":
        return f"shared prefix of {int(row['dataset_prefix_len'])} tokens"
    return f"{kind} {row['dataset_name']}" if isinstance(row.get("dataset_name"), str) else str(kind)


def _with_dataset(points: pd.DataFrame) -> pd.Series:
    return points["dataset_kind"].notna() & (points["dataset_kind"] != "random")


def prompts_table(points: pd.DataFrame) -> tuple[Table, list[str]]:
    """Points of cells with a dataset (not random prompts): the lengths their requests had, as
    the engine counted them (mean, median, p90 of a repeat's requests, averaged over repeats)."""
    shown, cut = listed(points[_with_dataset(points)], "points with a dataset")
    table = Table(["machine", "cell", "batch × in→out", "dataset", "sha256", "prompt tokens mean", "p50", "p90",
                   "output tokens mean", "p50", "p90"], numeric=frozenset(range(5, 11)))  # fmt: skip
    for row in shown.to_dict("records"):
        sha = row.get("dataset_sha256")
        table.add([row["machine_id"], row["cell_name"], fmt_point(row), _dataset(row),
                   sha[:12] if isinstance(sha, str) else "—",
                   *(fmt(row.get(f"{name}_{stat}"), ".0f") for name in ("prompt_tokens", "output_tokens")
                     for stat in ("mean", "p50", "p90"))])  # fmt: skip
    return table, cut


def prompts_markdown(points: pd.DataFrame) -> list[str]:
    if "dataset_kind" not in points or not _with_dataset(points).any():
        return []
    table, cut = prompts_table(points)
    return [
        "",
        "## Prompts from a dataset",
        "",
        "Where a cell's prompts come from a dataset (docs/studies.md#datasets-the-prompts-a-cell-sends), "
        "each request has its own "
        "lengths: `batch × name` points send batch-size requests of the dataset. Tokens as the engine "
        "counted them, per repeat, averaged over repeats.",
        "",
        table.markdown(),
        *cut,
    ]


def serving_markdown(points: pd.DataFrame) -> list[str]:
    if "itl_p50_s" not in points or points["itl_p50_s"].isna().all():
        return []
    table, cut = serving_table(points)
    if not table.rows:
        return []
    return ["", "## Serving latency (ms, vLLM's definitions)", "", table.markdown(), *cut]


def capacity_text(row) -> str:
    """'3.2 req/s', '≥ 16 concurrent' (the search's upper bound held), 'none'."""
    if pd.isna(row["capacity"]):
        return "none"
    unit = serving.UNITS[row["metric"]]
    value = f"{row['capacity']:g} {unit}"
    return f"≥ {value}" if row["bound"] == "at least" else value


def capacity_table(capacity: pd.DataFrame, baseline_name: str) -> Table:
    """Per machine and cell that searched: the highest load holding its SLO, and × the baseline's."""
    table = Table(["machine", "cell", "capacity", "SLO", "× baseline", "probes", "how found"],
                  numeric=frozenset({2, 4, 5}))  # fmt: skip
    for row in capacity.to_dict("records"):
        ratio = "baseline" if row["cell_name"] == baseline_name else fmt_ratio(row["vs_baseline"])
        table.add(
            [row["machine_id"], row["cell_name"], capacity_text(row), serving.slo_text(row["slo"], row["slo_share"]),
             ratio, str(row["probes"]), row["reason"]],
            bad=pd.isna(row["capacity"]),
        )  # fmt: skip
    return table


def capacity_sentences(capacity: pd.DataFrame, baseline_name: str) -> list[str]:
    """'- m1: vllm-bf16: 3.2 req/s at SLO share ≥ 0.9 (TTFT ≤ 500 ms); 1.28× the baseline's.'"""
    lines = []
    for row in capacity.to_dict("records"):
        text = f"- {row['machine_id']}: `{row['cell_name']}`: "
        if pd.isna(row["capacity"]):
            text += f"no capacity at {serving.slo_text(row['slo'], row['slo_share'])}: {row['reason']}."
        else:
            text += f"{capacity_text(row)} at {serving.slo_text(row['slo'], row['slo_share'])}"
            if row["cell_name"] != baseline_name and pd.notna(row["vs_baseline"]):
                text += f"; {fmt_ratio(row['vs_baseline'])} the baseline's"
            text += "."
        lines.append(text)
    return lines


def _ms(row, column: str) -> str:
    value = row.get(column)
    return fmt(value * 1000 if value is not None and pd.notna(value) else None, ".1f")


def load_levels(points: pd.DataFrame) -> pd.DataFrame:
    """The serve load levels among the points, by machine, cell, phase, kind and load."""
    if points.empty or "load_kind" not in points:
        return points.iloc[0:0]
    levels = points[points["load_kind"].notna()]
    levels = levels.assign(_phase=levels["load_phase"].map({"sweep": 0, "search": 1}))  # the sweep first
    order = ["machine_id", "cell_name", "input_len", "output_len", "_phase", "load_kind", "concurrency",
             "request_rate"]  # fmt: skip
    return levels.sort_values(order, na_position="last").drop(columns="_phase")


def levels_table(points: pd.DataFrame) -> tuple[Table, list[str]]:
    """Every load level: requests measured, throughput, goodput, SLO share and latency percentiles
    (means over repeats and rounds of each figure)."""
    shown, cut = listed(load_levels(points), "load levels")
    table = Table(["machine", "cell", "load · in→out", "status", "measured (failed)", "req/s", "goodput req/s",
                   "SLO share", "TTFT p50", "TTFT p90", "TPOT p50", "TPOT p90", "E2E p50", "E2E p90"],
                  numeric=frozenset(range(4, 14)))  # fmt: skip
    for r in shown.to_dict("records"):
        measured = "—"
        if pd.notna(r.get("requests_measured")):
            measured = f"{r['requests_measured']:.0f} ({fmt(r.get('requests_failed'), '.0f', '0')})"
        table.add(
            [r["machine_id"], r["cell_name"], fmt_point(r), r["status"], measured, fmt(r.get("requests_s"), ".2f"),
             fmt(r.get("goodput_rps"), ".2f"), fmt(r.get("slo_share"), ".0%"), _ms(r, "ttft_p50_s"),
             _ms(r, "ttft_p90_s"), _ms(r, "tpot_p50_s"), _ms(r, "tpot_p90_s"), _ms(r, "latency_p50_s"),
             _ms(r, "latency_p90_s")],
            bad=r["status"] != "ok",
        )  # fmt: skip
    return table, cut


def serving_load_markdown(points: pd.DataFrame, baseline_name: str) -> list[str]:
    """The serve sections: capacity under SLO per cell (when a cell searched), and every level."""
    if load_levels(points).empty:
        return []
    out = []
    capacity = aggregate.capacities(points, baseline_name)
    if not capacity.empty:
        out += ["", "## Serving: capacity under SLO", "",
                "The highest load at which a cell's share of measured requests meeting every SLO budget "
                "held, found on one server start by doubling from the search's lower bound, then bisection "
                "(cellbench.serving); × baseline is the ratio to the baseline cell's capacity on the same machine.",
                "", capacity_table(capacity, baseline_name).markdown(), "",
                *capacity_sentences(capacity, baseline_name)]  # fmt: skip
    table, cut = levels_table(points)
    out += ["", "## Serving: load levels (ms; vLLM's definitions, over each level's measured requests)", "",
            table.markdown(), *cut, "",
            "Each level ran on the cell's one server start: warm-up requests first, then the measured ones, "
            "with the load kept on until the last measured request ended; req/s, goodput and SLO share are over "
            "the measured requests' window (first send to last answer)."]  # fmt: skip
    return out


MIN_ROUNDS = 2  # an interval needs two rounds; fewer and no fastest cell or difference is stated


# The columns withheld and short_points read of _compared_ok's rows.
COMPARED_COLUMNS = ["machine_id", *aggregate.POINT, "cell_id", "rounds", "rounds_flagged", "rounds_total", "round_flag"]


def withheld(points: pd.DataFrame, compared: pd.DataFrame | None = None) -> dict[str, str]:
    """Per machine whose verdicts are withheld, why and what to do: some measured point has fewer
    than MIN_ROUNDS trusted rounds, so no interval, fastest cell or difference can be stated as fact.
    `compared`: _compared_ok(points, COMPARED_COLUMNS), where the caller has it."""
    if points.empty:
        return {}
    reasons = {}
    compared = _compared_ok(points, COMPARED_COLUMNS) if compared is None else compared
    for machine, group in compared.groupby("machine_id", sort=True):
        short = group[group["rounds"].fillna(0) < MIN_ROUNDS]
        if short.empty:
            continue
        cells = group.drop_duplicates("cell_id")
        flagged, total = int(cells["rounds_flagged"].sum()), int(cells["rounds_total"].max())
        why = f"{len(short)} of {len(group)} measured points have fewer than {MIN_ROUNDS} trusted rounds"
        if flagged:
            why += f" ({flagged} round(s) flagged: {cells['round_flag'].dropna().iloc[0]})"
        todo = (
            "quiet the host (`cellbench doctor` lists what disturbs it) and rerun"
            if flagged
            else f"add rounds (`sweep.rounds`, now {total}: each is a fresh engine load)"
        )
        reasons[machine] = f"{why}; {todo}"
    return reasons


def host_lines(points: pd.DataFrame) -> list[str]:
    """Flagged rounds and each machine's canary: is the host fit to be measured right now?"""
    if points.empty or "canary_matmul_1t_gflops" not in points:
        return []
    out = []
    cells = points.drop_duplicates(["machine_id", "cell_id"])
    for machine, group in cells.groupby("machine_id", sort=True):
        flagged = group[group["rounds_flagged"] > 0]
        canary = group["canary_matmul_1t_gflops"].median()
        memcpy = group["canary_memcpy_gb_s"].median()
        line = f"- **{machine}**: canary {fmt(canary)} GFLOP/s matmul (1 thread), {fmt(memcpy)} GB/s memcpy"
        if flagged.empty:
            line += "; no round flagged."
        else:
            names = ", ".join(
                f"{r['cell_name']} ({int(r['rounds_flagged'])}: {r['round_flag']})" for _, r in flagged.iterrows()
            )
            line += f"; flagged rounds, left out of the figures: {names}."
        out.append(line)
    return ["", "## Host", "", *out]


def _compared_ok(points: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The ok rows at points where two or more cells were measured, these columns of them. One
    measured cell at a point is no comparison: nothing there can flip, so nothing there is withheld.
    (Only the columns used: a mask over every column copies all of them, 0.3 s at 10,000 cells.)"""
    keys = ["machine_id", *aggregate.POINT]
    ok = points.loc[points["status"] == "ok", list(dict.fromkeys([*keys, "cell_id", *columns]))]
    return ok.loc[ok.groupby(keys)["cell_id"].transform("nunique") > 1, columns]


def short_points(points: pd.DataFrame, compared: pd.DataFrame | None = None) -> set[tuple]:
    """(machine, batch, input, output) of every point where a measured cell has fewer than
    MIN_ROUNDS trusted rounds: no fastest cell or difference is stated there. `compared` as withheld's."""
    ok = _compared_ok(points, COMPARED_COLUMNS) if compared is None else compared
    ok = ok[ok["rounds"].fillna(0) < MIN_ROUNDS]
    # Each point once (every short cell of a point repeats it: 200,000 tuples at 10,000 cells).
    return set(ok[["machine_id", *aggregate.POINT]].drop_duplicates().itertuples(index=False, name=None))


def excluded_notes(row) -> list[str]:
    """Why a cell faster than the one named was not named: its quality diverged."""
    notes = []
    for cell, ratio, reason in row.get("excluded") or []:
        faster = f"was faster ({fmt_ratio(ratio)})" if ratio is not None else "was measured"
        notes.append(f"`{cell}` {faster} but excluded: quality ❌ diverged ({reason})")
    return notes


def fastest_table(fastest: pd.DataFrame, short: set[tuple]) -> Table:
    """The fastest cell at each point, or the tie; withheld at the points in `short`. A cell whose
    quality diverged is never named; the cell says so when one was faster."""
    table = Table(["machine", "batch × in→out", "fastest", "output tok/s", "× baseline", "ahead of runner-up by"])
    for _, row in fastest.iterrows():
        if (row["machine_id"], *(row[k] for k in aggregate.POINT)) in short:
            table.add([row["machine_id"], fmt_point(row), "withheld (see above)", "—", "—", "—"])
            continue
        if isinstance(row["fastest"], str):
            name = Mark("strong", row["fastest"])
            margin = "only cell" if not row.get("quality_excluded") else "only cell whose quality did not diverge"
            if isinstance(row["runner_up"], str):
                interval = f"[{fmt(row['margin_low'], '.2f')}, {fmt(row['margin_high'], '.2f')}]"
                margin = f"{fmt_ratio(row['margin'])} {interval} {row['runner_up']}"
        elif len(row["tied"]):
            name = "tie: " + ", ".join(row["tied"])
            margin = "≈ no significant difference"
        else:
            name, margin = "none: every cell's quality diverged", "—"
        notes = excluded_notes(row)
        if notes:
            name = Stack((name, *notes))
        table.add(
            [row["machine_id"], fmt_point(row), name, fmt(row["output_tok_s"]), fmt_ratio(row["vs_baseline"]), margin]
        )
    return table


def engine_ran(row) -> str | Stack:
    """What the engine ran, and the cell it measured the same thing as (⚠)."""
    same_as = row.get("same_as")
    if not isinstance(same_as, str):
        return row["engine_ran"]
    return Stack((row["engine_ran"], Mark("same", f"⚠ {same_as}")), joint=" ")


# The first columns of every table of cells and points (summary.md's and the HTML page's).
POINT_HEADERS = ["machine", "cell", "status", "batch × in→out", "output tok/s"]


def point_cells(row) -> list[str]:
    """The cells under POINT_HEADERS."""
    return [row["machine_id"], row["cell_name"], row["status"], fmt_point(row), fmt(row["output_tok_s"])]


QUALITY_STYLE = {quality.OK: "pass-text", quality.DRIFT: "same", quality.DIVERGED: "fail-text"}


def quality_cell(row) -> str | Mark:
    """The per-point quality cell: verdict, exact-match share and Δ NLL (cellbench.quality.label)."""
    text = quality.label(row)
    style = QUALITY_STYLE.get(row.get("quality_verdict"))
    return Mark(style, text) if style else text


def quality_verdict_text(row) -> str | Mark:
    """'✅ within tolerance', '⚠ drift', '❌ diverged', 'baseline', or why there is no verdict."""
    verdict = row.get("quality_verdict")
    if verdict in quality.SYMBOL:
        return Mark(QUALITY_STYLE[verdict], f"{quality.SYMBOL[verdict]} {quality.WORDS[verdict]}")
    return quality.label(row)


def _first_divergence(row) -> str:
    prompts = row.get("quality_prompts")
    if pd.isna(prompts):
        return "—"
    if not row.get("quality_diverging"):
        return "none diverged"
    return f"{fmt(row['quality_first_divergence'])} ({int(row['quality_diverging'])} of {int(prompts)} diverge)"


def _delta_nll(row) -> str:
    if pd.notna(row.get("quality_delta_nll")):
        return f"{row['quality_delta_nll']:+.4f}"
    return "— (tokenizations differ)" if pd.notna(row.get("quality_delta_bpb")) else "—"


def quality_table(points: pd.DataFrame) -> tuple[Table, list[str]]:
    """One row per machine and cell: its quality figures against its machine's baseline."""
    cells, cut = listed(points.drop_duplicates(["machine_id", "cell_id"]), "cells")
    table = Table(
        ["machine", "cell", "quality", "bits/byte", "NLL/token (tokens)", "Δ bits/byte", "Δ NLL/token",
         "exact match", "common prefix, words", "first divergence, word", "quality s", "why"],
        numeric=frozenset({3, 4, 5, 6, 7, 8, 10}),
    )  # fmt: skip
    for row in cells.to_dict("records"):
        prompts, diverging = row.get("quality_prompts"), row.get("quality_diverging")
        exact = (
            "—" if pd.isna(prompts) else f"{row['quality_exact_share']:.0%} ({int(prompts - diverging)}/{int(prompts)})"
        )
        nll = fmt(row.get("quality_nll"), ".4f")
        if pd.notna(row.get("quality_nll_tokens")):
            nll += f" ({int(row['quality_nll_tokens']):,})"
        delta = row.get("quality_delta_bpb")
        table.add(
            [
                row["machine_id"],
                row["cell_name"],
                quality_verdict_text(row),
                fmt(row.get("quality_bits_per_byte"), ".4f"),
                nll,
                "—" if pd.isna(delta) else quality.percent(delta),
                _delta_nll(row),
                exact,
                fmt(row.get("quality_prefix_words")),
                _first_divergence(row),
                fmt(row.get("quality_s")),
                row.get("quality_reason") or "—",
            ],
            bad=row.get("quality_verdict") == quality.DIVERGED,
        )  # fmt: skip
    return table, cut


def _span(values: pd.Series, spec: str = ",") -> str | None:
    """'64', or '60–64' when the cells differ; None when none has the figure."""
    values = values.dropna()
    if values.empty:
        return None
    low, high = format(int(values.min()), spec), format(int(values.max()), spec)
    return low if low == high else f"{low}–{high}"


def quality_method(points: pd.DataFrame, tolerance: dict) -> str:
    """The method in one line: texts, prompts × tokens, words compared, bits per byte, tolerances."""
    cells = points.drop_duplicates(["machine_id", "cell_id"])
    prompts, tokens, words = (_span(cells[c]) for c in ("quality_prompts", "quality_tokens", "quality_words"))
    size = quality.reference_bytes()
    versions = _span(cells["quality_method_version"], "d")
    shape = f"{prompts or 'the'} prompts" + (f" × {tokens} tokens" if tokens else "")
    return (
        f"Method{f' v{versions}' if versions else ''}: each cell scores the reference text (Shakespeare, "
        f"Coriolanus 1.1{f', {size:,} UTF-8 bytes' if size else ''}) and continues {shape} (Romeo and "
        "Juliet) greedily, in the same engine load as its speed points. Bits per byte = total NLL / ln 2 / the "
        "text's bytes, comparable across tokenizers; Δ NLL/token only between cells that scored the same tokens. "
        "Continuations are compared with the baseline's on the same machine as whitespace-split words, never "
        f"token ids{f' ({words} words compared per cell)' if words else ''}. "
        f"✅ |Δ bits/byte| ≤ {tolerance['drift']:.0%} and exact match ≥ {tolerance['agreement_drift']:.0%}; "
        f"❌ Δ bits/byte > +{tolerance['diverged']:.0%} (never named fastest); ⚠ otherwise."
    )


def quality_markdown(points: pd.DataFrame, tolerance: dict) -> list[str]:
    """The "Quality vs baseline" section: the table and its method, or why there is none."""
    out = ["", "## Quality vs baseline", ""]
    if not quality.measured(points):
        return out + ["No cell measured quality (results from before quality was measured, or `quality: false`)."]
    table, cut = quality_table(points)
    return out + [table.markdown(), *cut, "", quality_method(points, tolerance)]


def points_table(points: pd.DataFrame, baseline_name: str, confidence: float) -> tuple[Table, list[str]]:
    """Every cell and point: figures, interval, rounds, spread, ratio to the baseline."""
    shown, cut = listed(points, "cell points")
    table = Table(
        [
            *POINT_HEADERS,
            f"{confidence:.0%} interval",
            "rounds",
            "CV between / within rounds",
            "repeats min–max, CV",
            "× baseline [interval]",
            "quality vs baseline",
            "p50 latency s ±CV",
            "load s",
            "engine actually ran",
        ],  # fmt: skip
        numeric=frozenset({4, 5, 9, 11, 12}),
    )
    for row in shown.to_dict("records"):  # iterrows builds a Series per row: minutes at 10,000 cells
        ratio = "baseline" if row["cell_name"] == baseline_name else ratio_text(row)
        table.add(
            [
                *point_cells(row),
                _interval(row, "output_tok_s_low", "output_tok_s_high"),
                _rounds(row),
                _round_spread(row),
                _spread(row),
                ratio,
                quality_cell(row),
                _latency(row),
                fmt(row["load_s"]),
                engine_ran(row),
            ],
            bad=row["status"] != "ok",
        )
    return table, cut


def failed_table(cells: pd.DataFrame) -> tuple[Table, list[str]]:
    """Cells that did not finish, with their error."""
    failed, cut = listed(cells[cells["status"] != "ok"], "cells that did not finish")
    table = Table(["machine", "cell", "status", "error"])
    for _, r in failed.iterrows():
        table.add(
            [
                r["machine_id"],
                r["cell_name"],
                r["status"],
                r["error"] if isinstance(r["error"], str) else "no error recorded",
            ],
            bad=True,
        )
    return table, cut


def summary_markdown(
    points: pd.DataFrame,
    fastest: pd.DataFrame,
    study: str,
    baseline_name: str,
    confidence: float = 0.95,
    tolerance: dict | None = None,
) -> str:
    out = [f"# cellbench — {study}", ""]
    machines = sorted(points["machine_id"].unique()) if not points.empty else []
    cells = points.drop_duplicates(["machine_id", "cell_id"]) if not points.empty else points
    ok_cells = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    out.append(
        f"Machines: {', '.join(machines) or 'none'}. Cells: {len(cells)} ({ok_cells} ok). "
        f"Baseline: `{baseline_name}`. Figures are output tokens/s: the mean over rounds (each round a "
        f"fresh container and engine load) of the mean over repeats, with its {confidence:.0%} interval "
        "over rounds."
    )
    # The ok rows at points compared, once for withheld and short_points (a groupby over every point).
    compared = _compared_ok(points, COMPARED_COLUMNS) if not points.empty else None
    withheld_on = withheld(points, compared)
    for machine, reason in withheld_on.items():
        out += [
            "",
            f"⚠ **Verdicts withheld on {machine}**: {reason}. At those points no cell is named fastest "
            "and no ratio is stated as a difference until then.",
        ]
    busy = busy_cells(cells)
    if busy:
        out += [
            "",
            f"⚠ {len(busy)} cell(s) ran while the host's load average exceeded its {os.cpu_count()} cores "
            f"({', '.join(busy)}): other work shared the CPU, so their figures are lower and noisier than "
            "on a quiet machine.",
        ]
    out += ["", "## Fastest configuration at each point", ""]
    if fastest.empty:
        out.append("No point was measured successfully.")
    else:
        out.append(
            "A cell is named fastest only when it is significantly faster than the runner-up (the "
            f"{confidence:.0%} interval of their ratio, paired by round, lies above 1); otherwise the "
            "cells not significantly slower than the best are listed as a tie. A cell whose quality diverged "
            "from the baseline's (❌ below) is never named."
        )
        out.append("")
        out.append(fastest_table(fastest, short_points(points, compared) if not points.empty else set()).markdown())
    out += quality_markdown(points, quality.tolerance({"quality_tolerance": tolerance}))
    out += host_lines(points)
    out += ["", "## Every cell and point", ""]
    table, cut = points_table(points, baseline_name, confidence)
    out += [table.markdown(), *cut]
    out += serving_markdown(points)
    out += serving_load_markdown(points, baseline_name)
    out += prompts_markdown(points)
    if not cells.empty and (cells["status"] != "ok").any():
        table, cut = failed_table(cells)
        out += ["", "## Cells that did not finish", "", table.markdown(), *cut]
    out += [
        "",
        "≈ marks a ratio whose interval contains 1: no significant difference. A round is flagged when "
        "other processes used CPU during its measurements or its host canary was off the machine's median; "
        "flagged rounds stay in `summary.parquet` but not in the figures (unless a point has no other: "
        "then its figure is marked and no verdict rests on it).",
        f"⚠ marks a point whose repeats vary by more than {aggregate.CV_FLAG:.0%} (coefficient of variation); "
        "repeats share one engine load, so their spread understates a rerun's: the interval is over rounds.",
        f"Per-repeat rows with full provenance: `{paths.summary()}`; per round: "
        f"`{paths.round_dir('<cell_id>', '<k>')}/`.",
        "",
    ]
    return "\n".join(out)


# Significant digits of a float in CSV: the aggregation's float sums may differ in the last bit
# from run to run (polars' parallel group_by), which twelve digits never show.
CSV_DIGITS = 12


def csv_text(frame: pd.DataFrame | pl.DataFrame) -> str:
    """A table as CSV (polars writes it ten times faster than pandas at 200,000 rows), floats to
    CSV_DIGITS significant digits so the same rows give the same bytes on every run. A polars
    frame is written as its pandas copy would be (as_pandas_types), without making the copy."""
    table = aggregate.as_pandas_types(frame) if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
    floats = [name for name, dtype in table.schema.items() if dtype.is_float()]
    return table.with_columns(pl.col(floats).round_sig_figs(CSV_DIGITS)).write_csv()


def write_tables(
    points: pd.DataFrame,
    study: str,
    baseline_name: str,
    tables_dir: Path,
    confidence: float = 0.95,
    tolerance: dict | None = None,
    extra: list[str] | None = None,
    table: pl.DataFrame | None = None,
) -> list[Path]:
    """summary.md (with `extra` lines at its end: "Where the time goes") and summary.csv (from
    `table`, the points in polars, where the caller has them)."""
    fastest = aggregate.fastest_per_point(points, confidence, table) if not points.empty else pd.DataFrame()
    md = paths.summary_markdown(tables_dir)
    csv = paths.summary_csv(tables_dir)
    text = summary_markdown(points, fastest, study, baseline_name, confidence, tolerance)
    if extra:
        text = text.rstrip("\n") + "\n\n" + "\n".join(extra) + "\n"
    atomic.write_text(md, text)
    dropped = ["effective_json", *aggregate.LIST_COLUMNS]
    if table is not None and not table.is_empty():
        atomic.write_text(csv, csv_text(table.drop(dropped, strict=False)))
    else:
        atomic.write_text(csv, csv_text(points.drop(columns=dropped, errors="ignore")))
    return [md, csv]
