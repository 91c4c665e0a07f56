"""Statistics over rounds, with hand-computed expectations: intervals, ratios, the tie rule,
flagged rounds left out, verdicts withheld, round interleaving and run comparison."""

import json
import math

import pandas as pd
import pytest
from cellbench import aggregate, compare, metrics, report, scheduling, stats

T95_DF2 = 4.302653  # Student's t, two-sided 95 %, 2 degrees of freedom (any t table)


def test_mean_interval_is_t_over_round_means():
    # mean 12, sample sd 2, se 2/sqrt(3) = 1.1547; half width 4.302653 * 1.1547 = 4.9683
    found = stats.mean_interval([10, 12, 14])
    assert found.estimate == 12
    assert (found.low, found.high) == pytest.approx((12 - 4.9683, 12 + 4.9683), abs=1e-4)
    assert not stats.mean_interval([12]).known  # one round: no interval


def test_paired_ratio_interval_on_log_differences():
    # per-round ln(a/b): ln 2.0, ln 2.2, ln 1.8 = 0.693147, 0.788457, 0.587787
    # mean 0.689797, sd 0.100378, se 0.057953, half 4.302653 * 0.057953 = 0.249353
    found = stats.ratio_interval({1: 20, 2: 22, 3: 18}, {1: 10, 2: 10, 3: 10})
    assert found.estimate == pytest.approx(math.exp(0.689797), rel=1e-5)
    assert found.low == pytest.approx(math.exp(0.689797 - 0.249353), rel=1e-4)
    assert found.high == pytest.approx(math.exp(0.689797 + 0.249353), rel=1e-4)
    assert stats.significance(found) == "faster"


def test_unpaired_ratio_is_welch_on_log_means():
    # no common round: geometric means sqrt(120) / sqrt(30) = 2 exactly; each side's log variance
    # (ln 1.2)^2 / 2 = 0.016620, se = sqrt(2 * 0.016620 / 2) = 0.128920, Welch df = 2
    found = stats.ratio_interval({1: 10, 2: 12}, {3: 5, 4: 6})
    assert found.estimate == pytest.approx(2.0)
    half = T95_DF2 * 0.128920
    assert (found.low, found.high) == pytest.approx((2 * math.exp(-half), 2 * math.exp(half)), rel=1e-4)
    # Rounds of two runs are never paired, even when their numbers coincide.
    assert stats.ratio_interval({1: 10, 2: 12}, {1: 5, 2: 6}, paired=False).estimate == pytest.approx(2.0)


def test_ratio_interval_is_symmetric_in_direction():
    a, b = {1: 100, 2: 90, 3: 95}, {1: 50, 2: 60, 3: 55}
    ab, ba = stats.ratio_interval(a, b), stats.ratio_interval(b, a)
    assert ab.low == pytest.approx(1 / ba.high) and ab.high == pytest.approx(1 / ba.low)


def test_tie_rule_names_a_winner_only_when_significant():
    # A and B overlap round by round (paired ratio interval 0.975-1.032 contains 1): a tie.
    # C is half as fast: never part of the tie.
    means = {"A": {1: 100, 2: 101, 3: 99}, "B": {1: 99, 2: 102, 3: 100}, "C": {1: 50, 2: 51, 3: 49}}
    leaders, margin, runner_up = stats.rank(means)
    assert leaders == ["B", "A"] and runner_up == "A" and margin.contains(1.0)
    leaders, margin, runner_up = stats.rank({"A": means["A"], "C": means["C"]})
    assert leaders == ["A"] and runner_up == "C" and margin.low > 1.9
    # One round each: no interval, so no winner is named.
    assert stats.rank({"A": {1: 100}, "C": {1: 50}})[0] == ["A", "C"]


def test_a_best_cell_with_one_round_ties_with_every_cell_as_the_comparisons_would_say():
    """rank's shortcut (no interval for a best of fewer than 2 rounds) gives what comparing the
    best with each cell gives, cell by cell."""

    def slow(means):
        order = sorted(means, key=lambda name: -stats._mean(list(means[name].values())))
        best = order[0]
        return [best] + [
            name for name in order[1:] if stats.significance(stats.ratio_interval(means[best], means[name])) != "faster"
        ]

    cases = [
        {"A": {1: 100}, "B": {1: 90, 2: 91, 3: 89}, "C": {1: 10, 2: 11}},  # best has 1 round: all tie
        {"A": {1: 100, 2: 0}, "B": {1: 50, 2: 51}},  # a round of 0 does not count: 1 usable round
        {"A": {1: 100, 2: 101, 3: 99}, "B": {1: 101, 2: 98}, "C": {1: 50, 2: 51, 3: 49}},  # the long way
    ]
    for means in cases:
        assert stats.rank(means)[0] == slow(means)
    assert stats.rank(cases[0])[0] == ["A", "B", "C"] and stats.rank(cases[2])[0] == ["A", "B"]


def test_between_and_within_round_spread():
    # round means 11 and 15: sd 2.828 / 13 = 21.8 %; repeats vary by sd 1.414 in each: 10.9 %
    rows = [_row("base", 1, 0, 10), _row("base", 1, 1, 12), _row("base", 2, 0, 14), _row("base", 2, 1, 16)]
    point = aggregate.cell_points(metrics.to_table(rows), "base-0123456789").iloc[0]
    assert point["between_cv"] == pytest.approx(2 * math.sqrt(2) / 13)
    assert point["within_cv"] == pytest.approx(math.sqrt(2) / 13)


def _row(cell, round_, repeat, tok, **extra):
    return {
        "schema_version": 1, "method_version": 1, "study": "s", "cell_id": f"{cell}-0123456789",
        "cell_name": cell, "machine_id": "m", "run_id": f"run-{cell}-{round_}", "status": "ok",
        "engine": "vllm", "image": "cpu", "device": "cpu", "model": "x", "mode": "offline",
        "dtype": "bfloat16", "batch_size": 1, "input_len": 8, "output_len": 8, "repeat": repeat,
        "round": round_, "output_tok_s": tok, "config_hash": "h", "settings_json": "{}",
        "host_foreign_cpu": 0.02, "canary_matmul_1t_gflops": 30.0, **extra,
    }  # fmt: skip


def _study_rows(disturbed_round=None):
    rows = []
    for round_, (fast, base) in enumerate([(100, 50), (104, 51), (98, 49)], start=1):
        rows += [_row("base", round_, 0, base), _row("base", round_, 1, base + 1)]
        rows += [_row("fast", round_, 0, fast), _row("fast", round_, 1, fast + 2)]
    if disturbed_round:
        # A 4th round during which another process used a whole core: fast fell to 10 tok/s.
        rows += [_row("fast", 4, 0, 10, host_foreign_cpu=1.0), _row("base", 4, 0, 50, canary_matmul_1t_gflops=10.0)]
    return metrics.to_table(rows)


def test_flagged_rounds_are_left_out_of_figures_and_kept_as_rows():
    points = aggregate.cell_points(_study_rows(disturbed_round=4), "base-0123456789").set_index("cell_name")
    fast = points.loc["fast"]
    # rounds 1-3: means 101, 105, 99 -> 101.667; sd 3.055, half 4.302653 * 3.055 / sqrt(3) = 7.589
    assert fast["output_tok_s"] == pytest.approx(101.6667, abs=1e-4)
    assert (fast["output_tok_s_low"], fast["output_tok_s_high"]) == pytest.approx((94.078, 109.256), abs=1e-3)
    assert (fast["rounds"], fast["rounds_total"], fast["rounds_flagged"]) == (3, 4, 1)
    assert fast["round_flag"] == "other processes used 1.0 CPU cores"
    # The base cell's 4th round ran with a canary at a third of the median (30): flagged too.
    assert points.loc["base", "round_flag"] == "canary matmul_1t_gflops at 0.33× the machine's median"
    assert fast["vs_baseline_significance"] == "faster"
    # Kept when the study says so.
    kept = aggregate.cell_points(_study_rows(4), "base-0123456789", {"exclude_flagged": False})
    assert kept.set_index("cell_name").loc["fast", "rounds"] == 4


def test_a_point_with_only_flagged_rounds_keeps_its_figure_but_no_verdict(tmp_path):
    # Every round of both cells ran beside another process (a busy laptop, a CI runner): the
    # figures are still shown, from the flagged rounds, but count as 0 trusted rounds.
    busy = [{**r, "host_foreign_cpu": 0.9} for r in _study_rows().to_pylist()]
    points = aggregate.cell_points(metrics.to_table(busy), "base-0123456789").set_index("cell_name")
    fast = points.loc["fast"]
    assert fast["output_tok_s"] == pytest.approx(101.6667, abs=1e-4)  # rounds 1-3 as above
    assert (fast["rounds"], fast["rounds_flagged"], bool(fast["flagged_only"])) == (0, 3, True)
    text = report.write_tables(points.reset_index(), "s", "base", tmp_path)[0].read_text()
    assert "**Verdicts withheld on m**" in text and "quiet the host" in text and "**fast**" not in text
    assert "| 0/3 (3 flagged ⚠ figure from these alone) |" in text
    # A clean round anywhere at the point: the flagged ones are left out as before.
    mixed = busy + [{**r, "round": 4} for r in _study_rows().to_pylist() if r["round"] == 1]
    points = aggregate.cell_points(metrics.to_table(mixed), "base-0123456789").set_index("cell_name")
    assert (points.loc["fast", "rounds"], bool(points.loc["fast", "flagged_only"])) == (1, False)
    assert points.loc["fast", "output_tok_s"] == pytest.approx(101.0)


def test_a_failed_round_leaves_the_other_rounds_standing():
    table = _study_rows().to_pylist()
    table += [{**_row("fast", 4, None, None), "status": "timeout", "error": "cell exceeded its timeout"}]
    points = aggregate.cell_points(metrics.to_table(table), "base-0123456789").set_index("cell_name")
    assert points.loc["fast", "status"] == "ok"
    assert (points.loc["fast", "rounds"], points.loc["fast", "rounds_failed"]) == (3, 1)


def test_summary_withholds_verdicts_with_too_few_clean_rounds(tmp_path):
    one_round = metrics.to_table([r for r in _study_rows().to_pylist() if r["round"] == 1])
    points = aggregate.cell_points(one_round, "base-0123456789")
    text = report.write_tables(points, "s", "base", tmp_path)[0].read_text()
    assert "**Verdicts withheld on m**" in text and "add rounds (`sweep.rounds`, now 1" in text
    assert "| m | 1 × 8→8 | withheld (see above) |" in text
    assert "**fast**" not in text
    points = aggregate.cell_points(_study_rows(), "base-0123456789")
    text = report.write_tables(points, "s", "base", tmp_path)[0].read_text()
    assert "withheld" not in text and "| m | 1 × 8→8 | **fast** |" in text


def test_rounds_interleave_and_alternate_cell_order():
    cells = {name: {"sweep": {"rounds": rounds}} for name, rounds in (("a", 2), ("b", 2), ("c", 1))}
    priority = scheduling.round_priorities(cells)
    order = sorted(priority, key=lambda key: -priority[key])
    assert order == [("a", 1), ("b", 1), ("c", 1), ("b", 2), ("a", 2)]


def test_compare_runs_states_change_with_significance(tmp_path):
    before = aggregate.cell_points(_study_rows(), "")
    faster = metrics.to_table([{**r, "output_tok_s": r["output_tok_s"] * 1.5} for r in _study_rows().to_pylist()])
    table = compare.compare(before, aggregate.cell_points(faster, ""))
    assert set(table["significance"]) == {"faster"}
    assert table["ratio"].tolist() == pytest.approx([1.5, 1.5])
    same = compare.compare(before, before)
    assert set(same["significance"]) == {"same"}
    assert "0 of 2 cell points changed significantly" in compare.render(same, "a", "b", 0.95)


def test_compare_refuses_other_studies_and_unknown_runs(tmp_path):
    points = aggregate.cell_points(_study_rows(), "")
    other = points.assign(study="another")
    with pytest.raises(compare.CompareError, match="runs of different studies"):
        compare.compare(points, other)
    with pytest.raises(compare.CompareError, match="20990101T000000Z: no such run"):
        compare.locate("20990101T000000Z", runs=tmp_path)


def test_a_run_is_kept_only_when_rows_changed(tmp_path):
    summary = tmp_path / "summary.parquet"
    metrics.write_parquet(summary, _study_rows())
    runs = tmp_path / "runs"
    first = compare.snapshot(summary, "m", runs)
    assert first is not None and compare.snapshot(summary, "m", runs) is None
    assert compare.snapshot(summary, "another-machine", runs) is None  # no rows of that machine
    assert pd.read_parquet(first)["machine_id"].unique().tolist() == ["m"]
    assert json.loads(json.dumps(compare.list_runs(runs))) == [first.stem]


def test_a_failed_cell_without_an_error_says_so(tmp_path):
    table = _study_rows().to_pylist() + [{**_row("dead", 1, None, None), "status": "failed", "error": None}]
    points = aggregate.cell_points(metrics.to_table(table), "base-0123456789")
    text = report.write_tables(points, "s", "base", tmp_path)[0].read_text()
    assert "| m | dead | failed | no error recorded |" in text and "| nan |" not in text


def test_csv_gives_the_same_bytes_for_figures_that_differ_only_in_the_last_bit():
    # polars' parallel group_by may add a group's floats in another order from run to run.
    one = pd.DataFrame({"cell": ["a"], "between_cv": [0.07894394454276703], "rounds": [3]})
    two = one.assign(between_cv=[0.07894394454276701])
    assert report.csv_text(one) == report.csv_text(two) == "cell,between_cv,rounds\na,0.0789439445428,3\n"
