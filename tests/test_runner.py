"""How the host judges a finished container (status and one-line error), and a round run end to
end with docker replaced by a function: what it publishes, and that a runtime failure writes nothing."""

import json

import pandas as pd
import pytest
from cellbench import config, containers, lifecycle, measure, paths, profiles, quality_texts, runner, runtimes

CRASH_LOG = (
    "INFO loading\n"
    "torch._inductor.exc.InductorError: CppCompileError: C++ compile error\n"
    "RuntimeError: Engine core initialization failed. See root cause above.\n"
)


def test_ok_needs_both_the_script_and_the_container_to_agree():
    assert runner._outcome({"status": "ok"}, 0, False, 60, "") == ("ok", None)
    status, error = runner._outcome({"status": "ok"}, 137, False, 60, "")
    assert status == "failed" and "137" in error


def test_engine_error_from_the_script_is_kept():
    raw = {"status": "failed", "error": "RuntimeError: Engine core initialization failed. See root cause above."}
    assert runner._outcome(raw, 1, False, 60, CRASH_LOG) == ("failed", raw["error"])


def test_known_unsupported_signature_in_the_log_wins_over_a_vague_error():
    raw = {"status": "failed", "error": "RuntimeError: Engine core initialization failed."}
    log = "AttributeError: '_C' has no attribute 'cpu_gemm_wna16'\n" + CRASH_LOG
    status, error = runner._outcome(raw, 1, False, 60, log)
    assert status == "failed" and "cpu_gemm_wna16" in error


def test_timeout_names_the_engine_error_logged_before_the_kill():
    status, error = runner._outcome({"status": "loading"}, None, True, 60, CRASH_LOG)
    assert status == "timeout"
    assert error.startswith("cell exceeded its timeout of 60 s; container killed after the engine logged: ")
    assert "RuntimeError: Engine core initialization failed" in error


def test_container_that_never_reported():
    assert runner._outcome(None, 125, False, 60, "docker: Error response from daemon: x\n")[0] == "failed"
    assert runner._outcome(None, 137, False, 60, "")[1].startswith("container killed (exit 137")


def _fake_round(tmp_path, monkeypatch, study, raw, code, log_text, round=2):
    """run_cell of the default study's llama.cpp cell with docker replaced by a function that
    leaves `raw` and `log_text` in the run directory and exits with `code`."""
    monkeypatch.chdir(tmp_path)
    cell = next(c for c in config.resolve(study)["cells"].values() if c["name"] == "llamacpp")
    model_dir = paths.model_dir(cell["model"])
    model_dir.mkdir(parents=True)
    manifest = {"name": cell["model"], "gguf": "m.gguf", "files": {"m.gguf": {"sha256": "0", "bytes": 1000}}}
    (model_dir / paths.MODEL_MANIFEST).write_text(json.dumps(manifest))
    seen = {}

    def fake_run(argv, name, log_path, timeout_s):
        seen.update(argv=argv, work=log_path.parent, cell_json=json.loads((log_path.parent / "cell.json").read_text()),
                    owner=(log_path.parent / lifecycle.RUN_OWNER).read_text())  # fmt: skip
        log_path.write_text(log_text)
        if raw is not None:
            (log_path.parent / "raw.json").write_text(json.dumps(raw))
        return code, False

    monkeypatch.setattr(lifecycle, "ensure_runtime", lambda runtime: None)
    monkeypatch.setattr(runtimes, "ensure_image", lambda runtime, image_id, archive: "local")
    monkeypatch.setattr(runner, "run_container", fake_run)
    monkeypatch.setattr(runner, "new_run_id", lambda: "RUN")
    run = lambda: runner.run_cell(  # noqa: E731
        cell, study="s", config_hash="h", machine="m", image_manifest={"name": "llamacpp", "image_id": "sha256:0"},
        model_dir=model_dir, round=round,
    )  # fmt: skip
    return cell, run, seen


def test_a_round_publishes_its_three_files_and_removes_its_run_directory(tmp_path, monkeypatch, study):
    req = {"prompt_tokens": 128, "output_tokens": 64, "latency_s": 1.0, "ttft_s": 0.1}
    raw = {"status": "ok", "effective": {"dtype": "float32", "env": {}}, "provenance": {"versions": {}}, "points": []}
    cell, run, seen = _fake_round(tmp_path, monkeypatch, study, raw, 0, "engine ok\n")
    raw["points"] = [
        {**point, "repeat": r, "wall_s": 2.0, "requests": [req] * point["batch_size"]}
        for point in measure.points(cell["sweep"])
        for r in range(cell["sweep"]["repeats"])
    ]
    assert run() == "ok"
    assert seen["work"] == paths.run_dir(cell["id"], "RUN") and not seen["work"].exists()
    assert seen["owner"] == lifecycle.runner_label()  # so that a later run may remove it if this one is killed
    assert seen["cell_json"]["model_gguf"] == "m.gguf" and seen["cell_json"]["points"] == measure.points(cell["sweep"])
    assert seen["cell_json"]["quality_texts"] is None  # quality is measured on round 1 only
    files = sorted(p.relative_to(paths.cell_dir(cell["id"])) for p in paths.cell_dir(cell["id"]).rglob("*"))
    assert [str(p) for p in files] == ["round-2", *(f"round-2/{name}" for name in sorted(paths.ROUND_OUTPUTS))]
    rows = pd.read_parquet(paths.cell_metrics(cell["id"], 2))
    assert len(rows) == len(raw["points"]) and set(rows["status"]) == {"ok"} and set(rows["round"]) == {2}
    assert rows["output_tok_s"].iloc[0] == 64 * rows["batch_size"].iloc[0] / 2.0
    record = json.loads(paths.cell_provenance(cell["id"], 2).read_text())
    assert (record["status"], record["exit_code"], record["image_source"]) == ("ok", 0, "local")
    assert paths.cell_log(cell["id"], 2).read_text() == "engine ok\n"


def test_round_1_carries_the_quality_texts_and_its_rows_the_quality_figures(tmp_path, monkeypatch, study):
    raw = {"status": "ok", "effective": {"env": {}}, "provenance": {"versions": {}}, "points": [],
           "quality": {"status": "failed", "error": "ValueError: chunk over n_ctx", "seconds": 1.5}}  # fmt: skip
    cell, run, seen = _fake_round(tmp_path, monkeypatch, study, raw, 0, "", round=1)
    run()
    assert seen["cell_json"]["quality_texts"] == quality_texts.cell_entry(cell["quality"], 1)
    assert len(seen["cell_json"]["quality_texts"]["prompts"]) == 32
    rows = pd.read_parquet(paths.cell_metrics(cell["id"], 1))
    assert set(rows["quality_status"]) == {"failed"} and set(rows["quality_s"]) == {1.5}
    assert set(rows["quality_error"]) == {"ValueError: chunk over n_ctx"}


def test_a_round_the_runtime_could_not_run_writes_nothing(tmp_path, monkeypatch, study):
    cell, run, _ = _fake_round(tmp_path, monkeypatch, study, None, containers.RUNTIME_FAILED, "docker: no daemon\n")
    with pytest.raises(runner.RunnerError, match="docker could not run the container: docker: no daemon"):
        run()
    assert list(paths.cell_dir(cell["id"]).rglob("*")) == []


def test_round_one_publishes_the_containers_profile_and_its_trace(tmp_path, monkeypatch, study):
    raw = {"status": "ok", "effective": {"dtype": "float32", "env": {}}, "provenance": {"versions": {}}, "points": []}
    cell, run, seen = _fake_round(tmp_path, monkeypatch, study, raw, 0, "engine ok\n", round=1)
    cell["profile"] = {"point": {"batch_size": 1, "input_len": 128, "output_len": 64}, "steps": 1}
    plain = runner.run_container
    op = {"op": "aten::mm", "calls": 2.0, "self_us": 30.0, "total_us": 31.0, "share": 1.0, "phase": None}

    def with_profile(argv, name, log_path, timeout_s):
        (log_path.parent / "profile.json").write_text(json.dumps({"status": "ok", "ops": [op]}))
        (log_path.parent / paths.ROUND_PROFILE_TRACE).write_bytes(b"gz")
        return plain(argv, name, log_path, timeout_s)

    monkeypatch.setattr(runner, "run_container", with_profile)
    assert run() == "ok"
    assert seen["cell_json"]["profile"] == cell["profile"]  # round 1 profiles
    assert profiles.read(paths.cell_profile(cell["id"], 1)).to_dict("records") == [op]
    assert paths.cell_profile_trace(cell["id"], 1).read_bytes() == b"gz"
    monkeypatch.setattr(runner, "run_container", plain)  # a rerun without a profile: no stale trace
    assert run() == "ok"
    assert pd.read_parquet(paths.cell_profile(cell["id"], 1)).empty
    assert not paths.cell_profile_trace(cell["id"], 1).exists()
