"""Progress lines while a round runs and after it: formatting and estimates, computed by hand."""

import io
import json

import pytest
from cellbench import paths, progress

CELL = {
    "name": "vllm-bf16",
    "sweep": {"batch_size": [1, 8], "input_len": [128], "output_len": [64], "repeats": 2, "rounds": 3},
}


def _point(batch, repeat, wall, finished):
    return {"batch_size": batch, "input_len": 128, "output_len": 64, "repeat": repeat, "wall_s": wall,
            "requests": [{"output_tokens": 64}] * batch, "finished_at_s": finished}  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (-1, "?"), (0, "0s"), (42.4, "42s"), (59.6, "1m00s"), (185, "3m05s"), (3725, "1h02m")],
)
def test_duration(seconds, text):
    assert progress.duration(seconds) == text


def test_time_left_at_the_pace_of_what_is_done():
    assert progress.time_left(30.0, 3, 8) == 50.0  # 10 s a repeat, 5 to go
    assert progress.time_left(30.0, 0, 8) is None
    assert progress.time_left(30.0, 9, 8) == 0.0


def test_repeats_total_is_points_times_repeats():
    assert progress.repeats_total(CELL) == 4  # 2 batch sizes x 1 x 1, 2 repeats


def test_point_line_numbers():
    # Measuring began at 1000; the first repeat ended at 1005: 5 s a repeat, 3 left -> 15 s.
    raw = {"measuring_at_s": 1000.0, "load_s": 70.0, "points": [_point(1, 0, 4.0, 1005.0)]}
    line = progress.point_line(CELL, 2, raw, 0, now=1006.0, container_start=900.0)
    assert line == (
        "cellbench: vllm-bf16 round 2/3: point 1/4 (batch 1, 128→64, repeat 1/2) 16.0 tok/s, elapsed 1m46s, left ~15s"
    )


def test_measuring_start_falls_back_to_the_load_time():
    assert progress.measuring_since({"load_s": 70.0}, 900.0) == 970.0
    assert progress.measuring_since({"measuring_at_s": 965.5, "load_s": 70.0}, 900.0) == 965.5


def test_new_lines_print_each_point_once():
    raw = {"measuring_at_s": 1000.0, "load_s": 70.0,
           "points": [_point(1, 0, 4.0, 1005.0), _point(1, 1, 4.0, 1010.0)]}  # fmt: skip
    lines, printed, loaded = progress.new_lines(CELL, 1, raw, 0, False, 1011.0, 900.0)
    assert (len(lines), printed, loaded) == (3, 2, True)
    assert lines[0] == "cellbench: vllm-bf16 round 1/3: engine loaded in 1m10s, measuring 4 repeats"
    assert lines[2].endswith("point 2/4 (batch 1, 128→64, repeat 2/2) 16.0 tok/s, elapsed 1m51s, left ~10s")
    assert progress.new_lines(CELL, 1, raw, 2, True, 1012.0, 900.0) == ([], 2, True)
    assert progress.new_lines(CELL, 1, None, 0, False, 1012.0, 900.0) == ([], 0, False)


def test_study_estimate_uses_each_cells_own_rounds_then_the_mean():
    rounds = [("a", "ok", 100.0), ("a", None, None), ("b", "failed", 40.0), ("b", "ok", 60.0), ("c", None, None)]
    estimate = progress.study_estimate(rounds)
    # a's next round costs a's 100 s; c has none done: the mean of all three, 200/3 s.
    assert estimate == {"rounds_done": 3, "rounds": 5, "cells_done": 1, "cells": 3, "failed": 1,
                        "left_s": pytest.approx(100 + 200 / 3)}  # fmt: skip
    assert progress.study_line("cpu-demo", estimate) == (
        "cellbench: study cpu-demo: 3/5 rounds, 1/3 cells done, 1 failed; left ~2m47s at one round at a time"
    )


def test_study_estimate_before_any_round_and_after_the_last():
    assert progress.study_estimate([("a", None, None)])["left_s"] is None
    done = progress.study_estimate([("a", "ok", 10.0)])
    assert progress.study_line("s", done) == "cellbench: study s: 1/1 rounds, 1/1 cells done, 0 failed; nothing left"


def test_read_rounds_from_the_study_record_and_provenance(tmp_path):
    cell_id = "vllm-0123456789"
    (tmp_path / "study.json").write_text(json.dumps({"study": "s", "cells": {cell_id: 2}}))
    paths.round_dir(cell_id, 1, tmp_path).mkdir(parents=True)
    paths.cell_provenance(cell_id, 1, tmp_path).write_text(json.dumps({"status": "ok", "container_wall_s": 12.5}))
    study, rounds = progress.read_rounds(tmp_path / "study.json", tmp_path)
    assert (study, rounds) == ("s", [(cell_id, "ok", 12.5), (cell_id, None, None)])


def test_read_rounds_reads_only_provenance_whose_stat_changed(tmp_path):
    cell_id = "vllm-0123456789"
    (tmp_path / "study.json").write_text(json.dumps({"study": "s", "cells": {cell_id: 2}}))
    paths.round_dir(cell_id, 1, tmp_path).mkdir(parents=True)
    prov = paths.cell_provenance(cell_id, 1, tmp_path)
    prov.write_text(json.dumps({"status": "ok", "container_wall_s": 12.5}))
    cache = paths.progress_cache(tmp_path)
    assert progress.read_rounds(tmp_path / "study.json", tmp_path, cache)[1][0] == (cell_id, "ok", 12.5)
    st = prov.stat()
    key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    assert json.loads(cache.read_text()) == {"version": 1, "rounds": {str(prov): [*key, "ok", 12.5]}}
    # A cached entry whose stat matches is taken as it is: the file is not read.
    cache.write_text(json.dumps({"version": 1, "rounds": {str(prov): [*key, "failed", 3.0]}}))
    assert progress.read_rounds(tmp_path / "study.json", tmp_path, cache)[1][0] == (cell_id, "failed", 3.0)
    # A rerun (a new file in its place) changes the stat: read again.
    prov.write_text(json.dumps({"status": "timeout", "container_wall_s": 99.0}))
    assert progress.read_rounds(tmp_path / "study.json", tmp_path, cache)[1][0] == (cell_id, "timeout", 99.0)
    for junk in ("not json", "[]", '{"version": 1, "rounds": {"x": [1, 2]}}', '{"version": 2, "rounds": {}}'):
        cache.write_text(junk)  # a cache not in its shape is ignored
        assert progress.read_rounds(tmp_path / "study.json", tmp_path, cache)[1] == [
            (cell_id, "timeout", 99.0),
            (cell_id, None, None),
        ]


def test_no_study_record_no_study_line(tmp_path):
    assert progress.study_progress(tmp_path / "absent.json") is None


def test_emit_writes_both_streams_once_each_and_once_when_they_are_one_file(tmp_path):
    err, out = io.StringIO(), io.StringIO()
    progress.emit("a line", err, out)
    assert (err.getvalue(), out.getvalue()) == ("a line\n", "a line\n")
    with open(tmp_path / "log", "w") as log:
        progress.emit("once", log, log)
    assert (tmp_path / "log").read_text() == "once\n"


def test_follower_prints_points_as_raw_json_grows(tmp_path):
    raw_path = tmp_path / "raw.json"
    lines = []
    with progress.Follower(raw_path, CELL, 1, lines.append, poll_s=0.01) as follower:
        raw_path.write_text(json.dumps({"load_s": 1.0, "measuring_at_s": follower.start, "points": []}))
        point = _point(8, 0, 2.0, follower.start + 2.0)
        raw_path.write_text(json.dumps({"load_s": 1.0, "measuring_at_s": follower.start, "points": [point]}))
    assert lines[0] == "cellbench: vllm-bf16 round 1/3: container started"
    assert lines[1] == "cellbench: vllm-bf16 round 1/3: engine loaded in 1s, measuring 4 repeats"
    assert lines[2].startswith("cellbench: vllm-bf16 round 1/3: point 1/4 (batch 8, 128→64, repeat 1/2) 256.0 tok/s")
    assert len(lines) == 3


def test_load_levels_and_search_probes_are_named():
    from cellbench import serving

    cell = {"name": "srv", "mode": "serve", "sweep": {"batch_size": [1], "input_len": [128], "output_len": [64],
            "repeats": 1, "rounds": 1}, "serve": {"concurrency": [4], "search": {"metric": "request_rate",
            "low": 1, "high": 2, "resolution": 1}, "slo": {"ttft_ms": 1}}}  # fmt: skip
    level = {**_point(4, 0, 4.0, 1005.0), **serving.level("concurrency", 4, "sweep")}
    probe = {**_point(0, 0, 4.0, 1010.0), **serving.level("request_rate", 1.5, "search")}
    raw = {"measuring_at_s": 1000.0, "load_s": 70.0, "points": [level, probe]}
    first = progress.point_line(cell, 1, raw, 0, now=1006.0, container_start=900.0)
    assert "point 1/1 (concurrency 4, 128→64, repeat 1/1)" in first
    second = progress.point_line(cell, 1, raw, 1, now=1011.0, container_start=900.0)
    assert "search probe 1 (rate 1.5 req/s (search), 128→64, repeat 1/1)" in second
