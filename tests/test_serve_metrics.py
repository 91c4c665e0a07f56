"""Serve-mode metrics from recorded timestamps, checked against figures computed by hand."""

import pytest
from cellbench import measure, metrics


def _point():
    # Two streamed requests; times are seconds since the point started.
    return {
        "wall_s": 1.5,
        "requests": [
            # 4 tokens in 4 chunks: TTFT 0.5, E2E 1.0, ITLs 0.1 0.2 0.2, TPOT (1.0-0.5)/3
            {"prompt_tokens": 10, "output_tokens": 4, "send_s": 0.0, "chunk_s": [0.5, 0.6, 0.8, 1.0]},
            # sent later; 3 tokens in 3 chunks: TTFT 0.7, E2E 1.3, ITLs 0.4 0.2, TPOT (1.3-0.7)/2
            {"prompt_tokens": 10, "output_tokens": 3, "send_s": 0.2, "chunk_s": [0.9, 1.3, 1.5]},
        ],
    }


def test_streamed_request_timings():
    timed = measure.streamed_timings(_point()["requests"][1])
    assert timed["ttft_s"] == pytest.approx(0.7)
    assert timed["latency_s"] == pytest.approx(1.3)
    assert timed["itl_s"] == pytest.approx([0.4, 0.2])
    assert measure.tpot(timed) == pytest.approx(0.3)


def test_serve_point_metrics_by_hand():
    m = measure.point_metrics(_point())
    assert m["output_tok_s"] == pytest.approx(7 / 1.5)
    assert m["total_tok_s"] == pytest.approx(27 / 1.5)
    assert m["ttft_p50_s"] == pytest.approx(0.6) and m["ttft_mean_s"] == pytest.approx(0.6)
    assert m["latency_p50_s"] == pytest.approx(1.15)
    # TPOT per request 0.5/3 and 0.3 (vLLM: (latency - TTFT) / (output tokens - 1))
    assert m["tpot_p50_s"] == pytest.approx((0.5 / 3 + 0.3) / 2)
    assert m["tpot_mean_s"] == pytest.approx((0.5 / 3 + 0.3) / 2)
    # ITLs of both requests together: 0.1 0.2 0.2 0.4 0.2 -> sorted 0.1 0.2 0.2 0.2 0.4
    assert m["itl_mean_s"] == pytest.approx(1.1 / 5)
    assert m["itl_p50_s"] == pytest.approx(0.2)
    assert m["itl_p90_s"] == pytest.approx(0.2 + 0.6 * 0.2)  # rank 3.6 between 0.2 and 0.4
    assert m["itl_p99_s"] == pytest.approx(0.2 + 0.96 * 0.2)


def test_a_stream_without_output_has_no_timings():
    m = measure.point_metrics(
        {"wall_s": 1.0, "requests": [{"prompt_tokens": 10, "output_tokens": 0, "send_s": 0.0, "chunk_s": []}]}
    )
    assert m["ttft_p50_s"] is None and m["itl_p50_s"] is None and m["tpot_p50_s"] is None


def test_offline_requests_have_no_itl():
    m = measure.point_metrics(
        {"wall_s": 1.0, "requests": [{"prompt_tokens": 1, "output_tokens": 3, "ttft_s": 0.1, "latency_s": 0.5}]}
    )
    assert m["tpot_p50_s"] == pytest.approx(0.2) and m["itl_p50_s"] is None


def test_serve_columns_are_appended_to_the_schema():
    names = list(metrics.COLUMNS)
    serve = ["ttft_mean_s", "tpot_mean_s", "itl_mean_s", "itl_p50_s", "itl_p90_s", "itl_p99_s"]
    start = names.index("weight_bytes") + 1
    assert names[start : start + 6] == serve
    # Columns are only ever appended, after these: rounds and the host's fitness came next.
    assert names[start + 6] == "round" and all(metrics.COLUMNS[n][1] for n in names[start:])
