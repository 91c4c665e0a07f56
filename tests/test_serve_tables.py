"""Serve load levels from raw.json to the report: rows (cellbench.measure), points (a level is a
point of its own), capacity under SLO with its ratio to the baseline, the Markdown sections
(golden), the plots and the vLLM-format result files."""

import json
import os
from pathlib import Path

import matplotlib.image
import pytest
from cellbench import aggregate, config, measure, metrics, plots, report, serving

GOLDEN = Path(__file__).parent / "golden" / "tables" / "serve.md"
SLO = {"ttft_ms": 500, "tpot_ms": 50}
SEARCH = {"metric": "request_rate", "low": 1, "high": 8, "resolution": 0.5}
CONTEXT = {"study": "s", "machine_id": "m1", "run_id": "r1", "config_hash": "h", "round": 1}


def _cells(study):
    study["defaults"]["sweep"].update(batch_size=[1], input_len=[16], output_len=[4], repeats=1)
    study["defaults"]["quality"] = False
    serve = {"concurrency": [1, 4], "request_rate": [2], "requests_per_level": 2, "slo": SLO, "search": SEARCH}
    study["cells"] = [{"name": "base", "mode": "serve", "serve": serve},
                      {"name": "fast", "mode": "serve", "serve": serve}]  # fmt: skip
    study["baseline"] = "base"
    study["expectations"] = []
    return {c["name"]: c for c in config.resolve(study)["cells"].values()}


def _level(point, ttft, failed=0):
    """A level's raw record: 2 warm-up and 4 measured requests of 4 tokens, TTFT `ttft` s, chunks
    40 ms apart (TPOT 40 ms), sent 0.1 s apart; the last `failed` measured requests failed."""
    requests = []
    for index in range(6):
        send = index * 0.1
        if index >= 6 - failed:
            requests.append({"send_s": send, "chunk_s": [], "prompt_tokens": 16, "output_tokens": 0,
                             "error": "server answered 500", "end_s": send + 0.05})  # fmt: skip
            continue
        chunks = [send + ttft + 0.04 * k for k in range(4)]
        requests.append({"send_s": send, "chunk_s": chunks, "prompt_tokens": 16, "output_tokens": 4, "error": None,
                         "end_s": chunks[-1]})  # fmt: skip
    return {**point, "repeat": 0, "wall_s": 1.0, "warmup_requests": 2, "measured_requests": 4, "requests": requests,
            "host_foreign_cpu": 0.0, "host_steal_cpu": 0.0, "started_at_s": 1.0, "finished_at_s": 2.0}  # fmt: skip


def _raw(cell, per_rate: float, died_after: int | None = None):
    """What the container records: the swept levels, then the search against a made-up curve
    (TTFT = per_rate x the load's rate or concurrency/4, s); `died_after` levels, then the server died."""
    points = []
    for point in measure.planned_points(cell):
        load = point["request_rate"] or point["concurrency"] / 4
        points.append(_level(point, per_rate * load, failed=1 if point["concurrency"] == 4 else 0))
    probes = []
    while (value := serving.next_probe(probes, SEARCH)) is not None:
        point = {"batch_size": 0, "input_len": 16, "output_len": 4, **serving.level("request_rate", value, "search")}
        level = _level(point, per_rate * value)
        figures = serving.level_figures(level["requests"], 2, 4, SLO)
        probes.append((value, serving.passed(figures, 0.9)))
        points.append(level)
    raw = {"status": "ok", "load_s": 10.0, "points": points, "search": {"done": True},
           "effective": {"engine": "vllm", "mode": "serve", "dtype": "bfloat16"},
           "provenance": {"versions": {"vllm": "0.32.0"}}, "started_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    if died_after is not None:
        raw.update(status="failed", points=points[:died_after], search={"done": False})
    return raw


@pytest.fixture
def rows(study):
    cells = _cells(study)
    status, error = "failed", "ServerDied: vLLM server exited with code 1: boom"
    return cells, (
        measure.rows_for_cell(cells["base"], _raw(cells["base"], 0.15), CONTEXT, status="ok", error=None)
        + measure.rows_for_cell(cells["fast"], _raw(cells["fast"], 0.1), CONTEXT, status="ok", error=None)
        + measure.rows_for_cell(
            cells["base"], _raw(cells["base"], 0.15, died_after=1), {**CONTEXT, "machine_id": "m2"}, status=status,
            error=error,
        )
    )  # fmt: skip


def test_level_rows(rows):
    cells, found = rows
    base = [r for r in found if r["cell_name"] == "base" and r["machine_id"] == "m1"]
    c4 = next(r for r in base if r["concurrency"] == 4)
    # 4 measured (sent at 0.2 .. 0.5 s): 3 ok (TTFT 150 ms, TPOT 40 ms), the last failed at 0.55 s;
    # the window ends at the 3rd one's last chunk, 0.4 + 0.15 + 3 x 0.04 = 0.67 s: 0.47 s long
    assert (c4["batch_size"], c4["load_kind"], c4["load_phase"]) == (4, "concurrency", "sweep")
    assert (c4["requests_measured"], c4["requests_warmup"], c4["requests_failed"]) == (4, 2, 1)
    assert c4["duration_s"] == pytest.approx(0.47)
    assert c4["slo_share"] == pytest.approx(0.75) and c4["goodput_rps"] == pytest.approx(3 / 0.47)
    assert c4["ttft_p50_s"] == pytest.approx(0.15) and c4["tpot_p90_s"] == pytest.approx(0.04)
    rate = next(r for r in base if r["load_kind"] == "request_rate" and r["load_phase"] == "sweep")
    assert (rate["batch_size"], rate["request_rate"], rate["burstiness"]) == (0, 2.0, 1.0)
    probes = [r["request_rate"] for r in base if r["load_phase"] == "search"]
    assert probes == [1, 2, 4, 3, 3.5]  # base holds TTFT <= 500 ms up to 3.33 req/s
    metrics.to_table(found)  # every row fits the schema


def test_a_server_that_died_keeps_its_finished_levels(rows):
    _, found = rows
    m2 = [r for r in found if r["machine_id"] == "m2"]
    assert [(r["load_kind"], r["concurrency"], r["status"]) for r in m2 if r["status"] == "ok"] == [
        ("concurrency", 1, "ok")
    ]
    failed = [r for r in m2 if r["status"] == "failed"]
    assert {(r["load_phase"], r["load_kind"], r["concurrency"], r["request_rate"]) for r in failed} == {
        ("sweep", "concurrency", 4, None), ("sweep", "request_rate", None, 2.0), ("search", "request_rate", None, None)
    }  # fmt: skip
    assert all(r["error"].startswith("ServerDied: vLLM server exited") for r in failed)


def _points(rows):
    cells, found = rows
    return aggregate.cell_points(metrics.to_table(found), cells["base"]["id"])


def test_each_level_is_a_point_and_capacity_is_stated(rows):
    points = _points(rows)
    m1 = points[(points["machine_id"] == "m1") & (points["cell_name"] == "base")]
    assert sorted(m1["load_point"]) == sorted(
        ["sweep:concurrency=1", "sweep:concurrency=4", "sweep:request_rate=2.0", "search:request_rate=1.0",
         "search:request_rate=2.0", "search:request_rate=4.0", "search:request_rate=3.0", "search:request_rate=3.5"]
    )  # fmt: skip
    capacity = aggregate.capacities(points, "base").set_index(["machine_id", "cell_name"])
    assert capacity.loc[("m1", "base"), "capacity"] == 3.0
    # 0.1 s per req/s: TTFT 500 ms at 5 req/s meets the budget; probes 1 2 4 8 6 5 5.5
    assert capacity.loc[("m1", "fast"), "capacity"] == 5.0
    assert capacity.loc[("m1", "fast"), "vs_baseline"] == pytest.approx(5 / 3)
    assert capacity.loc[("m2", "base"), "reason"].startswith("search did not finish: ServerDied")
    # probes are not compared as points: no "fastest" at a search load
    fastest = aggregate.fastest_per_point(points)
    assert not fastest["load_point"].str.startswith("search").any()


def test_serve_sections_golden(rows):
    text = "\n".join(report.serving_load_markdown(_points(rows), "base")) + "\n"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert "- m1: `fast`: 5 req/s at SLO share ≥ 0.9 (TTFT ≤ 500 ms, TPOT ≤ 50 ms); 1.67× the baseline's." in text


def test_no_capacity_when_the_lower_bound_fails(study):
    cells = _cells(study)
    raw = _raw(cells["base"], 1.0)  # TTFT 1 s at 1 req/s already misses 500 ms
    points = aggregate.cell_points(
        metrics.to_table(measure.rows_for_cell(cells["base"], raw, CONTEXT, status="ok", error=None)),
        cells["base"]["id"],
    )
    capacity = aggregate.capacities(points, "base").iloc[0]
    assert capacity["capacity"] is None or capacity["capacity"] != capacity["capacity"]
    assert capacity["reason"] == "the lower bound 1 req/s already misses the SLO"
    assert "no capacity at SLO share ≥ 0.9" in "\n".join(report.serving_load_markdown(points, "base"))


def test_serve_plots_draw(rows, tmp_path):
    points = _points(rows)
    for draw in (plots.serve_latency, plots.serve_goodput):
        path = tmp_path / "p.png"
        draw(points, path)
        assert matplotlib.image.imread(path).std() > 0
        draw(points.iloc[0:0], path)  # nothing served: a note


def test_bench_serve_result_files(rows, study):
    cells = _cells(study)
    results = measure.bench_serve_results(cells["base"], _raw(cells["base"], 0.15), CONTEXT)
    names = [name for name, _ in results]
    assert names[:3] == ["sweep-concurrency-1-16x4-repeat0", "sweep-concurrency-4-16x4-repeat0",
                         "sweep-request_rate-2-16x4-repeat0"]  # fmt: skip
    c4 = dict(results)["sweep-concurrency-4-16x4-repeat0"]
    # vLLM's --save-result keys and meanings: a closed loop is rate inf with max_concurrency
    assert (c4["request_rate"], c4["max_concurrency"], c4["num_prompts"]) == ("inf", 4, 4)
    assert (c4["completed"], c4["failed"], c4["total_output_tokens"]) == (3, 1, 12)
    assert c4["median_ttft_ms"] == pytest.approx(150) and c4["p99_tpot_ms"] == pytest.approx(40)
    assert c4["request_goodput"] == pytest.approx(3 / 0.47)
    assert c4["errors"] == ["", "", "", "server answered 500"] and c4["output_lens"] == [4, 4, 4, 0]
    json.dumps(c4)


def test_html_report_has_the_serving_sections_and_plots(rows, tmp_path):
    from cellbench import diagnostics, report_html

    points = _points(rows)
    drawn = plots.write_plots(points, tmp_path / "plots")
    page = report_html.page("s", "base", points, [], [], diagnostics.cells(points), drawn, tmp_path / "r" / "i.html")
    assert "Serving: capacity under SLO" in page and "Serving: load levels" in page
    assert "../plots/serve-latency.png" in page and "../plots/serve-goodput.png" in page
    assert "1.67×" in page and "rate 3.5 req/s (search) · 16→4" in page
