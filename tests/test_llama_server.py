"""llama.cpp's llama-server as a serve-mode engine: its command line from a cell (golden), the
engine_args rule shared by the study check and the container, and what effective() reads from
the server's start log and GET /props (recorded from the real server in the llamacpp image:
tests/fixtures/llama-server/)."""

import os
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


def test_slots_follow_the_largest_batch(bench):
    assert bench.server_slots({"points": [{"batch_size": 1}, {"batch_size": 4}, {"batch_size": 2}]}) == 4


def test_sampling_matches_the_offline_llamacpp_engine(bench):
    server = bench.LlamaServer.__new__(bench.LlamaServer)
    server.model_path = "/model/m.gguf"
    assert server.completion_body([5, 6], 16) == {
        "model": "/model/m.gguf", "prompt": [5, 6], "max_tokens": 16, "ignore_eos": True, "temperature": 1.0,
        "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
