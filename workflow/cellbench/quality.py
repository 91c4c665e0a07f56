"""Quality next to speed: each cell's quality figures against the baseline cell's on the same
machine, and a verdict.

A cell measures quality once, in its container and engine load (round 1; cellbench.metrics
COLUMN_HISTORY version 3): the negative log-likelihood of a fixed reference text and greedy
continuations of a fixed prompt set (data/quality/, see SOURCE.md there). Here, on the host:

- bits per byte (total NLL / ln 2 / UTF-8 bytes of the text) is THE figure compared: it does
  not depend on the tokenizer, so a llama.cpp GGUF cell compares with an HF one. Δ NLL per token
  is shown only between cells that scored the same number of tokens (the same tokenization).
- greedy continuations are compared as words (whitespace-split decoded text), never as token
  ids: two cells may use two vocabularies.

Pure functions over plain values; cellbench.aggregate joins the result onto the point table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from . import metrics, paths

# The columns a cell writes (null where quality was not measured, never 0): schema version 3.
COLUMNS = list(metrics.COLUMN_HISTORY[3])
BASELINE, OK, DRIFT, DIVERGED = "baseline", "ok", "drift", "diverged"
SYMBOL = {OK: "✅", DRIFT: "⚠", DIVERGED: "❌"}
WORDS = {OK: "within tolerance", DRIFT: "drift", DIVERGED: "diverged"}


def tolerance(study: dict | None) -> dict:
    """The quality tolerances of a study record (results/study.json) or study config, over the
    defaults. The record may hold them at its top level (resolved) or in its `config`."""
    from . import config  # the defaults live in the study schema only

    study = study or {}
    given = study.get("quality_tolerance") or (study.get("config") or {}).get("quality_tolerance") or {}
    return config.quality_tolerance({"quality_tolerance": given})


def measured(points) -> bool:
    """Whether any cell of a point table tried to measure quality (a status other than off or
    null): the quality table and plot say nothing when every cell had it off."""
    if points.empty or "quality_status" not in points:
        return False
    return bool(points["quality_status"].isin(["ok", "failed", "unsupported"]).any())


class NotComparable(ValueError):
    """Two cells' greedy texts cannot be compared (the reason is the message)."""


@dataclass(frozen=True)
class Agreement:
    """A cell's greedy continuations against the baseline's, prompt by prompt."""

    prompts: int
    exact: int  # sequences that agree over the words compared
    mean_prefix_words: float  # common prefix, in words, mean over every sequence
    # 0-based word of the first difference, mean over the diverging sequences; None: none diverged
    mean_first_divergence: float | None
    words: int  # words compared in all (the shorter continuation of each pair)

    @property
    def exact_share(self) -> float:
        return self.exact / self.prompts

    @property
    def diverging(self) -> int:
        return self.prompts - self.exact


def greedy_texts(value) -> list[str]:
    """The continuations stored in quality_greedy_json."""
    try:
        texts = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        texts = None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise NotComparable("greedy texts unreadable")
    return texts


def first_divergence(cell: list[str], base: list[str]) -> int | None:
    """The first word at which two continuations differ, or None when they agree.

    Compared up to the end of the shorter: the same token budget decodes to more or fewer words
    under another tokenizer. For the same reason the last word compared may be cut mid-word, so
    there it is enough that one is a prefix of the other ("Rom" / "Romeo"). An empty
    continuation against a non-empty one differs at word 0."""
    n = min(len(cell), len(base))
    if n == 0:
        return None if len(cell) == len(base) else 0
    for index in range(n - 1):
        if cell[index] != base[index]:
            return index
    a, b = cell[n - 1], base[n - 1]
    return None if a.startswith(b) or b.startswith(a) else n - 1


def agreement(cell_texts: list[str], base_texts: list[str]) -> Agreement:
    """Exact-match share, mean common prefix and mean first divergence (words) of two cells'
    continuations of the same prompts, matched by index."""
    if len(cell_texts) != len(base_texts):
        raise NotComparable(f"{len(cell_texts)} prompts vs the baseline's {len(base_texts)}")
    if not base_texts:
        raise NotComparable("no prompts")
    prefixes, divergences, words = [], [], 0
    for cell, base in zip(cell_texts, base_texts, strict=True):
        a, b = cell.split(), base.split()
        at = first_divergence(a, b)
        compared = min(len(a), len(b))
        words += compared
        prefixes.append(compared if at is None else at)
        if at is not None:
            divergences.append(at)
    return Agreement(
        prompts=len(base_texts),
        exact=len(base_texts) - len(divergences),
        mean_prefix_words=sum(prefixes) / len(prefixes),
        mean_first_divergence=sum(divergences) / len(divergences) if divergences else None,
        words=words,
    )


def relative_delta(cell_bpb: float | None, base_bpb: float | None) -> float | None:
    """cell / baseline - 1 of bits per byte (+0.03: 3 % more bits, worse)."""
    if _missing(cell_bpb) or _missing(base_bpb) or base_bpb <= 0:
        return None
    return cell_bpb / base_bpb - 1


def nll_delta(cell: dict, base: dict) -> float | None:
    """Δ NLL per token in nats, only when both scored as many tokens: per-token figures of two
    tokenizations are per different units."""
    tokens, base_tokens = cell.get("quality_nll_tokens"), base.get("quality_nll_tokens")
    if _missing(tokens) or _missing(base_tokens) or tokens != base_tokens:
        return None
    if _missing(cell.get("quality_nll")) or _missing(base.get("quality_nll")):
        return None
    return cell["quality_nll"] - base["quality_nll"]


def percent(share: float) -> str:
    """'+310%', '+3.1%', '-0.4%' (as the tables write shares)."""
    value = share * 100
    return f"{value:+.0f}%" if abs(value) >= 10 else f"{value:+.1f}%"


@dataclass(frozen=True)
class Verdict:
    verdict: str  # OK, DRIFT or DIVERGED
    reason: str


def verdict(rel_bpb: float, agreed: Agreement | None, tol: dict, not_comparable: str | None = None) -> Verdict:
    """❌ diverged when bits per byte rose by more than `diverged`; ✅ when they moved by at most
    `drift` either way (a cell that differs from the baseline, even for the better, is not the
    same model) and at least `agreement_drift` of the continuations agree exactly; ⚠ drift
    otherwise, also when the continuations could not be compared."""
    figure = f"bits/byte {percent(rel_bpb)}"
    if rel_bpb > tol["diverged"]:
        return Verdict(DIVERGED, f"{figure}, more than +{tol['diverged']:.0%}")
    why = []
    if abs(rel_bpb) > tol["drift"]:
        why.append(f"{figure}, beyond ±{tol['drift']:.0%}")
    if agreed is None:
        why.append(f"greedy texts not compared: {not_comparable or 'none'}")
    elif agreed.exact_share < tol["agreement_drift"]:
        why.append(f"exact match {agreed.exact_share:.0%}, below {tol['agreement_drift']:.0%}")
    if why:
        return Verdict(DRIFT, "; ".join(why))
    return Verdict(OK, f"{figure}, exact match {agreed.exact_share:.0%}")


# Columns assess() adds to each cell (and cellbench.aggregate to each point), besides COLUMNS.
ASSESSED = {
    "quality_delta_bpb": float, "quality_delta_nll": float, "quality_prompts": int, "quality_exact_share": float,
    "quality_prefix_words": float, "quality_first_divergence": float, "quality_diverging": int,
    "quality_words": int, "quality_tokens": int, "quality_verdict": str, "quality_reason": str,
}  # fmt: skip


def assess(cells: list[dict], baseline_id: str, tol: dict) -> list[dict]:
    """Each cell (a dict with machine_id, cell_id and COLUMNS) with the ASSESSED figures against
    the baseline cell of its own machine. A cell without quality figures has no verdict; its
    reason says why (not measured, off, failed...)."""
    bases = {c["machine_id"]: c for c in cells if c["cell_id"] == baseline_id}
    return [{**cell, **_assess(cell, bases.get(cell["machine_id"]), baseline_id, tol)} for cell in cells]


def _assess(cell: dict, base: dict | None, baseline_id: str, tol: dict) -> dict:
    out: dict = {**dict.fromkeys(ASSESSED), "quality_tokens": greedy_tokens(cell.get("settings_json"))}
    own = _unmeasured(cell)
    if own:
        return {**out, "quality_reason": own}
    if cell["cell_id"] == baseline_id:
        return {**out, "quality_verdict": BASELINE, "quality_reason": "the reference"}
    theirs = _unmeasured(base) if base else "not run on this machine"
    if theirs:
        return {**out, "quality_reason": f"no baseline quality on this machine ({theirs})"}
    if cell.get("quality_method_version") != base.get("quality_method_version"):
        methods = f"v{cell.get('quality_method_version')} vs the baseline's v{base.get('quality_method_version')}"
        return {**out, "quality_reason": f"quality method {methods}: not comparable"}
    rel = relative_delta(cell["quality_bits_per_byte"], base["quality_bits_per_byte"])
    out.update(quality_delta_bpb=rel, quality_delta_nll=nll_delta(cell, base))
    agreed, not_comparable = None, None
    try:
        agreed = agreement(greedy_texts(cell.get("quality_greedy_json")), greedy_texts(base.get("quality_greedy_json")))
    except NotComparable as exc:
        not_comparable = str(exc)
    if agreed is not None:
        out.update(
            quality_prompts=agreed.prompts,
            quality_exact_share=agreed.exact_share,
            quality_prefix_words=agreed.mean_prefix_words,
            quality_first_divergence=agreed.mean_first_divergence,
            quality_diverging=agreed.diverging,
            quality_words=agreed.words,
        )
    if rel is None:
        return {**out, "quality_reason": "the baseline's bits per byte is not positive"}
    judged = verdict(rel, agreed, tol, not_comparable)
    return {**out, "quality_verdict": judged.verdict, "quality_reason": judged.reason}


def _unmeasured(cell: dict) -> str | None:
    """Why a cell has no quality figure to compare, or None when it has one."""
    status = cell.get("quality_status")
    if _missing(status):
        return "not measured"
    if status == "off":
        return "off (quality: false)"
    if status != "ok":
        error = cell.get("quality_error")
        return f"{status}: {error}" if isinstance(error, str) and error else status
    if _missing(cell.get("quality_bits_per_byte")):
        return "no bits per byte recorded"
    return None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def excluded(verdict_value) -> bool:
    """A cell that may not be named fastest: its quality diverged. A cell whose quality was not
    measured is not excluded: nothing is known against it."""
    return verdict_value == DIVERGED


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Per (speed, bits per byte): on the Pareto front, i.e. no other point is at least as fast
    and at most as many bits per byte, and strictly better in one of them."""
    return [
        not any(s >= speed and b <= bpb and (s > speed or b < bpb) for s, b in points)
        for speed, bpb in points
    ]  # fmt: skip


def label(row) -> str:
    """The per-point table's quality cell: '✅ 100% · Δ NLL +0.000', 'baseline', 'not measured'."""
    mark = row.get("quality_verdict")
    if mark == BASELINE:
        return "baseline"
    if mark not in SYMBOL:
        status = row.get("quality_status")
        if _missing(status):
            return "not measured"
        return "no baseline" if status == "ok" else str(status)
    share = row.get("quality_exact_share")
    agreed = "—" if _missing(share) else f"{share:.0%}"
    nll, bpb = row.get("quality_delta_nll"), row.get("quality_delta_bpb")
    delta = f"Δ NLL {nll:+.3f}" if not _missing(nll) else f"Δ bits/byte {percent(bpb)}"
    return f"{SYMBOL[mark]} {agreed} · {delta}"


def greedy_tokens(settings_json) -> int | None:
    """Tokens each prompt was continued for: the cell's `quality.max_tokens` as it recorded its
    settings, or None where it did not."""
    try:
        settings = json.loads(settings_json) if isinstance(settings_json, str) else {}
    except ValueError:
        return None
    given = settings.get("quality") if isinstance(settings, dict) else None
    tokens = given.get("max_tokens") if isinstance(given, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None


def reference_bytes() -> int | None:
    """UTF-8 bytes of the reference text (the divisor of bits per byte)."""
    try:
        return len(paths.QUALITY_REFERENCE.read_bytes())
    except OSError:
        return None
