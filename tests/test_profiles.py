"""Profiles without an engine: per-op figures and shares by hand (the container's profile_ops),
diffs by hand, the cell id, the profile step's failures, and `cellbench profile-diff`."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from cellbench import cli, config, paths, profiles

ROOT = Path(__file__).resolve().parents[1]


def event(key, count, self_us, total_us):
    return SimpleNamespace(key=key, count=count, self_cpu_time_total=self_us, cpu_time_total=total_us)


def test_profile_ops_are_per_step_and_shares_are_of_the_summed_self_time(bench):
    # Two steps: mm 600 µs self, add 200, linear 0 self (all in its child mm): dropped.
    events = [event("aten::add", 4, 200.0, 200.0), event("aten::mm", 2, 600.0, 600.0), event("aten::linear", 2, 0, 600)]
    ops = bench.profile_ops(events, steps=2, device=False)
    assert [op["op"] for op in ops] == ["aten::mm", "aten::add"]
    assert ops[0] == {"op": "aten::mm", "calls": 1.0, "self_us": 300.0, "total_us": 300.0, "phase": None,
                      "share": 0.75}  # fmt: skip
    assert ops[1]["share"] == 0.25 and ops[1]["calls"] == 2.0


def frame(rows):
    return pd.DataFrame([{"op": op, "calls": 1.0, "self_us": us, "total_us": us, "share": share, "phase": None}
                         for op, us, share in rows])  # fmt: skip


A = frame([("aten::mm", 600.0, 0.6), ("aten::add", 300.0, 0.3), ("aten::silu", 100.0, 0.1)])
B = frame([("aten::mm", 1600.0, 0.8), ("aten::add", 300.0, 0.15), ("aten::copy_", 100.0, 0.05)])


def test_diff_by_hand():
    changed = profiles.diff(A, B).set_index("op")
    # mm: 60 % -> 80 % of the step, +20 points, +1000 µs; add: same µs, a smaller share (-15 points).
    assert changed.loc["aten::mm", "share_points"] == pytest.approx(20.0)
    assert changed.loc["aten::mm", "self_us_delta"] == pytest.approx(1000.0)
    assert changed.loc["aten::add", "share_points"] == pytest.approx(-15.0)
    assert changed.loc["aten::add", "self_us_delta"] == 0
    # An op only one cell ran counts as 0 in the other.
    assert changed.loc["aten::silu", "share_points"] == pytest.approx(-10.0)
    assert changed.loc["aten::copy_", "self_us_delta"] == pytest.approx(100.0)
    # Largest share change first.
    assert list(profiles.diff(A, B)["op"]) == ["aten::mm", "aten::add", "aten::silu", "aten::copy_"]


def test_top_table_and_markdown_section():
    table = profiles.top_table(A, 2)
    assert [row[0] for row in table.rows] == ["aten::mm", "aten::add"]
    assert table.rows[0][4] == "60.0 %"
    lines = profiles.markdown_section([("a at 1 × 8→4", table)])
    assert lines[0] == "## Where the time goes" and "| aten::mm | 1 | 600 | 600 | 60.0 % |" in "\n".join(lines)


def test_rows_round_trip_through_parquet(tmp_path):
    rows = profiles.rows_of({"ops": A.to_dict("records")})
    profiles.write_parquet(tmp_path / "p.parquet", rows)
    assert profiles.read(tmp_path / "p.parquet").to_dict("records") == A.to_dict("records")
    profiles.write_parquet(tmp_path / "none.parquet", profiles.rows_of(None))
    assert profiles.read(tmp_path / "none.parquet").empty


def test_profile_is_part_of_the_cell_id_only_when_set(study):
    ids = {c["name"]: c["id"] for c in config.expand_cells(study)}
    profiled = copy.deepcopy(study)
    sweep = profiled["defaults"]["sweep"]
    point = {"batch_size": sweep["batch_size"][0], "input_len": sweep["input_len"][0],
             "output_len": sweep["output_len"][0]}  # fmt: skip
    profiled["cells"][0]["profile"] = {"point": point}
    cells = config.expand_cells(profiled)
    config.validate(profiled)
    group = profiled["cells"][0]["name"]
    for cell in cells:
        if cell["group"] == group:
            assert cell["profile"] == {"point": point, "steps": 1} and cell["id"] != ids[cell["name"]]
        else:
            assert cell["profile"] is None and cell["id"] == ids[cell["name"]]


class Broken:
    vocab_size, special_ids = 10, set()

    def profile_check(self):
        raise RuntimeError("no profiler\nhere")


class Unprofiled:
    vocab_size, special_ids = 10, set()


CELL = {"profile": {"point": {"batch_size": 1, "input_len": 2, "output_len": 2}, "steps": 1}, "sweep": {"seed": 0}}


def test_a_failing_or_missing_profiler_is_a_status(bench, tmp_path):
    failed = bench.measure_profile(Broken(), CELL, tmp_path)
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: no profiler here"
    unsupported = bench.measure_profile(Unprofiled(), CELL, tmp_path)
    assert unsupported["status"] == "unsupported" and "has no profiler" in unsupported["error"]
    assert not (tmp_path / "profile.json").exists()


def test_vllm_with_its_engine_core_in_another_process_is_unsupported(bench, monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with pytest.raises(bench.ProfileUnsupported, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        bench.VllmEngine.profile_check(None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    bench.VllmEngine.profile_check(None)


def _study_file(tmp_path: Path) -> tuple[Path, dict]:
    study = {
        "study": "p",
        "images": {"cpu": {"context": "containers/cpu", "device": "cpu"}},
        "models": {"m": {"source": "pypi-gguf", "package": "x==1", "file": "m.gguf", "prepare_image": "cpu"}},
        "defaults": {
            "image": "cpu",
            "model": "m",
            "engine": "transformers",
            "sweep": {"batch_size": [1], "input_len": [8], "output_len": [4]},
        },  # fmt: skip
        "cells": [
            {"name": "a", "profile": {"point": {"batch_size": 1, "input_len": 8, "output_len": 4}}},
            {"name": "b", "profile": {"point": {"batch_size": 1, "input_len": 8, "output_len": 4}}, "dtype": "float32"},
            {"name": "c"},
        ],  # fmt: skip
        "baseline": "a",
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path, {c["name"]: c for c in config.read(path)[1]["cells"].values()}


def test_profile_diff_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, cells = _study_file(tmp_path)
    for name, rows in (("a", A), ("b", B)):
        target = paths.cell_profile(cells[name]["id"], 1)
        target.parent.mkdir(parents=True)
        profiles.write_parquet(target, rows.to_dict("records"))
    assert cli.main(["profile-diff", "a", "b", "--top", "2", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "A = a, B = b; 2 ops" in out
    assert "| aten::mm | 60.0 % | 80.0 % | +20.0 | 600 | 1,600 | +1,000 |" in out
    assert "silu" not in out  # --top 2
    assert cli.main(["profile-diff", "a", "c", "--configfile", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "cellbench: profile-diff: cell c has no profile (set `profile:` for it in the study)"
    )
    assert cli.main(["profile-diff", "a", "zz", "--configfile", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "cellbench: profile-diff: no cell 'zz' in the study (cells: a, b, c)"


def test_where_the_time_goes_in_summary_md_and_the_page(tmp_path):
    from cellbench import report, report_html

    results = tmp_path / "results"
    record = {"cells": {"a-1": 1, "c-3": 1, "new-4": 1}}
    (tmp_path / "study.json").write_text(json.dumps(record))
    point = {"batch_size": 8, "input_len": 16, "output_len": 4}
    for cell_id, name, profile in (("a-1", "a", {"point": point, "steps": 1}), ("c-3", "c", None)):
        target = paths.cell_profile(cell_id, 1, results)
        target.parent.mkdir(parents=True)
        profiles.write_parquet(target, A.to_dict("records") if profile else [])
        prov = paths.cell_provenance(cell_id, 1, results)
        prov.write_text(json.dumps({"cell": {"name": name, "profile": profile}}))
    sections = profiles.report_sections(tmp_path / "study.json", results)  # new-4: not run yet
    assert [title for title, _ in sections] == ["a at 8 × 16→4"]
    empty = pd.DataFrame(columns=["status", "output_tok_s", "machine_id", "quality_status"])
    md = report.write_tables(empty, "s", "a", tmp_path, extra=profiles.markdown_section(sections))[0].read_text()
    assert "## Where the time goes" in md and "### a at 8 × 16→4" in md and "| aten::mm |" in md
    page = report_html.page("s", "a", empty, [], [], [], [], tmp_path / "i.html", None, sections)
    assert "Where the time goes" in page and "<td>aten::mm</td>" in page
    assert "Where the time goes" not in report_html.page("s", "a", empty, [], [], [], [], tmp_path / "i.html")
