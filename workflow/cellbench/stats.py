"""Statistics over rounds: the unit of independence is a round, not a repeat.

A round is a fresh container and engine load that measures every point. Repeats inside one
engine load share its state (memory layout, compiled kernels, the host's mood of the minute), so
they agree far more closely than two loads do; treating them as independent samples gives
intervals that a rerun does not honour. Every interval here is therefore taken over round means.

Method, and why:
- A point's interval: Student's t on the round means (each round mean is an average of repeats,
  so close to normal; t is exact for normal data and honest with 3-5 rounds, where a bootstrap
  cannot resample enough distinct sets to say anything).
- A ratio of two cells at a point: t on the per-round differences of log means when both cells
  have the same rounds (paired: rounds are interleaved, so a host drift that slowed round 2 of one
  cell slowed round 2 of the other too and cancels), else Welch's t on the log round means.
  The log makes the interval of a ratio symmetric in the ratio's direction (A/B and B/A agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_CONFIDENCE = 0.95


# t_quantile's values so far, {(confidence, df): value}: an aggregation loads those an earlier
# one kept (load_quantiles), so that one that meets no new df never imports scipy (0.4 s).
KNOWN_QUANTILES: dict[tuple[float, float], float] = {}
_quantiles_added = False


def t_quantile(confidence: float, df: float) -> float:
    """Two-sided Student's t critical value: the inverse of the t distribution's CDF, which is
    what scipy.stats.t.ppf computes too; scipy.special alone imports in a third of the time."""
    global _quantiles_added
    if df != df:  # NaN, as stdtrit gives it
        return math.nan
    key = (float(confidence), float(df))
    if key not in KNOWN_QUANTILES:
        from scipy.special import stdtrit  # only the aggregation needs it

        KNOWN_QUANTILES[key] = float(stdtrit(df, 0.5 + confidence / 2))
        _quantiles_added = True
    return KNOWN_QUANTILES[key]


def load_quantiles(path) -> None:
    """Add the t quantiles kept in `path` (save_quantiles) to KNOWN_QUANTILES, where its first line is
    the sha256 of the rest (else nothing: they are computed again)."""
    from . import atomic

    try:
        kept = atomic.read_checked_json(path)
        if kept is None:
            return
        found = {(float(c), float(df)): float(v) for c, df, v in kept}
    except (OSError, ValueError, TypeError):
        return
    for key, value in found.items():
        KNOWN_QUANTILES.setdefault(key, value)


def save_quantiles(path) -> None:
    """Keep KNOWN_QUANTILES in `path` (atomically, with its check line) if any was computed here."""
    from . import atomic

    if not _quantiles_added:
        return
    atomic.write_checked_json(path, [[c, df, v] for (c, df), v in sorted(KNOWN_QUANTILES.items())])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _var(values: Sequence[float]) -> float:
    """Sample variance (n - 1)."""
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval; low/high are None when too few rounds give one."""

    estimate: float
    low: float | None
    high: float | None
    rounds: int

    def contains(self, value: float) -> bool:
        return self.low is not None and self.low <= value <= self.high

    @property
    def known(self) -> bool:
        return self.low is not None


def mean_interval(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Mean of round means with its t interval (none with fewer than 2 rounds)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no rounds")
    mean = _mean(values)
    if len(values) < 2:
        return Interval(mean, None, None, len(values))
    half = t_quantile(confidence, len(values) - 1) * math.sqrt(_var(values) / len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def ratio_interval(
    a: dict[int, float], b: dict[int, float], confidence: float = DEFAULT_CONFIDENCE, paired: bool = True
) -> Interval | None:
    """a / b from round means keyed by round number: paired on the rounds both have (2 or more),
    else (or when `paired` is false: rounds of two different runs) Welch on log means. The
    estimate is the geometric mean of the ratio; None when either side has no round."""
    a = {k: v for k, v in a.items() if v and v > 0}
    b = {k: v for k, v in b.items() if v and v > 0}
    if not a or not b:
        return None
    common = sorted(set(a) & set(b))
    if paired and len(common) >= 2:
        diffs = [math.log(a[k]) - math.log(b[k]) for k in common]
        mean = _mean(diffs)
        half = t_quantile(confidence, len(diffs) - 1) * math.sqrt(_var(diffs) / len(diffs))
        return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(diffs))
    la, lb = [math.log(v) for v in a.values()], [math.log(v) for v in b.values()]
    estimate = math.exp(_mean(la) - _mean(lb))
    if len(la) < 2 or len(lb) < 2:
        return Interval(estimate, None, None, min(len(la), len(lb)))
    va, vb = _var(la) / len(la), _var(lb) / len(lb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(estimate, estimate, estimate, min(len(la), len(lb)))
    # Welch-Satterthwaite degrees of freedom.
    df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
    half = t_quantile(confidence, df) * se
    mean = math.log(estimate)
    return Interval(estimate, math.exp(mean - half), math.exp(mean + half), min(len(la), len(lb)))


def significance(interval: Interval | None) -> str:
    """ "faster" / "slower" when the ratio's interval excludes 1, "same" when it contains 1,
    "unknown" without an interval."""
    if interval is None or not interval.known:
        return "unknown"
    if interval.low > 1:
        return "faster"
    if interval.high < 1:
        return "slower"
    return "same"


def rank(
    means: dict[str, dict[int, float]], confidence: float = DEFAULT_CONFIDENCE
) -> tuple[list[str], Interval | None, str | None]:
    """The fastest cell of a point, stated only when it is significantly faster than the
    runner-up: returns (leaders, interval of best / runner-up, runner-up). One leader is a winner;
    several are a tie (every cell not significantly slower than the best, fastest first)."""
    # -_mean of each cell's round means, inline: 200,000 calls at 10,000 cells (the same sum, in the same order)
    order = sorted(means, key=lambda name: -(sum(means[name].values()) / len(means[name])))
    if not order:
        return [], None, None
    best = order[0]
    if len(order) == 1:
        return [best], None, None
    margin = ratio_interval(means[best], means[order[1]], confidence)
    if significance(margin) == "faster":
        return [best], margin, order[1]
    if sum(1 for v in means[best].values() if v and v > 0) < 2:
        # The best has no interval against any cell (ratio_interval needs 2 rounds on each side):
        # every cell ties with it, as the loop below would find one ratio at a time.
        return order, margin, order[1]
    tied = [best] + [
        name for name in order[1:] if significance(ratio_interval(means[best], means[name], confidence)) != "faster"
    ]
    return tied, margin, order[1]
