"""llama.cpp's llama-server as a serve-mode engine: its command line from a cell (golden), the
engine_args rule shared by the study check and the container, and what effective() reads from
the server's start log and GET /props (recorded from the real server in the llamacpp image:
tests/fixtures/llama-server/)."""

import json
import os
import sys
from pathlib import Path

import pytest
from cellbench import config, contract, measure

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server"
GOLDEN = Path(__file__).parent / "golden" / "llama-server-argv.txt"


def _cell(study, **group) -> dict:
    study["cells"].append({"name": "served", "image": "llamacpp", "engine": "llamacpp", "mode": "serve", **group})
    (cell,) = [c for c in config.resolve(study)["cells"].values() if c["name"] == "served"]
    # As the runner writes cell.json for the container.
    return {**cell, "points": measure.points(cell["sweep"]), "model_gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_llama_server_command_line_golden(study, bench):
    cell = _cell(study, quantization="Q4_1", engine_args={"n_batch": 256, "flash_attn": "off"})
    text = " ".join(bench.llama_server_argv(cell, threads=2)) + "\n"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    # The default study's sweep has batch 1 and 8: 8 slots of max_model_len 512 each.
    assert "--parallel 8 --ctx-size 4096 " in text and "--seed 0 " in text


def test_flags_by_hand():
    flags = contract.llama_server_flags
    # Slots default to the largest batch; the context is per request, times the slots.
    assert flags({"max_model_len": 512}, 4) == ["--parallel", "4", "--ctx-size", "2048"]
    assert flags({"max_model_len": 300, "parallel": 2}, 8) == ["--parallel", "2", "--ctx-size", "600"]
    assert flags({}, 1) == ["--parallel", "1"]  # no max_model_len: llama-server's own default
    # Llama names are taken for the same settings; the rest sorted by name, cli_flags style.
    assert flags(
        {"n_ctx": 256, "n_batch": 64, "cache_prompt": False, "kv_unified": True, "flash_attn": True}, 2
    ) == ["--parallel", "2", "--ctx-size", "512", "--batch-size", "64", "--no-cache-prompt", "--flash-attn", "on",
          "--kv-unified"]  # fmt: skip
    # The container's defaults yield to the study's.
    defaults = {"threads": 2, "threads_batch": 2, "cont_batching": True}
    assert flags({"n_threads": 1, "cont_batching": False}, 1, defaults) == [
        "--parallel", "1", "--no-cont-batching", "--threads", "1", "--threads-batch", "2",
    ]  # fmt: skip
    # The same value under both names is one setting, not a conflict.
    assert flags({"max_model_len": 256, "n_ctx": 256}, 1) == ["--parallel", "1", "--ctx-size", "256"]


@pytest.mark.parametrize(
    "args, message",
    [
        ({"n_gpu_layers": 99}, "engine_args.n_gpu_layers: not a llama-server setting cellbench passes"),
        ({"ctx_size": 4096}, "engine_args.ctx_size: set by cellbench for llama-server (the total context is"),
        ({"seed": 1}, "engine_args.seed: set by cellbench for llama-server (the seed is the cell's sweep.seed)"),
        ({"parallel": 0}, "engine_args.parallel: 0 is not an integer of at least 1"),
        ({"batch_size": True}, "engine_args.batch_size: True is not an integer of at least 1"),
        ({"max_model_len": "512"}, "engine_args.max_model_len: '512' is not an integer of at least 1"),
        ({"cache_prompt": "no"}, "engine_args.cache_prompt: 'no' is not true or false"),
        ({"cache_type_k": "q3_k"}, "engine_args.cache_type_k: 'q3_k' is not one of f32, f16, bf16"),
        ({"flash_attn": "yes"}, "engine_args.flash_attn: 'yes' is not one of on, off, auto"),
        ({"max_model_len": 512, "n_ctx": 256}, "engine_args.n_ctx (256) and engine_args.max_model_len (512) name"),
    ],
)
def test_bad_server_args_are_one_line(args, message):
    with pytest.raises(ValueError) as error:
        contract.llama_server_flags(args, 1)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_container_refuses_what_the_study_check_refuses(study, bench):
    cell = _cell(study)
    cell["engine_args"] = {"port": 9000}  # past the study check: the container says the same
    with pytest.raises(ValueError, match="engine_args.port: set by cellbench for llama-server"):
        bench.llama_server_argv(cell, threads=2)


def test_slots_follow_the_largest_batch_or_concurrency_level(bench):
    assert bench.server_slots({"points": [{"batch_size": 1}, {"batch_size": 4}, {"batch_size": 2}]}) == 4
    levels = {"concurrency": [1, 4, 16], "request_rate": [0.5]}
    assert bench.server_slots({"points": [{"batch_size": 1}], "serve": levels}) == 16


def test_sampling_matches_the_offline_llamacpp_engine(bench):
    server = bench.LlamaServer.__new__(bench.LlamaServer)
    server.model_path = "/model/m.gguf"
    assert server.completion_body([5, 6], 16) == {
        "model": "/model/m.gguf", "prompt": [5, 6], "max_tokens": 16, "ignore_eos": True, "temperature": 1.0,
        "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


def test_effective_from_the_recorded_log_and_props(bench):
    log = (FIXTURES / "start.log").read_text()
    props = json.loads((FIXTURES / "props.json").read_text())
    found = bench.llama_server_resolved(log, props)
    system_info = found.pop("system_info")
    assert system_info.startswith("CPU : SSE3 = 1") and "OPENMP = 1" in system_info
    assert found == {
        "quantization": "Q4_1",  # /props model_ftype; the log's "file type = Q4_1" agrees
        "n_ctx": 1024,  # 4 slots x 256
        "n_ctx_slot": 256,
        "n_batch": 1024,  # llama.cpp caps its default 2048 at n_ctx
        "n_ubatch": 512,
        "kv_unified": False,
        "n_threads": 2,
        "n_threads_batch": 2,
        "type_k": 1,  # f16
        "type_v": 1,
        "flash_attn_type": 1,  # asked auto (-1), resolved to enabled
        "n_slots": 4,
        "build": "b0-unknown",  # the sdist's llama.cpp carries no git commit
    }
    # Without /props (it did not answer) the log alone gives the same context and file type.
    alone = bench.llama_server_resolved(log, None)
    assert alone["quantization"] == "Q4_1" and alone["n_ctx_slot"] == 256 and "n_slots" not in alone


def test_effective_of_a_server_reports_what_the_contract_promises(bench, monkeypatch):
    server = bench.LlamaServer.__new__(bench.LlamaServer)
    server.log = [(FIXTURES / "start.log").read_text()]
    server.argv, server.cell = ["llama-server"], {"env": {}}
    server.requested = ["max_model_len", "n_batch", "flash_attn"]
    props = json.loads((FIXTURES / "props.json").read_text())
    monkeypatch.setattr(server, "_get", lambda path: props)
    monkeypatch.setattr(server, "_server_env", lambda: {})
    effective = server.effective()
    assert contract.missing_reports({"engine": "llamacpp", **effective}, "llamacpp") == []
    # Requested names as llama-server resolved them; flash_attn's resolution is flash_attn_type.
    assert effective["engine_args"] == {"max_model_len": 256, "n_batch": 1024}
    assert effective["mode"] == "serve" and effective["server"] == "llama-server"


def test_the_recorded_stream_carries_usage_in_its_last_chunk():
    events = [line[6:] for line in (FIXTURES / "stream.txt").read_text().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert sum(bool(c["choices"][0]["text"]) for c in chunks) <= 8  # a token may end inside a UTF-8 character
    assert chunks[-1]["usage"]["completion_tokens"] == 8 and chunks[-1]["usage"]["prompt_tokens"] == 16
    assert chunks[-1]["timings"]["predicted_n"] == 8  # llama-server's own timings ride along


def test_quality_is_unsupported_with_a_one_line_reason(bench):
    server = bench.LlamaServer.__new__(bench.LlamaServer)
    result = bench.measure_quality(server, {"prompts": ["a"], "max_tokens": 1, "chunks": ["b"]})
    assert result["status"] == "unsupported" and "\n" not in result["error"]
    assert result["error"].startswith("llama-server gives no prompt log-probabilities")


def test_a_server_that_exits_at_start_fails_with_its_error_line(bench, capsys):
    server = bench.LlamaServer.__new__(bench.LlamaServer)
    server.PORT = 1  # nothing answers there: only the process's exit ends the wait
    script = "import sys; print('main: loading model'); print('error: invalid argument: --bogus'); sys.exit(1)"
    with pytest.raises(RuntimeError) as error:
        server.start([sys.executable, "-c", script], "llama-server --bogus")
    assert str(error.value) == "llama-server exited with code 1: error: invalid argument: --bogus"
    assert "$ llama-server --bogus" in capsys.readouterr().out  # the command, then its log, echoed
