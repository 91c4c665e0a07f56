"""The fidelity check's commands and how it reads the engines' own benchmark outputs."""

import pytest
from cellbench import config, fidelity

LLAMA_BENCH_OUT = """load_backend: loaded CPU backend [from /opt/llama.cpp/lib]
[
  {
    "model_type": "llama ?B Q4_1",
    "n_threads": 2,
    "n_prompt": 128,
    "n_gen": 128,
    "avg_ts": 210.5,
    "stddev_ts": 1.5,
    "samples_ts": [ 209, 212 ]
  }
]
"""


def test_parse_llama_bench_reads_the_pg_test():
    assert fidelity.parse_llama_bench(LLAMA_BENCH_OUT) == {"total_tok_s": 210.5, "total_tok_s_stddev": 1.5}
    with pytest.raises(ValueError, match="no JSON"):
        fidelity.parse_llama_bench("error: failed to load model\n")


def test_parse_vllm_reference_reads_the_last_throughput_line():
    log = "INFO ...\nThroughput: 1.80 requests/s, 461.25 total tokens/s, 230.62 output tokens/s\nTotal num...\n"
    assert fidelity.parse_vllm_reference(log) == {"requests_s": 1.8, "total_tok_s": 461.25, "output_tok_s": 230.62}
    with pytest.raises(ValueError, match="no 'Throughput:' line"):
        fidelity.parse_vllm_reference("Traceback ...\n")


def test_reference_commands_carry_the_cell_settings(study):
    cell = config.expand_cells(study)[0]  # bf16, eager, max_model_len 512
    point = {"batch_size": 32, "input_len": 128, "output_len": 64}
    argv = fidelity.vllm_reference_command(cell, point, warmups=32)
    joined = " ".join(argv[3:])
    assert "--num-prompts 32" in joined and "--random-input-len 128" in joined and "--random-output-len 64" in joined
    assert "--dtype bfloat16" in joined and "--enforce-eager" in joined and "--max-model-len 512" in joined
    effective = {"n_threads": 2, "n_batch": 512, "n_ubatch": 512, "flash_attn_type": 0}
    bench = fidelity.llama_bench_command("m.gguf", point, effective, repetitions=3)
    assert bench[:3] == ["llama-bench", "-m", "/model/m.gguf"]
    assert " -pg 128,64 -t 2 " in " ".join(bench) and bench[bench.index("-fa") + 1] == "off"


def test_verdict_against_the_goal():
    assert fidelity.against_reference("vllm", [97.5], [100.0])["within_goal"]  # one round: the ratio itself
    assert not fidelity.against_reference("vllm", [96.0], [100.0])["within_goal"]
    assert fidelity.against_reference("llamacpp", [104.0], [100.0])["ratio"] == pytest.approx(1.04)
    # Rounds: the whole interval must lie inside the goal. Paired ratios 0.99, 1.01, 1.00 ->
    # ln mean 0, sd 0.0100, half width 4.302653 * 0.0100 / sqrt(3) = 0.0248: [0.976, 1.025] in 3 %.
    steady = fidelity.against_reference("vllm", [99.0, 101.0, 100.0], [100.0, 100.0, 100.0])
    assert steady["within_goal"] and steady["ratio_low"] == pytest.approx(0.9755, abs=1e-3)
    # The same mean with rounds that disagree (0.95, 1.05, 1.00): interval [0.88, 1.13], off the goal.
    assert not fidelity.against_reference("vllm", [95.0, 105.0, 100.0], [100.0, 100.0, 100.0])["within_goal"]


def test_serve_reference_command_is_the_point_s_load_on_the_running_server():
    point = {"batch_size": 8, "input_len": 128, "output_len": 64}
    argv = fidelity.vllm_serve_command({"model_path": "/model"}, point, 8000, "/out")
    assert argv[:2] == ["python3", "-c"] and "vllm.benchmarks.serve" in argv[2]
    joined = " ".join(argv[3:])
    for flag in (
        "--base-url http://127.0.0.1:8000",
        "--random-input-len 128",
        "--random-output-len 64",
        "--random-range-ratio 0",
        "--num-prompts 8",
        "--max-concurrency 8",
        "--request-rate inf",
        "--ignore-eos",
        "--temperature 1.0",
        "--seed {round}",
        "--result-filename vllm-round-{round}.json",
    ):
        assert flag in joined  # fmt: skip


def test_serve_figures_of_both_sides():
    result = {"completed": 8, "failed": 0, "median_ttft_ms": 250.0, "median_tpot_ms": 40.0}
    assert fidelity.parse_vllm_serve_result(result) == {"ttft_p50_s": 0.25, "tpot_p50_s": 0.04, "completed": 8}
    with pytest.raises(ValueError, match="2 request"):
        fidelity.parse_vllm_serve_result({**result, "failed": 2})
    with pytest.raises(ValueError, match="no median_tpot_ms"):
        fidelity.parse_vllm_serve_result({"completed": 8, "median_ttft_ms": 1.0})
    # Two streamed requests sent at 0: first chunks at 0.2 and 0.4 s, last at 1.2 and 2.4 s, 11
    # chunks of one token each: TTFT 0.2, 0.4 (median 0.3); TPOT 1.0/10, 2.0/10 (median 0.15).
    requests = [
        {"send_s": 0.0, "chunk_s": [0.2 + 0.1 * i for i in range(11)], "prompt_tokens": 4, "output_tokens": 11},
        {"send_s": 0.0, "chunk_s": [0.4 + 0.2 * i for i in range(11)], "prompt_tokens": 4, "output_tokens": 11},
    ]
    figures = fidelity.cellbench_serve_figures({"requests": requests, "wall_s": 2.4})
    assert figures == {"ttft_p50_s": pytest.approx(0.3), "tpot_p50_s": pytest.approx(0.15), "completed": 2}
    # The serve goal is ±5 %, not vLLM offline's 3 %.
    assert fidelity.against_reference("vllm", [104.0], [100.0], fidelity.SERVE_GOAL)["within_goal"]
    assert not fidelity.against_reference("vllm", [104.0], [100.0])["within_goal"]
