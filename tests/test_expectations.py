import pandas as pd
import pytest
from cellbench import expectations


def points(*rows):
    return pd.DataFrame(
        [
            {"machine_id": m, "cell_name": c, "batch_size": b, "input_len": 128, "output_len": 128, "status": s,
             "output_tok_s": v, "vs_baseline": r}
            for m, c, b, s, v, r in rows
        ]
    )  # fmt: skip


SEED = [  # the seed's AMD table: bf16 8B 25-30 tok/s, AWQ 8B 35-45 tok/s at batch 1
    {"cells": "bf16*", "batch_size": 1, "metric": "output_tok_s", "min": 25, "max": 30, "source": "seed"},
    {"cells": ["awq", "awq-*"], "batch_size": 1, "metric": "output_tok_s", "min": 35, "max": 45, "source": "seed"},
]


def test_verdicts_mark_in_and_out_of_range():
    measured = points(
        ("amd", "bf16", 1, "ok", 28.0, 1.0),
        ("amd", "awq", 1, "ok", 19.3, 0.69),
        ("amd", "awq-eager", 1, "failed", None, None),
        ("amd", "awq", 32, "ok", 400.0, 1.4),
    )
    found = {(v["cell_name"], v.get("batch_size")): v["verdict"] for v in expectations.verdicts(measured, SEED)}
    assert found == {("bf16", 1): "✅", ("awq", 1): "❌", ("awq-eager", 1): "❌"}


@pytest.mark.parametrize("value, expected", [(25, True), (30, True), (24.99, False), (30.01, False), (None, False)])
def test_range_bounds_are_inclusive(value, expected):
    assert expectations.in_range(value, 25, 30) is expected


def test_open_ranges_and_an_expectation_nothing_matched():
    measured = points(("cpu", "vllm", 1, "ok", 14.0, 1.0))
    only_min = [{"cells": "vllm", "metric": "output_tok_s", "min": 1}]
    assert expectations.verdicts(measured, only_min)[0]["verdict"] == "✅"
    nothing = expectations.verdicts(measured, [{"cells": "gpu-*", "metric": "output_tok_s", "max": 5}])
    assert nothing[0]["verdict"] == expectations.MISSING


def test_ratios_in_words():
    measured = points(
        ("amd", "bf16", 1, "ok", 28.0, 1.0),
        ("amd", "bf16", 32, "ok", 300.0, 1.0),
        ("amd", "awq", 1, "ok", 19.3, 0.69),
        ("amd", "awq", 32, "ok", 420.0, 1.4),
    )
    # One round each (no interval): the sentence says so instead of stating the ratio bare.
    assert expectations.ratio_sentences(measured, "bf16") == [
        "awq is 0.69× bf16 at batch 1; 1.40× at batch 32 (no interval: fewer than 2 rounds paired with the baseline)"
    ]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"cells": "vllm*", "metric": "output_tok_s", "min": 5, "max": 1}, "min 5 is above max 1"),
        ({"cells": "vllm*", "metric": "output_tok_s"}, r"expectations\[0\]"),
        ({"cells": "vllm*", "metric": "speed", "min": 1}, r"expectations\[0\].metric"),
    ],
)
def test_bad_expectations_are_one_line_errors(study, entry, message):
    from cellbench import config

    study["expectations"] = [entry]
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(study)


def test_bad_bandwidth_regex_is_an_error(study):
    from cellbench import config

    study["bandwidth_gb_s"] = {"(": 10}
    with pytest.raises(config.ConfigError, match="bandwidth_gb_s"):
        config.resolve(study)


def test_ratio_of_a_cell_that_measured_the_same_says_so():
    measured = points(("cpu", "ok", 1, "ok", 9.0, 1.0), ("cpu", "fork", 1, "ok", 4.0, 0.44))
    measured["same_as"] = [None, "same as ok: VLLM_WORKER_MULTIPROC_METHOD forced to spawn by the engine"]
    (sentence,) = expectations.ratio_sentences(measured, "ok")
    assert (
        sentence.startswith(
            "fork is 0.44× ok at batch 1 (no interval: fewer than 2 rounds paired with the baseline) (same as ok:"
        )
        and "run-to-run spread" in sentence
    )
