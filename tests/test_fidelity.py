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
