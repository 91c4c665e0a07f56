"""cellbench.serving: request timings, the steady-state window, SLO share, goodput and the capacity
search, each against figures computed by hand."""

import random
import statistics

import pytest
from cellbench import serving


def _level():
    """Five requests of one level in send order: 1 warm-up, 3 measured, 1 cool-down; seconds."""
    return [
        {"send_s": 0.0, "chunk_s": [1.0, 2.0], "prompt_tokens": 10, "output_tokens": 2},  # warm-up
        # TTFT 0.5, E2E 1.5, ITLs 0.5 0.5, TPOT (1.5 - 0.5) / 2 = 0.5
        {"send_s": 1.0, "chunk_s": [1.5, 2.0, 2.5], "prompt_tokens": 10, "output_tokens": 3},
        # TTFT 0.2, E2E 0.4, ITL 0.2, TPOT 0.2
        {"send_s": 2.0, "chunk_s": [2.2, 2.4], "prompt_tokens": 10, "output_tokens": 2},
        # failed at 3.0: ends the window, never meets an SLO
        {"send_s": 2.5, "chunk_s": [], "prompt_tokens": 10, "output_tokens": 0, "error": "boom", "end_s": 3.0},
        {"send_s": 3.0, "chunk_s": [5.0], "prompt_tokens": 10, "output_tokens": 1},  # cool-down
    ]


def test_request_timings_are_vllms():
    timed = serving.request_timings({"send_s": 0.2, "chunk_s": [0.9, 1.3, 1.5], "output_tokens": 3})
    assert timed["ok"]
    assert timed["ttft_s"] == pytest.approx(0.7)
    assert timed["e2e_s"] == pytest.approx(1.3)
    assert timed["itl_s"] == pytest.approx([0.4, 0.2])
    assert timed["tpot_s"] == pytest.approx(0.3)  # (1.3 - 0.7) / (3 - 1)
    one = serving.request_timings({"send_s": 0.0, "chunk_s": [0.5], "output_tokens": 1})
    assert one["tpot_s"] is None and one["itl_s"] == []
    failed = serving.request_timings({"send_s": 0.0, "chunk_s": [0.5], "output_tokens": 1, "error": "reset"})
    assert not failed["ok"] and failed["ttft_s"] is None


def test_a_budget_is_met_at_equality_and_a_one_token_answer_has_tpot_zero():
    timed = serving.request_timings({"send_s": 0.0, "chunk_s": [0.5, 0.6], "output_tokens": 2})
    assert serving.meets_slo(timed, {"ttft_ms": 500})  # vLLM: budget >= value
    assert not serving.meets_slo(timed, {"ttft_ms": 499.9})
    assert serving.meets_slo(timed, {"ttft_ms": 500, "tpot_ms": 100, "e2e_ms": 600})
    assert not serving.meets_slo(timed, {"ttft_ms": 500, "tpot_ms": 99})
    one = serving.request_timings({"send_s": 0.0, "chunk_s": [0.5], "output_tokens": 1})
    assert serving.meets_slo(one, {"tpot_ms": 1})


def test_steady_state_window_is_first_measured_send_to_last_measured_end():
    warmup, measured, cooldown = serving.split(_level(), 1, 3)
    assert (len(warmup), len(measured), len(cooldown)) == (1, 3, 1)
    # sends 1.0, 2.0, 2.5; ends 2.5 (last chunk), 2.4, 3.0 (failed): the warm-up's and the
    # cool-down's times (0.0, 5.0) stay out
    assert serving.window(measured) == (1.0, 3.0)
    assert serving.window([]) is None


def test_level_figures_by_hand():
    f = serving.level_figures(_level(), 1, 3, {"ttft_ms": 300})
    assert f["duration"] == pytest.approx(2.0)
    assert (f["completed"], f["failed"], f["requests_measured"], f["requests_warmup"]) == (2, 1, 3, 1)
    assert (f["total_input_tokens"], f["total_output_tokens"]) == (20, 5)  # completed requests only
    assert f["request_throughput"] == pytest.approx(1.0)
    assert f["output_throughput"] == pytest.approx(2.5)
    assert f["total_token_throughput"] == pytest.approx(12.5)
    # TTFT 500 ms misses 300, 200 ms meets it, the failed one does not: 1 good of 3 measured
    assert f["good"] == 1
    assert f["slo_share"] == pytest.approx(1 / 3)
    assert f["request_goodput"] == pytest.approx(0.5)  # 1 / 2.0 s
    assert f["median_ttft_ms"] == pytest.approx(350)
    assert f["p90_ttft_ms"] == pytest.approx(200 + 0.9 * 300)
    assert f["mean_ttft_ms"] == pytest.approx(350)
    assert f["std_ttft_ms"] == pytest.approx(150)  # population std of 200, 500
    assert f["mean_tpot_ms"] == pytest.approx(350)
    assert f["median_itl_ms"] == pytest.approx(500)  # 200, 500, 500
    assert f["mean_itl_ms"] == pytest.approx(400)
    assert f["mean_e2el_ms"] == pytest.approx(950)
    assert f["first_error"] == "boom"


def test_no_request_meets_the_slo():
    f = serving.level_figures(_level(), 1, 3, {"e2e_ms": 100})
    assert f["good"] == 0 and f["slo_share"] == 0 and f["request_goodput"] == 0
    assert not serving.passed(f, 0.1)


def test_every_request_meets_the_slo():
    requests = [r for r in _level() if not r.get("error")]  # 4: warm-up, 2 measured, cool-down
    f = serving.level_figures(requests, 1, 2, {"ttft_ms": 1000, "e2e_ms": 2000})
    assert f["slo_share"] == 1.0
    # window 1.0 .. 2.5: 2 good requests in 1.5 s, goodput = request throughput
    assert f["request_goodput"] == pytest.approx(2 / 1.5) == f["request_throughput"]
    assert serving.passed(f, 1.0)


def test_without_an_slo_there_is_no_share_and_no_goodput():
    f = serving.level_figures(_level(), 1, 3)
    assert f["slo_share"] is None and f["request_goodput"] is None and f["good"] is None
    assert not serving.passed(f, 0.9)


def test_a_level_whose_requests_all_failed():
    requests = [{"send_s": t, "chunk_s": [], "output_tokens": 0, "error": "500", "end_s": t + 0.5} for t in (0, 1)]
    f = serving.level_figures(requests, 0, 2, {"ttft_ms": 500})
    assert (f["completed"], f["failed"]) == (0, 2)
    assert f["duration"] == pytest.approx(1.5)
    assert f["request_throughput"] == 0 and f["request_goodput"] == 0 and f["slo_share"] == 0
    assert f["median_ttft_ms"] is None and f["mean_e2el_ms"] is None
    assert f["first_error"] == "500"


def test_a_level_that_never_sent_has_no_duration():
    f = serving.level_figures([], 2, 4, {"ttft_ms": 1})
    assert f["duration"] is None and f["request_throughput"] is None and f["slo_share"] is None


def _search(curve, search):
    """Run the search against a made-up SLO curve: load -> held; return the probes."""
    probes = []
    while (load := serving.next_probe(probes, search)) is not None:
        probes.append((load, curve(load)))
        assert len(probes) < 50
    return probes


def test_search_brackets_by_doubling_then_bisects_to_the_resolution():
    search = {"metric": "request_rate", "low": 0.5, "high": 16, "resolution": 0.25}
    probes = _search(lambda rate: rate <= 3.3, search)
    # doubling: 0.5 1 2 held, 4 missed; bisection: 3 held, 3.5 missed, 3.25 held (3.5 - 3.25 <= 0.25)
    assert probes == [(0.5, True), (1, True), (2, True), (4, False), (3, True), (3.5, False), (3.25, True)]
    assert serving.outcome(probes, search) == {
        "capacity": 3.25, "bound": "exact", "reason": "holds at 3.25, misses at 3.5 req/s"
    }  # fmt: skip


def test_search_over_concurrency_stays_on_integers():
    search = {"metric": "concurrency", "low": 1, "high": 64, "resolution": 1}
    probes = _search(lambda c: c <= 5, search)
    assert probes == [(1, True), (2, True), (4, True), (8, False), (6, False), (5, True)]
    assert serving.outcome(probes, search)["capacity"] == 5


def test_search_whose_lower_bound_fails_has_no_capacity():
    search = {"metric": "request_rate", "low": 2, "high": 8, "resolution": 0.5}
    probes = _search(lambda rate: False, search)
    assert probes == [(2, False)]
    found = serving.outcome(probes, search)
    assert found["capacity"] is None and found["bound"] == "none"
    assert found["reason"] == "the lower bound 2 req/s already misses the SLO"


def test_search_whose_upper_bound_holds_says_at_least():
    search = {"metric": "concurrency", "low": 3, "high": 10, "resolution": 1}
    probes = _search(lambda c: True, search)
    assert probes == [(3, True), (6, True), (10, True)]  # doubling capped at high
    assert serving.outcome(probes, search)["bound"] == "at least"


def test_a_non_monotone_probe_above_the_ceiling_is_ignored():
    search = {"metric": "request_rate", "low": 1, "high": 8, "resolution": 1}
    probes = [(1, True), (2, False), (4, True)]
    assert serving.next_probe(probes, search) is None  # 2 - 1 <= resolution
    assert serving.outcome(probes, search)["capacity"] == 1


def test_plan_measures_k_waves():
    k = 8
    assert serving.plan(serving.level("concurrency", 4, "sweep"), k, None, None) == {"warmup": 4, "measured": 32}
    rate = serving.level("request_rate", 2.0, "sweep")
    # in flight: ceil(2 req/s x 1.2 s) = 3
    assert serving.plan(rate, k, None, 1.2) == {"warmup": 3, "measured": 24}
    assert serving.plan(rate, k, 0, 0.1) == {"warmup": 0, "measured": 8}


def test_arrivals_are_gamma_with_mean_one_over_rate():
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):
        gaps = serving.arrival_gaps(2.0, burstiness, random.Random(7))
        sample = [next(gaps) for _ in range(40000)]
        assert statistics.fmean(sample) == pytest.approx(0.5, rel=0.03)
        # gamma: CV = 1 / sqrt(shape)
        assert statistics.pstdev(sample) / statistics.fmean(sample) == pytest.approx(cv, rel=0.05)
    again = serving.arrival_gaps(2.0, 1.0, random.Random(7))
    assert next(again) == next(serving.arrival_gaps(2.0, 1.0, random.Random(7)))


def test_levels_of_a_cell():
    serve = {"concurrency": [1, 4], "request_rate": [0.5], "burstiness": 0.5}
    levels = serving.sweep_levels(serve)
    assert [serving.label(x) for x in levels] == ["concurrency 1", "concurrency 4", "rate 0.5 req/s (burstiness 0.5)"]
    assert serving.has_levels(serve) and not serving.has_levels({"request_rate": 2.0}) and not serving.has_levels({})
    assert serving.settings({"search": {"metric": "concurrency"}})["search"]["slo_share"] == 0.9


def test_slo_text():
    assert serving.slo_text({"tpot_ms": 50, "ttft_ms": 500}, 0.9) == "SLO share ≥ 0.9 (TTFT ≤ 500 ms, TPOT ≤ 50 ms)"


def test_max_probes_bounds_every_search():
    for search, curve in (
        ({"metric": "request_rate", "low": 0.5, "high": 16, "resolution": 0.25}, lambda r: r <= 3.3),
        ({"metric": "concurrency", "low": 1, "high": 64, "resolution": 1}, lambda c: c <= 5),
        ({"metric": "request_rate", "low": 1, "high": 8, "resolution": 0.01}, lambda r: r <= 7.99),
        ({"metric": "concurrency", "low": 3, "high": 10, "resolution": 1}, lambda c: True),
    ):
        assert len(_search(curve, search)) <= serving.max_probes(search)


def test_most_in_flight_is_the_largest_batch_concurrency_or_concurrency_search_bound():
    assert serving.most_in_flight(None, [1, 8]) == 8
    assert serving.most_in_flight({"concurrency": [1, 4, 16]}, [1]) == 16
    assert serving.most_in_flight({"request_rate": [0.5, 2]}, [1]) == 1  # rates: the server's queue
    search = {"metric": "concurrency", "low": 1, "high": 32, "resolution": 1}
    assert serving.most_in_flight({"concurrency": [4], "search": search}, [1]) == 32
    rate_search = {"metric": "request_rate", "low": 0.5, "high": 8, "resolution": 0.5}
    assert serving.most_in_flight({"concurrency": [4], "search": rate_search}, [2]) == 4
    assert serving.most_in_flight({}, []) == 1
