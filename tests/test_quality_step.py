"""The container's quality step (bench_cell.py) without an engine: NLL from logits by hand, and a
failing or missing quality method becoming a status, never the cell's failure."""

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nll_of_logits_by_hand(bench):
    # Row 0 predicts ids[1] = 1 from logits (0, ln 3): p = 3/4. Row 1 predicts ids[2] = 0 from
    # (0, 0): p = 1/2. The last row (after the last token) is not used.
    logits = [[0.0, math.log(3)], [0.0, 0.0], [100.0, -100.0]]
    assert bench.nll_of_logits(logits, [0, 1, 0]) == pytest.approx(-math.log(0.75) - math.log(0.5))
    # Large logits do not overflow (log-softmax subtracts the row's maximum).
    assert bench.nll_of_logits([[1000.0, 1000.0]], [0, 1]) == pytest.approx(math.log(2))


TEXTS = {"prompts": ["a"], "chunks": ["b"], "max_tokens": 2, "reference_bytes": 1}


class Scored:
    def quality(self, texts):
        return {"greedy": ["x"], "greedy_tokens": 1, "nll_sum": 1.5, "nll_tokens": 3, "method": "fake"}


class Broken:
    def quality(self, texts):
        raise ValueError("a reference chunk of 600 tokens exceeds the context of 512\nmore detail")


def test_the_quality_step_reports_ok_failed_and_unsupported(bench):
    ok = bench.measure_quality(Scored(), TEXTS)
    assert (ok["status"], ok["error"], ok["nll_sum"], ok["greedy"]) == ("ok", None, 1.5, ["x"])
    assert ok["seconds"] >= 0
    failed = bench.measure_quality(Broken(), TEXTS)
    assert failed["status"] == "failed" and "\n" not in failed["error"]
    assert failed["error"].startswith("ValueError: a reference chunk of 600 tokens exceeds the context of 512")
    unsupported = bench.measure_quality(object(), TEXTS)
    assert unsupported["status"] == "unsupported" and "has no quality step" in unsupported["error"]


def test_check_fits_names_the_limit(bench):
    bench.check_fits(512, 512, "a chunk")
    bench.check_fits(10_000, None, "a chunk")  # no limit set: the engine's own applies
    with pytest.raises(ValueError, match="a chunk of 513 tokens exceeds the context of 512"):
        bench.check_fits(513, 512, "a chunk")
