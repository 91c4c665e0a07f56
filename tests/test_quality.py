"""Quality against the baseline (cellbench.quality): figures computed by hand, each verdict rule,
and the way the tables and "fastest" use them."""

import json

import pandas as pd
import pytest
import test_aggregate
from cellbench import aggregate, quality, report

TOL = quality.tolerance(None)
TEXTS = ["to be or not", "the rose smells sweet", "Romeo, Romeo", "good night"]


def _measured(cell_id, machine="m1", bpb=1.0, nll=2.0, tokens=2851, texts=TEXTS, **extra):
    return {
        "machine_id": machine, "cell_id": cell_id, "quality_status": "ok", "quality_error": None,
        "quality_s": 12.0, "quality_nll": nll, "quality_nll_tokens": tokens, "quality_bits_per_byte": bpb,
        "quality_greedy_json": json.dumps(texts), "quality_method_version": 1, **extra,
    }  # fmt: skip


def test_first_divergence_word_by_word():
    assert quality.first_divergence(["a", "b", "c"], ["a", "b", "c"]) is None
    assert quality.first_divergence(["a", "x", "c"], ["a", "b", "c"]) == 1
    assert quality.first_divergence(["a", "b"], ["a", "c"]) == 1  # last word differs, not a prefix
    # Another tokenizer decodes the same budget to fewer words, the last cut mid-word: agreement.
    assert quality.first_divergence(["a", "Rom"], ["a", "Romeo", "and"]) is None
    assert quality.first_divergence([], ["a"]) == 0
    assert quality.first_divergence([], []) is None


def test_agreement_by_hand():
    cell = ["to be or", "not to be", "x y z", "a b"]
    base = ["to be or", "not to  be", "x q z", "c d"]  # whitespace is not a word
    agreed = quality.agreement(cell, base)
    # exact: 1, 2; divergence at word 1 (3rd) and 0 (4th); prefixes 3, 3, 1, 0; compared 3+3+3+2.
    assert (agreed.prompts, agreed.exact, agreed.diverging, agreed.words) == (4, 2, 2, 11)
    assert agreed.exact_share == 0.5
    assert agreed.mean_prefix_words == pytest.approx(1.75)
    assert agreed.mean_first_divergence == pytest.approx(0.5)


def test_identical_cell_agrees_fully_with_delta_zero_and_passes():
    (_, cell) = quality.assess([_measured("base"), _measured("same")], "base", TOL)
    assert cell["quality_exact_share"] == 1.0 and cell["quality_diverging"] == 0
    assert cell["quality_prefix_words"] == pytest.approx((4 + 4 + 2 + 2) / 4)
    assert cell["quality_first_divergence"] is None  # none diverged: no position to average
    assert (cell["quality_delta_bpb"], cell["quality_delta_nll"]) == (0.0, 0.0)
    assert cell["quality_verdict"] == quality.OK
    assert quality.label(cell) == "✅ 100% · Δ NLL +0.000"


def test_a_different_prompt_count_is_not_comparable():
    with pytest.raises(quality.NotComparable, match="3 prompts vs the baseline's 4"):
        quality.agreement(TEXTS[:3], TEXTS)
    (_, cell) = quality.assess([_measured("base"), _measured("short", texts=TEXTS[:3])], "base", TOL)
    assert cell["quality_verdict"] == quality.DRIFT and cell["quality_exact_share"] is None
    assert cell["quality_reason"] == "greedy texts not compared: 3 prompts vs the baseline's 4"


def test_deltas_by_hand():
    assert quality.relative_delta(1.1, 1.0) == pytest.approx(0.1)
    assert quality.relative_delta(1.0, None) is None
    base = {"quality_nll": 2.0, "quality_nll_tokens": 2851}
    assert quality.nll_delta({"quality_nll": 2.5, "quality_nll_tokens": 2851}, base) == pytest.approx(0.5)
    # Another tokenization: per-token figures of different units, only Δ bits per byte is shown.
    assert quality.nll_delta({"quality_nll": 2.5, "quality_nll_tokens": 2700}, base) is None


def _agreed(share: float) -> quality.Agreement:
    exact = round(share * 20)
    return quality.Agreement(prompts=20, exact=exact, mean_prefix_words=5.0, mean_first_divergence=None, words=100)


@pytest.mark.parametrize(
    ("rel", "share", "expected", "reason"),
    [
        (0.01, 0.9, quality.OK, "bits/byte +1.0%, exact match 90%"),
        (0.02, 0.25, quality.OK, "bits/byte +2.0%, exact match 25%"),  # both bounds inclusive
        (-0.03, 0.9, quality.DRIFT, "bits/byte -3.0%, beyond ±2%"),  # better is still not the same model
        (0.10, 0.9, quality.DRIFT, "bits/byte +10%, beyond ±2%"),
        (0.0, 0.2, quality.DRIFT, "exact match 20%, below 25%"),
        (0.25, 0.0, quality.DRIFT, "bits/byte +25%, beyond ±2%; exact match 0%, below 25%"),
        (3.1, 0.0, quality.DIVERGED, "bits/byte +310%, more than +25%"),
    ],
)
def test_verdict_rules(rel, share, expected, reason):
    judged = quality.verdict(rel, _agreed(share), TOL)
    assert (judged.verdict, judged.reason) == (expected, reason)


def test_verdict_uses_the_study_tolerances():
    assert quality.verdict(0.1, _agreed(1.0), {**TOL, "drift": 0.2}).verdict == quality.OK
    assert quality.verdict(0.1, _agreed(1.0), {**TOL, "diverged": 0.05}).verdict == quality.DIVERGED


def test_tolerance_from_the_study_record_over_the_defaults():
    assert quality.tolerance(None) == TOL
    assert quality.tolerance({"quality_tolerance": {"drift": 0.05}}) == {**TOL, "drift": 0.05}
    assert quality.tolerance({"config": {"quality_tolerance": {"diverged": 0.5}}}) == {**TOL, "diverged": 0.5}


def test_cells_without_quality_have_no_verdict_and_say_why():
    cells = [
        _measured("base"),
        {"machine_id": "m1", "cell_id": "old"},  # a file from before quality: every column null
        {"machine_id": "m1", "cell_id": "off", "quality_status": "off"},
        {
            "machine_id": "m1",
            "cell_id": "gguf",
            "quality_status": "unsupported",
            "quality_error": "engine cannot return prompt log-probabilities",
        },
        _measured("v2", quality_method_version=2),
    ]
    judged = {c["cell_id"]: c for c in quality.assess(cells, "base", TOL)}
    assert judged["base"]["quality_verdict"] == quality.BASELINE and quality.label(judged["base"]) == "baseline"
    assert [judged[c]["quality_verdict"] for c in ("old", "off", "gguf", "v2")] == [None] * 4
    assert judged["old"]["quality_reason"] == "not measured" and quality.label(judged["old"]) == "not measured"
    assert judged["off"]["quality_reason"] == "off (quality: false)"
    assert judged["gguf"]["quality_reason"] == "unsupported: engine cannot return prompt log-probabilities"
    assert quality.label(judged["gguf"]) == "unsupported"
    assert judged["v2"]["quality_reason"] == "quality method v2 vs the baseline's v1: not comparable"


def test_each_machine_compares_with_its_own_baseline():
    cells = [
        _measured("base", "m1", bpb=1.0), _measured("q4", "m1", bpb=1.1),
        _measured("base", "m2", bpb=1.1), _measured("q4", "m2", bpb=1.1),
        {**_measured("base", "m3"), "quality_status": "failed", "quality_error": "out of memory"},
        _measured("q4", "m3"),
    ]  # fmt: skip
    judged = {(c["machine_id"], c["cell_id"]): c for c in quality.assess(cells, "base", TOL)}
    assert judged[("m1", "q4")]["quality_delta_bpb"] == pytest.approx(0.1)
    assert judged[("m2", "q4")]["quality_delta_bpb"] == 0.0
    assert judged[("m3", "q4")]["quality_verdict"] is None
    assert judged[("m3", "q4")]["quality_reason"] == "no baseline quality on this machine (failed: out of memory)"


def test_pareto_front_by_hand():
    # (tok/s, bits per byte): (15, 1.5) is slower and worse than (20, 1.2); the rest trade off.
    assert quality.pareto_front([(10, 1.0), (20, 1.2), (15, 1.5), (5, 0.9)]) == [True, True, False, True]
    assert quality.pareto_front([(10, 1.0), (10, 1.0)]) == [True, True]  # equals do not dominate


def test_cell_settings_name_the_tokens_per_prompt():
    assert quality.greedy_tokens(json.dumps({"quality": {"prompts": 64, "max_tokens": 32}})) == 32
    assert quality.greedy_tokens(json.dumps({"quality": False})) is None
    assert quality.greedy_tokens(None) is None


def _with_quality(rows: list[dict], **values) -> list[dict]:
    """Quality figures on round 1 of the rows (as a cell writes them), null on other rounds."""
    return [{**row, **(values if row["round"] == 1 else {})} for row in rows]


def _quality(bpb: float, texts=TEXTS) -> dict:
    return {
        "quality_status": "ok", "quality_s": 10.0, "quality_nll": 2.0 * bpb, "quality_nll_tokens": 2851,
        "quality_bits_per_byte": bpb, "quality_greedy_json": json.dumps(texts), "quality_method_version": 1,
    }  # fmt: skip


@pytest.fixture
def points(quality_rows):
    return aggregate.cell_points(pd.DataFrame(quality_rows), "base-h")


@pytest.fixture
def quality_rows():
    garbage = ["the the the"] * len(TEXTS)
    return (
        _with_quality(test_aggregate._rows("base", "m1", 1, [10.0, 10.0], rounds=3), **_quality(1.0))
        + _with_quality(test_aggregate._rows("corrupt", "m1", 1, [24.0, 24.0], rounds=3), **_quality(4.1, garbage))
        + _with_quality(test_aggregate._rows("mid", "m1", 1, [20.0, 20.0], rounds=3), **_quality(1.01))
        + test_aggregate._rows("old", "m1", 1, [15.0, 15.0], rounds=3)  # no quality measured
    )


def test_fastest_from_the_polars_points_excludes_alike(quality_rows):
    table, points = test_aggregate._polars_points(pd.DataFrame(quality_rows))
    found = aggregate.fastest_per_point(points, table=table)
    pd.testing.assert_frame_equal(found, aggregate.fastest_per_point(points))
    assert found["excluded"][0][0][0] == "corrupt"


def test_points_carry_their_cells_quality(points):
    by_cell = points.set_index("cell_name")
    assert by_cell.loc["corrupt", "quality_verdict"] == quality.DIVERGED
    assert by_cell.loc["corrupt", "quality_exact_share"] == 0.0
    assert by_cell.loc["mid", "quality_verdict"] == quality.OK
    assert pd.isna(by_cell.loc["old", "quality_status"]) and by_cell.loc["old", "quality_reason"] == "not measured"
    assert "quality_greedy_json" not in points  # kilobytes per cell: never repeated per point


def test_fastest_skips_a_diverged_cell_and_says_so(points):
    (row,) = aggregate.fastest_per_point(points).to_dict("records")
    assert row["fastest"] == "mid" and row["output_tok_s"] == 20.0
    ((cell, ratio, reason),) = row["excluded"]
    assert (cell, ratio) == ("corrupt", pytest.approx(1.2))
    assert reason == "bits/byte +310%, more than +25%"
    assert report.excluded_notes(row) == [
        "`corrupt` was faster (1.20×) but excluded: quality ❌ diverged (bits/byte +310%, more than +25%)"
    ]


def test_a_cell_without_quality_is_not_excluded(points):
    points.loc[points["cell_name"] == "old", "output_tok_s"] = 30.0
    points.loc[points["cell_name"] == "old", "round_means"] = pd.Series([[30.0] * 3]).values
    (row,) = aggregate.fastest_per_point(points).to_dict("records")
    assert row["fastest"] == "old" and row["excluded"] == []  # corrupt (24) is slower than old: no note


def test_summary_shows_the_quality_column_table_and_method(points):
    fastest = aggregate.fastest_per_point(points)
    text = report.summary_markdown(points, fastest, "s", "base")
    assert "| m1 | 1 × 128→64 | **mid**<br>`corrupt` was faster (1.20×) but excluded" in text
    assert "| ❌ 0% · Δ NLL +6.200 |" in text and "| not measured |" in text
    assert "| m1 | corrupt | ❌ diverged | 4.1000 | 8.2000 (2,851) | +310% | +6.2000 | 0% (0/4) |" in text
    assert "compared with the baseline's on the same machine as whitespace-split words" in text


def test_plot_and_page_show_quality_only_where_measured(points, tmp_path):
    import matplotlib.image
    from cellbench import plots, report_html

    drawn = plots.write_plots(points, tmp_path / "plots")
    assert matplotlib.image.imread(tmp_path / "plots" / "quality.png").std() > 0
    page = report_html.page("s", "base", points, [], [], [], drawn, tmp_path / "report" / "index.html")
    assert "../plots/quality.png" in page and "<h2 id=quality>" in page
    assert '<span class="fail-text">❌ diverged</span>' in page and "whitespace-split words" in page
    unmeasured = points[points["cell_name"] == "old"]
    page = report_html.page("s", "base", unmeasured, [], [], [], drawn, tmp_path / "report" / "index.html")
    assert "quality.png" not in page and "No cell measured quality." in page


def test_quality_is_measured_when_a_cell_tried_not_when_every_cell_had_it_off():
    import pandas as pd

    assert not quality.measured(pd.DataFrame())
    assert not quality.measured(pd.DataFrame({"cell_id": ["a"]}))  # files from before quality
    assert not quality.measured(pd.DataFrame({"quality_status": ["off", None]}))
    assert quality.measured(pd.DataFrame({"quality_status": ["off", "unsupported"]}))
    assert quality.measured(pd.DataFrame({"quality_status": [None, "ok"]}))
