#!/usr/bin/env python3
"""Runs INSIDE the engine container: load the engine once, warm up, measure every point.

usage: bench_cell.py /out/cell.json

Writes /out/raw.json after the load and after every repeat (atomically), so a crash or a kill
keeps what was measured. It records raw timings only (per request: tokens, TTFT, latency); the
host turns them into metrics with the tested functions of the cellbench package. Standard
library only, besides the engine: the same script runs in every image.
"""

import asyncio
import bisect
import contextlib
import gzip
import http.client
import inspect
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

# The engine declarations, the secret-name rule and the flags rule, and the serving definitions
# (serving.py), shared with the host package: mounted at /cellbench-contract in a container, the
# package's own files when run from a checkout.
for _folder in ("/cellbench-contract", str(Path(__file__).resolve().parents[1] / "workflow" / "cellbench")):
    if Path(_folder, "contract.py").is_file():
        sys.path.insert(0, _folder)
        break
import contract  # noqa: E402
import serving  # noqa: E402

# Variables that choose kernels, devices and threads: vLLM's, the OpenMP/MKL threads, the HIP/HSA/
# ROCr runtime (the ROCm image sets HSA_ENABLE_IPC_MODE_LEGACY), PyTorch's (TunableOp:
# PYTORCH_TUNABLEOP_*), Triton's, the collectives (NCCL_/RCCL_), NVIDIA's container variables
# and CUDA's. Secret-shaped names are dropped whatever their prefix (contract.is_secret_name).
ENV_PREFIXES = (
    "VLLM_", "OMP_", "KMP_", "MKL_", "LD_PRELOAD", "HIP_", "HSA_", "ROCR_", "ROCM_", "CUDA_", "NVIDIA_",
    "PYTORCH_", "TRITON_", "NCCL_", "RCCL_", "HF_HUB_", "TORCHINDUCTOR_",
)  # fmt: skip
GPU_TOOLS = {
    "rocm_smi": ["rocm-smi", "--showproductname", "--showdriverversion"],
    "rocminfo": ["rocminfo"],
    "hipcc": ["hipcc", "--version"],
    "nvidia_smi": ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv"],
}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def selected_env(requested=(), environ=None) -> dict:
    """Engine-relevant variables, plus every variable the cell requested (to compare them)."""
    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in sorted(environ.items())
        if (k.startswith(ENV_PREFIXES) or k in requested) and not contract.is_secret_name(k)
    }


# The serve-mode server is started through this wrapper: it runs vLLM's server module as
# `python -m` would, and a thread beside it writes the server process's own os.environ (as
# selected_env selects it) to a file whenever it changes. So what vLLM's platform sets while
# it starts is seen: RocmPlatform.verify_quantization sets VLLM_USE_TRITON_AWQ=1 in os.environ
# (https://github.com/vllm-project/vllm/blob/001eda31e3d032e9dc864e97f3630358b2ff8b5a/vllm/platforms/rocm.py),
# which /proc/<pid>/environ (the environment at exec) would not show.
# argv: wrapper OUT_FILE REQUESTED_JSON MODULE [server args...]
SERVER_ENV_WRAPPER = """
import json, runpy, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench_cell
out, requested, module = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
def dump():
    last = None
    while True:
        env = bench_cell.selected_env(requested)
        if env != last:
            bench_cell.write_json(Path(out), env)
            last = env
        time.sleep(0.2)
threading.Thread(target=dump, daemon=True).start()
sys.argv = [module, *sys.argv[5:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def server_env_argv(out_file: str, requested: dict, module: str, args: list[str]) -> list[str]:
    """The command starting `module` (a server) under SERVER_ENV_WRAPPER."""
    folder = str(Path(__file__).resolve().parent)
    return [sys.executable, "-c", SERVER_ENV_WRAPPER, folder, out_file, json.dumps(sorted(requested)), module, *args]


def read_server_env(out_file: str, wait_s: float = 1.0) -> dict | None:
    """The server process's environment as its wrapper last wrote it, read after /health answered
    (and one more write period); None when it never wrote one: unknown, not the client's."""
    time.sleep(wait_s)
    try:
        return json.loads(Path(out_file).read_text())
    except (OSError, ValueError):
        return None


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


def gpu_arch(props, hip_version) -> str:
    """ROCm: the gfx target of gcnArchName ("gfx942:sramecc+:xnack-" -> "gfx942"); CUDA: the
    compute capability as sm_XY. CUDA builds of torch have gcnArchName too, repeating the device
    name (seen on an H200: "NVIDIA H200"), so it counts only when torch was built for HIP."""
    if hip_version and getattr(props, "gcnArchName", None):
        return props.gcnArchName.split(":")[0]
    return f"sm_{props.major}{props.minor}"


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
            facts["arch"] = gpu_arch(props, facts["hip"])
    except Exception as exc:  # noqa: BLE001 - provenance must never fail the cell
        facts["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return {k: v for k, v in facts.items() if v is not None}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in contract.PACKAGES:
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


def canary() -> dict:
    """The host canary (canary.py beside this script) in this image, before the engine loads."""
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("canary.py"))], capture_output=True, text=True, timeout=120
        )
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# Container CPU time: cgroup v2 cpu.stat (microseconds), else cgroup v1 cpuacct.usage (nanoseconds).
CGROUP_CPU = (
    ("/sys/fs/cgroup/cpu.stat", 1e-6),
    ("/sys/fs/cgroup/cpuacct/cpuacct.usage", 1e-9),
    ("/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage", 1e-9),
)


def cpu_sample():
    """(wall s, host busy s, host steal s, this container's CPU s), or None where unreadable.
    /proc/stat is not namespaced: inside a container it counts the whole host."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        tick = os.sysconf("SC_CLK_TCK")
        for path, scale in CGROUP_CPU:
            with contextlib.suppress(OSError, ValueError):
                text = Path(path).read_text()
                used = int(re.search(r"usage_usec (\d+)", text).group(1)) if "usage_usec" in text else int(text)
                return time.monotonic(), (user + nice + system + irq + softirq) / tick, steal / tick, used * scale
    except (OSError, ValueError, AttributeError):
        pass
    return None


def host_share(before, after) -> dict:
    """CPU cores used outside this container, and cores the hypervisor stole, between two samples:
    a sentinel for a round disturbed while it measured (its own repeats cannot show it)."""
    if before is None or after is None or after[0] <= before[0]:
        return {"host_foreign_cpu": None, "host_steal_cpu": None}
    wall = after[0] - before[0]
    foreign = (after[1] - before[1]) - (after[3] - before[3])
    return {"host_foreign_cpu": max(0.0, foreign / wall), "host_steal_cpu": (after[2] - before[2]) / wall}


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


# --- Prompt production: every prompt a point sends comes from point_requests (contract of the
# dataset kinds and of cell.json's `dataset_prompts`: cellbench.datasets). ---

# vLLM's is_valid_sequence defaults, applied to ShareGPT entries as vLLM's loader does (the
# same numbers as cellbench.datasets.SHAREGPT_LIMITS: this script cannot import the package).
SHAREGPT_MIN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


def per_request(output_len, count: int) -> list[int]:
    """Output tokens of each of `count` requests: one length for all (an int) or each its own."""
    return list(output_len) if isinstance(output_len, list) else [output_len] * count


def as_batch(requests: list) -> tuple[list[list[int]], object]:
    """(prompts, output_len) of point_requests' pairs for an engine's generate(): output_len an int
    when every request has the same length (so random prompts reach the engines as before), else
    the list of lengths."""
    prompts, lengths = [list(ids) for ids, _ in requests], [length for _, length in requests]
    return prompts, (lengths[0] if len(set(lengths)) == 1 else lengths)


def random_tokens(rng: random.Random, length: int, vocab_size: int, special_ids) -> list[int]:
    """`length` token ids drawn from the vocabulary, no special token."""
    ids = []
    while len(ids) < length:
        token = rng.randrange(vocab_size)
        if token not in special_ids:
            ids.append(token)
    return ids


def shared_prefix_prompts(seed, point, repeat, count, vocab_size, special_ids, prefix_len, num_prefixes=1):
    """Prompts of input_len tokens: prefix i mod num_prefixes (seeded by the seed alone: the same
    for every point and repeat of the cell), then a seeded suffix of input_len - prefix_len tokens,
    distinct within these `count` prompts."""
    prefixes = [
        random_tokens(random.Random(f"{seed}:prefix:{k}:{prefix_len}"), prefix_len, vocab_size, special_ids)
        for k in range(num_prefixes)
    ]
    rng = random.Random(f"{seed}:suffix:{point['batch_size']}:{point['input_len']}:{point['output_len']}:{repeat}")
    suffix_len, seen, prompts = point["input_len"] - prefix_len, set(), []
    for index in range(count):
        for _ in range(1000):
            suffix = random_tokens(rng, suffix_len, vocab_size, special_ids)
            if tuple(suffix) not in seen:
                break
        else:
            raise ValueError(f"no {count} distinct suffixes of {suffix_len} tokens; lengthen the suffix")
        seen.add(tuple(suffix))
        prompts.append(prefixes[index % num_prefixes] + suffix)
    return prompts


def dataset_order(seed, point, repeat, count, size) -> list[int]:
    """Indices into a dataset's `size` usable requests for `count` requests of a point's repeat
    (-1: the warm-up): the usable requests in a seeded order per point, the warm-up the first
    window of `count` of them, repeat r window r + 1, wrapping around."""
    order = list(range(size))
    random.Random(f"{seed}:dataset:{point['batch_size']}:{point['input_len']}:{point['output_len']}").shuffle(order)
    start = (repeat + 1) * count
    return [order[(start + index) % size] for index in range(count)]


def text_encoder(engine):
    """The engine's own tokenizer as text -> token ids (its encode(), else tokenizer(text).input_ids
    as vLLM's dataset loaders call it)."""
    if hasattr(engine, "encode"):
        return engine.encode
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise RuntimeError(f"{type(engine).__name__} has no tokenizer for a dataset's text prompts")
    return lambda text: tokenizer(text).input_ids


_DATASETS: dict = {}  # (engine, dataset) ids -> (engine, dataset, usable, pruned): tokenized once per engine load


def dataset_requests(cell: dict, engine) -> tuple[list[dict], int]:
    """The dataset's entries tokenized with the engine's tokenizer, as requests {"line", "ids",
    "output_len"}, and how many ShareGPT entries vLLM's rule pruned. A ShareGPT entry's output
    length is its completion's token count unless the dataset fixes one. A request longer than the
    cell's context (engine_args max_model_len or n_ctx) fails the cell, naming its line."""
    dataset = cell["dataset_prompts"]
    key = (id(engine), id(dataset))  # the entry holds both objects: their ids stay theirs
    if key in _DATASETS:
        return _DATASETS[key][2:]
    encode, context = text_encoder(engine), cell["engine_args"].get("max_model_len") or cell["engine_args"].get("n_ctx")
    usable, pruned = [], 0
    for entry in dataset["entries"]:
        ids = encode(entry["prompt"])
        output_len = entry["output_len"]
        if entry["completion"] is not None:  # ShareGPT: vLLM's output length and pruning
            fixed = output_len is not None
            output_len = output_len if fixed else len(encode(entry["completion"]))
            if (len(ids) < SHAREGPT_MIN or (not fixed and output_len < SHAREGPT_MIN)
                    or len(ids) > SHAREGPT_MAX_PROMPT or len(ids) + output_len > SHAREGPT_MAX_TOTAL):  # fmt: skip
                pruned += 1
                continue
        if context and len(ids) + output_len > context:
            raise ValueError(
                f"dataset {dataset['name']} line {entry['line']}: a prompt of {len(ids)} tokens and {output_len} "
                f"output tokens exceed the context of {context} tokens; raise max_model_len or leave the entry out"
            )
        usable.append({"line": entry["line"], "ids": ids, "output_len": output_len})
    if not usable:
        raise ValueError(f"dataset {dataset['name']}: no entry passes vLLM's ShareGPT length rule ({pruned} pruned)")
    _DATASETS[key] = engine, dataset, usable, pruned
    return usable, pruned


def chosen_requests(cell: dict, point: dict, repeat: int, count: int, engine) -> list[dict]:
    """The dataset requests of a point's repeat (see dataset_order)."""
    usable, _ = dataset_requests(cell, engine)
    return [usable[i] for i in dataset_order(cell["sweep"]["seed"], point, repeat, count, len(usable))]


def point_requests(cell: dict, point: dict, repeat, count: int, engine) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) of the `count` requests of a point's repeat (-1: the
    warm-up), in the engine's vocabulary: the one source of every prompt a cell sends.
    random: prompt_token_ids at the point's lengths (as before datasets existed); shared_prefix:
    shared_prefix_prompts; jsonl and shipped: the dataset's requests, each with its own lengths.
    A serve load level's load enters the seed of random and shared-prefix prompts, so no two
    levels send the same prompts (vLLM caches prefixes: a repeated prompt is answered faster)."""
    dataset = cell.get("dataset") or {"kind": "random"}
    seed, kind = cell["sweep"]["seed"], dataset["kind"]
    tag = repeat
    if point.get("load_kind"):
        tag = f"{point['load_phase']}:{point['load_kind']}:{serving.load_value(point)}:{repeat}"
    if kind == "random":
        prompts = prompt_token_ids(seed, point, tag, count, engine.vocab_size, engine.special_ids)
    elif kind == "shared_prefix":
        prompts = shared_prefix_prompts(seed, point, tag, count, engine.vocab_size, engine.special_ids,
                                        dataset["prefix_len"], dataset.get("num_prefixes", 1))  # fmt: skip
    else:
        window = repeat if isinstance(repeat, int) else -1  # the server's unloaded warm-up: the warm-up's
        return [
            (request["ids"], request["output_len"]) for request in chosen_requests(cell, point, window, count, engine)
        ]
    return [(ids, point["output_len"]) for ids in prompts]


def point_lines(cell: dict, point: dict, repeat: int, count: int, engine) -> list[int] | None:
    """The file lines of point_requests' requests (jsonl and shipped datasets), else None."""
    if not cell.get("dataset_prompts"):
        return None
    return [request["line"] for request in chosen_requests(cell, point, repeat, count, engine)]


def dataset_facts(cell: dict, engine) -> dict | None:
    """raw.json's `dataset`: the requests usable after tokenizing, and those vLLM's rule pruned."""
    if not cell.get("dataset_prompts"):
        return None
    usable, pruned = dataset_requests(cell, engine)
    return {"usable": len(usable), "pruned": pruned}


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


def one_line(exc: BaseException) -> str:
    """An exception as one line; a multi-line message (pydantic's) names its cause on the second line."""
    message = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(message[:2])}".strip()[:500]


class QualityUnsupported(Exception):
    """The engine cannot give what the quality step needs (e.g. prompt log-probabilities)."""


def check_fits(tokens: int, max_len, what: str) -> None:
    """A chunk (or prompt and its continuation) longer than the engine's context fails the quality
    step by name instead of being cut silently."""
    if max_len and tokens > max_len:
        raise ValueError(f"{what} of {tokens} tokens exceeds the context of {max_len}; lower quality.chunk_chars")


def nll_of_logits(logits, ids) -> float:
    """Sum of -log p of ids[1:] given the rows of logits before them (row i predicts ids[i + 1]),
    log-softmax in float64 with numpy."""
    import numpy as np

    rows = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = rows.max(axis=1)
    log_sum = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    return float((log_sum - rows[np.arange(len(rows)), np.asarray(ids[1:])]).sum())


def measure_quality(engine, texts: dict) -> dict:
    """The quality step (contract: cellbench.quality_texts): the engine's quality(texts), timed;
    any failure becomes a status and a one-line reason, never the cell's failure."""
    start = time.perf_counter()
    result = {"status": "ok", "error": None, "greedy": [], "greedy_tokens": 0, "nll_sum": None, "nll_tokens": 0,
              "method": None}  # fmt: skip
    try:
        if not hasattr(engine, "quality"):
            raise QualityUnsupported(f"{type(engine).__name__} has no quality step")
        result.update(engine.quality(texts))
    except QualityUnsupported as exc:
        result.update(status="unsupported", error=str(exc)[:500])
    except Exception as exc:  # noqa: BLE001 - the speed rows stand whatever the quality step does
        result.update(status="failed", error=one_line(exc))
        print(traceback.format_exc(), file=sys.stderr)
    result["seconds"] = time.perf_counter() - start
    return result


class ProfileUnsupported(Exception):
    """The engine cannot be profiled as it runs (e.g. its work happens in another process)."""


PROFILE_JSON = "profile.json"  # the host reads these two names from the run directory
PROFILE_TRACE = "profile.trace.json.gz"


# vLLM names each engine step it profiles after what the step scheduled (vllm/v1/worker/
# gpu_worker.py, annotate_profile): execute_context_N(tokens)_generation_M(tokens); N requests in
# prefill and M in decode. The detailed form puts the scheduled token count after "execute_".
STEP_ANNOTATION = re.compile(r"^execute_(?:\d+_)?context_(\d+)\(.*?\)_generation_(\d+)\(")


def step_phase(name: str) -> str | None:
    """prefill, decode or mixed for a vLLM step annotation; None for any other name."""
    match = STEP_ANNOTATION.match(name)
    if not match:
        return None
    prefill, decode = int(match.group(1)), int(match.group(2))
    return ("mixed" if decode else "prefill") if prefill else ("decode" if decode else None)


def _phase_at(steps: list[tuple[float, float, str | None]], ts: float) -> str | None:
    """The phase of the step annotation (start, end, phase) that holds time ts, if any."""
    index = bisect.bisect_right(steps, (ts, float("inf"), "")) - 1
    return steps[index][2] if index >= 0 and ts <= steps[index][1] else None


def trace_ops(events: list[dict], steps: int, device: bool) -> list[dict]:
    """Per (op, phase) figures per profiled step from a torch.profiler Chrome trace: calls, self and
    total time in µs, and the share of the step (self over the sum of all self times; self times
    do not overlap, so shares add up to 1; totals include children and do not).

    CPU clock (device False): "cpu_op" events; an op's self time is its duration less that of its
    direct children on the same thread. Device clock: "kernel" events, which do not nest. The
    phase is that of the vLLM step annotation around the op (for a kernel: around the CPU call
    that launched it, matched by correlation id); None where there is none (other engines)."""
    annotations: dict[tuple, list] = {}
    launches: dict[int, tuple] = {}
    for event in events:
        if event.get("ph") != "X":
            continue
        thread = (event.get("pid"), event.get("tid"))
        if event.get("cat") == "user_annotation" and step_phase(event.get("name", "")) is not None:
            start = float(event["ts"])
            annotations.setdefault(thread, []).append((start, start + float(event["dur"]), step_phase(event["name"])))
        elif event.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in event.get("args", {}):
            launches[event["args"]["correlation"]] = (thread, float(event["ts"]))
    for spans in annotations.values():
        spans.sort()
    kind = "kernel" if device else "cpu_op"
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == kind),
                 key=lambda e: (e.get("pid"), e.get("tid"), float(e["ts"]), -float(e["dur"])))  # fmt: skip
    figures: dict[tuple, list[float]] = {}  # (op, phase) -> [calls, self µs, total µs]
    stack: list[list] = []  # open CPU ops on the current thread: [end, figures of that call]
    thread_of_stack = None
    for event in ops:
        start, length = float(event["ts"]), float(event["dur"])
        thread = (event.get("pid"), event.get("tid"))
        if device:
            thread, at = launches.get(event.get("args", {}).get("correlation"), (None, start))
        else:
            at = start
        phase = _phase_at(annotations.get(thread, []), at)
        call = [length]  # this call's self time, less its children's durations below
        if not device:
            if thread != thread_of_stack:
                stack, thread_of_stack = [], thread
            while stack and start >= stack[-1][0] - 1e-3:
                stack.pop()
            if stack:
                stack[-1][1][0] -= length
            stack.append([start + length, call])
        entry = figures.setdefault((event["name"], phase), [0, [], 0.0])
        entry[0] += 1
        entry[1].append(call)
        entry[2] += length
    rows = []
    for (name, phase), (calls, selves, total) in figures.items():
        self_us = sum(max(call[0], 0.0) for call in selves)
        if self_us > 0:
            rows.append({"op": name, "calls": calls / steps, "self_us": self_us / steps, "total_us": total / steps,
                         "phase": phase})  # fmt: skip
    whole = sum(row["self_us"] for row in rows)
    for row in rows:
        row["share"] = row["self_us"] / whole if whole else None
    return sorted(rows, key=lambda row: (-row["self_us"], row["op"], row["phase"] or ""))


def pack_trace(trace: Path, out_dir: Path) -> None:
    """The raw trace as out_dir's gzipped Chrome trace (for Perfetto or TensorBoard)."""
    target = out_dir / PROFILE_TRACE
    if trace.suffix == ".gz":
        shutil.move(str(trace), target)
    else:
        with trace.open("rb") as plain, gzip.open(target, "wb") as packed:
            shutil.copyfileobj(plain, packed)
        trace.unlink()


def read_trace(trace: Path) -> list[dict]:
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as stream:
        return json.load(stream)["traceEvents"]


def measure_profile(engine, cell: dict, out_dir: Path) -> dict:
    """The profile step: the study's profile point run `steps` times under the engine's profiler,
    on the prompts of the point's repeat 0; profile.json and the gzipped Chrome trace into
    out_dir. Any failure becomes a status and a one-line reason, never the cell's failure."""
    profile = cell["profile"]
    point, steps = profile["point"], profile["steps"]
    start = time.perf_counter()
    result = {"status": "ok", "error": None, "point": point, "steps": steps, "ops": 0, "clock": None}
    try:
        if not hasattr(engine, "profile"):
            raise ProfileUnsupported(f"{type(engine).__name__} has no profiler")
        device = torch_sees_gpu()
        prompts, output_len = as_batch(point_requests(cell, point, 0, point["batch_size"], engine))
        trace = engine.profile(prompts, output_len, steps, device)
        ops = trace_ops(read_trace(trace), steps, device)
        pack_trace(trace, out_dir)
        result.update(ops=len(ops), clock="device" if device else "cpu")
        write_json(out_dir / PROFILE_JSON, {**result, "ops": ops})
    except ProfileUnsupported as exc:
        result.update(status="unsupported", error=str(exc)[:500])
    except Exception as exc:  # noqa: BLE001 - the speed rows stand whatever the profile does
        result.update(status="failed", error=one_line(exc))
        print(traceback.format_exc(), file=sys.stderr)
    result["seconds"] = time.perf_counter() - start
    return result


def torch_sees_gpu() -> bool:
    """Whether torch sees a GPU (CUDA or ROCm): then a profile's clock is the device's."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def torch_profile(generate, prompts, output_len: int, steps: int, device: bool) -> Path:
    """`steps` generate() calls under torch.profiler in this process; the path of its trace."""
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    with profiler(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            generate(prompts, output_len)
    trace = Path(tempfile.mkdtemp(prefix="cellbench-profile-")) / "trace.json"
    prof.export_chrome_trace(str(trace))
    return trace


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
        # A profiled cell loads vLLM's torch profiler, idle until the profile step starts it
        # (nothing runs under it before). No stacks: they multiply the trace's size.
        self.profile_dir = cell.get("profile_dir")
        if self.profile_dir:
            args["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": self.profile_dir,
                                       "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}  # fmt: skip
        self.cell = cell
        self.llm = LLM(model=cell.get("model_path", "/model"), dtype=cell["dtype"], **args)
        self.tokenizer = tokenizer = self.llm.get_tokenizer()
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

    def generate(self, prompts: list[list[int]], output_len) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # vLLM's own throughput benchmark samples (temperature 1) with ignore_eos and fixed length
        # (each request its own when a dataset gives them).
        def sampling(length: int) -> SamplingParams:
            return SamplingParams(
                n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=length, min_tokens=length
            )

        params = [sampling(n) for n in output_len] if isinstance(output_len, list) else sampling(output_len)
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

    def profile(self, prompts: list[list[int]], output_len: int, steps: int, device: bool) -> Path:
        """`steps` generate() calls under vLLM's own torch profiler, which runs where the model
        runs (the engine core's worker process) and names every engine step after what it
        scheduled; the worker writes the gzipped trace when the profile stops."""
        if not self.profile_dir:
            raise ProfileUnsupported("the engine was loaded without vLLM's profiler_config")
        self.llm.start_profile()
        try:
            for _ in range(steps):
                self.generate(prompts, output_len)
        finally:
            self.llm.stop_profile()
        traces = sorted(Path(self.profile_dir).glob("*.pt.trace.json*"), key=lambda path: path.stat().st_mtime)
        if not traces:
            raise RuntimeError(f"vLLM's profiler wrote no trace into {self.profile_dir}")
        return traces[-1]

    def quality(self, texts: dict) -> dict:
        from vllm import SamplingParams

        greedy = SamplingParams(temperature=0.0, max_tokens=texts["max_tokens"])
        outputs = self.llm.generate(texts["prompts"], greedy, use_tqdm=False)
        # max_tokens=1: only the prompt's log-probabilities are wanted; 0 asks for the prompt token's own.
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        nll_sum, nll_tokens = 0.0, 0
        for scored in self.llm.generate(texts["chunks"], scoring, use_tqdm=False):
            ids, logprobs = scored.prompt_token_ids, scored.prompt_logprobs
            for position in range(1, len(ids)):  # position 0 has no log-probability
                nll_sum -= logprobs[position][ids[position]].logprob
                nll_tokens += 1
        return {
            "greedy": [output.outputs[0].text for output in outputs],
            "greedy_tokens": sum(len(output.outputs[0].token_ids) for output in outputs),
            "nll_sum": nll_sum,
            "nll_tokens": nll_tokens,
            "method": "vllm offline: greedy temperature 0; NLL from prompt_logprobs=0 per chunk",
        }


def _enum_name(value) -> str | None:
    return None if value is None else getattr(value, "name", str(value))


def check_stored_quantization(cell: dict, stored: str) -> None:
    """llama.cpp runs a GGUF as stored: a cell asking for another quantization than the file's
    type (`stored`, e.g. Q4_1) is refused."""
    if cell["quantization"] and cell["quantization"].lower() != stored.lower():
        raise ValueError(
            f"quantization {cell['quantization']!r} requested, but {cell['model_gguf']} is {stored}; "
            "llama.cpp runs a GGUF as stored"
        )


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on the model's GGUF file, as stored (e.g. Q4_1).

    What "batch" means here: llama-cpp-python's Llama decodes one sequence at a time, so a
    point's batch_size requests run one after another in this one engine; it is the number of
    requests of the point, not a parallel batch. TTFT and latency count from the start of the
    point, as in vLLM's offline batch where every request arrives at once, so waiting for the
    requests ahead shows in them.
    """

    def __init__(self, cell: dict):
        from llama_cpp import Llama

        if not cell.get("model_gguf"):
            raise ValueError(f"model {cell['model']}: the prepared model keeps no GGUF file for llama.cpp")
        # Names that mean the same for both engines are mapped, so a study's defaults serve both.
        self.aliases = contract.ENGINES["llamacpp"].arg_aliases
        args = {self.aliases.get(name, name): value for name, value in cell["engine_args"].items()}
        accepted = set(inspect.signature(Llama.__init__).parameters) - {"self", "model_path", "kwargs"}
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ValueError(
                f"engine_args.{unknown[0]}: not a llama_cpp.Llama argument "
                "(llamacpp cells take Llama keyword arguments such as n_ctx, n_batch, n_threads)"
            )
        threads = len(os.sched_getaffinity(0))  # the container's CPUs (--cpuset-cpus)
        self.requested, self.env_names = list(cell["engine_args"]), list(cell["env"])
        self.args = {"n_threads": threads, "n_threads_batch": threads, "seed": cell["sweep"]["seed"], **args}
        self.llm = Llama(model_path=f"/model/{cell['model_gguf']}", n_gpu_layers=0, verbose=True, **self.args)
        check_stored_quantization(cell, self.llm._model.desc().split()[-1])  # "llama ?B Q4_1"
        self.vocab_size = self.llm.n_vocab()
        vocab = self.llm._model.vocab
        import llama_cpp

        # Control tokens (BOS, EOS, chat markers) never appear in the random prompts.
        self.special_ids = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_control(vocab, t)}

    def effective(self) -> dict:
        import llama_cpp

        desc = self.llm._model.desc()
        params = self.llm.context_params
        resolved = {
            "model_desc": desc,
            "quantization": desc.split()[-1] if desc else None,
            "n_threads": params.n_threads,
            "n_threads_batch": params.n_threads_batch,
            "n_ctx": self.llm.n_ctx(),
            "n_batch": self.llm.n_batch,
            "n_ubatch": params.n_ubatch,
            "flash_attn_type": int(getattr(params, "flash_attn_type", -1)),
            "type_k": int(params.type_k),
        }
        # The requested args under the study's names, as llama.cpp resolved those it reports.
        engine_args = {}
        for name in self.requested:
            own = self.aliases.get(name, name)
            value = resolved.get(own, getattr(params, own, None))
            if isinstance(value, str | int | float | bool):
                engine_args[name] = value
        return {
            **resolved,
            "system_info": llama_cpp.llama_print_system_info().decode(),
            "requested": self.args,
            "engine_args": engine_args,
            "env": selected_env(self.env_names),
        }

    def encode(self, text: str) -> list[int]:
        """A dataset's text prompt in llama.cpp's tokens (BOS only where the GGUF asks for one)."""
        return self.llm.tokenize(text.encode(), add_bos=True)

    def generate(self, prompts: list[list[int]], output_len) -> list[dict]:
        start = time.perf_counter()
        requests = []
        for prompt, length in zip(prompts, per_request(output_len, len(prompts)), strict=True):
            self.llm.reset()  # no prefix reuse from the previous request: every prompt is prefilled
            times = []
            # Same sampling as the vLLM cells: temperature 1, no top-k/top-p/min-p; generate() never
            # stops at EOS by itself, so the output length is fixed by counting.
            tokens = self.llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            for _ in tokens:
                times.append(time.perf_counter())
                if len(times) == length:
                    break
            tokens.close()
            requests.append(
                {
                    "prompt_tokens": len(prompt),
                    "output_tokens": len(times),
                    "ttft_s": times[0] - start if times else None,
                    "latency_s": times[-1] - start if times else None,
                }
            )
        return requests

    def quality(self, texts: dict) -> dict:
        import llama_cpp
        from llama_cpp import Llama

        vocab = self.llm._model.vocab
        greedy, greedy_tokens = [], 0
        for prompt in texts["prompts"]:
            ids = self.llm.tokenize(prompt.encode(), add_bos=True)  # BOS only where the GGUF asks for one
            check_fits(len(ids) + texts["max_tokens"], self.llm.n_ctx(), "a prompt and its continuation")
            self.llm.reset()
            out = []
            for token in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                if len(out) == texts["max_tokens"]:
                    break
            greedy.append(self.llm.detokenize(out).decode("utf-8", errors="replace"))
            greedy_tokens += len(out)
        # Only a Llama made with logits_all keeps a row of logits per position; the measured engine
        # stays as the speed points had it, and a second one on the same GGUF (mmap: its weights
        # are shared) scores the chunks, with the same context and batch sizes.
        scorer = Llama(model_path=self.llm.model_path, n_gpu_layers=0, verbose=False, logits_all=True,
                       **{**self.args, "n_ctx": self.llm.n_ctx(), "n_batch": self.llm.n_batch})  # fmt: skip
        nll_sum, nll_tokens = 0.0, 0
        try:
            for chunk in texts["chunks"]:
                ids = scorer.tokenize(chunk.encode(), add_bos=True)
                check_fits(len(ids), scorer.n_ctx(), "a reference chunk")
                scorer.reset()
                scorer.eval(ids)
                nll_sum += nll_of_logits(scorer.scores, ids)
                nll_tokens += len(ids) - 1
        finally:
            scorer.close()
        return {
            "greedy": greedy,
            "greedy_tokens": greedy_tokens,
            "nll_sum": nll_sum,
            "nll_tokens": nll_tokens,
            "method": "llama.cpp: greedy temp 0 top_k 1; NLL from a second Llama on the GGUF with logits_all=True, "
            "log-softmax in numpy float64",
        }


class TransformersEngine:
    """Hugging Face transformers `generate` on the prepared safetensors: a plain reference (eager
    PyTorch, a static batch, no paged KV cache or continuous batching) against which a serving
    engine's optimizations can be measured.

    A point's batch_size prompts (all input_len tokens long, so no padding) decode together in
    one generate() call; every request gets its first token at the first decode step and its
    last at the last, so TTFT and latency are the times of those steps from the call's start.
    """

    # Study engine_args this engine takes: max_model_len bounds input + output (as for vLLM),
    # attn_implementation is transformers' own ("sdpa", "eager").
    ARGS = ("max_model_len", "attn_implementation")

    def __init__(self, cell: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        unknown = sorted(set(cell["engine_args"]) - set(self.ARGS))
        if unknown:
            raise ValueError(
                f"engine_args.{unknown[0]}: not a transformers engine argument (it takes {', '.join(self.ARGS)})"
            )
        if cell["quantization"]:
            raise ValueError(f"quantization {cell['quantization']!r}: the transformers engine runs unquantized weights")
        self.cell, self.torch = cell, torch
        torch.manual_seed(cell["sweep"]["seed"])
        path = cell.get("model_path", "/model")
        dtype = "auto" if cell["dtype"] == "auto" else getattr(torch, cell["dtype"])
        options = {"attn_implementation": cell["engine_args"]["attn_implementation"]} if (
            "attn_implementation" in cell["engine_args"]) else {}  # fmt: skip
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options).eval()
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self.max_model_len = cell["engine_args"].get("max_model_len")
        for point in cell["points"]:  # vLLM refuses such a point too; refuse it before measuring
            if self.max_model_len and point["input_len"] + point["output_len"] > self.max_model_len:
                raise ValueError(
                    f"input_len {point['input_len']} + output_len {point['output_len']} exceed max_model_len "
                    f"{self.max_model_len}"
                )

    def effective(self) -> dict:
        resolved = {
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "quantization": None,
            "attn_implementation": self.model.config._attn_implementation,
            "num_threads": self.torch.get_num_threads(),
            "max_model_len": self.max_model_len,
        }
        return {
            **resolved,
            "engine_args": {name: resolved[name] for name in self.cell["engine_args"] if name in resolved},
            "env": selected_env(self.cell["env"]),
        }

    def generate(self, prompts: list[list[int]], output_len) -> list[dict]:
        torch = self.torch
        steps = []
        if isinstance(output_len, list):  # a static batch decodes one length (the study refuses datasets that vary it)
            raise ValueError("the transformers engine decodes one output length per batch")

        class Clock:  # transformers' streamer interface: put() per step (the first holds the prompt)
            def put(self, value):
                steps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            # Same sampling as the other engines: temperature 1, no top-k/top-p, a fixed length.
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=output_len, min_new_tokens=output_len, streamer=Clock(),
            )  # fmt: skip
        decode = steps[1:]  # steps[0] is the prompt
        return [
            {
                "prompt_tokens": len(prompt),
                "output_tokens": int(out.shape[1] - ids.shape[1]),
                "ttft_s": decode[0] - start if decode else None,
                "latency_s": decode[-1] - start if decode else None,
            }
            for prompt in prompts
        ]

    def profile(self, prompts: list[list[int]], output_len: int, steps: int, device: bool) -> Path:
        # Everything runs in this process: torch.profiler around generate() sees it all.
        return torch_profile(self.generate, prompts, output_len, steps, device)

    def quality(self, texts: dict) -> dict:
        torch = self.torch
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        greedy, greedy_tokens = [], 0
        with torch.inference_mode():
            for prompt in texts["prompts"]:  # one at a time: no padding to tell apart from the text
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
                check_fits(ids.shape[1] + texts["max_tokens"], self.max_model_len, "a prompt and its continuation")
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                    repetition_penalty=1.0, max_new_tokens=texts["max_tokens"],
                    pad_token_id=next(iter(eos), None),
                )[0, ids.shape[1] :].tolist()  # fmt: skip
                out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]  # stop at EOS
                greedy.append(self.tokenizer.decode(out, skip_special_tokens=True))
                greedy_tokens += len(out)
            nll_sum, nll_tokens = 0.0, 0
            for chunk in texts["chunks"]:
                ids = self.tokenizer(chunk, return_tensors="pt").input_ids
                check_fits(ids.shape[1], self.max_model_len, "a reference chunk")
                logits = self.model(input_ids=ids).logits[0].float()
                nll_sum += nll_of_logits(logits.numpy(), ids[0].tolist())
                nll_tokens += ids.shape[1] - 1
        return {
            "greedy": greedy,
            "greedy_tokens": greedy_tokens,
            "nll_sum": nll_sum,
            "nll_tokens": nll_tokens,
            "method": "transformers: generate(do_sample=False); NLL from forward-pass logits, "
            "log-softmax in numpy float64",
        }


# ---------------------------------------------------------------------------------------------
# Serve mode under load: an asyncio client on the standard library's streams (HTTP/1.1, chunked
# transfer encoding, server-sent events), one connection per request as vLLM's client opens one
# per request stream. Per request it records when it was sent and when every chunk carrying
# text arrived (perf_counter seconds from the level's start); cellbench.serving turns those into
# TTFT, TPOT, ITL, E2E latency and goodput, on the host as here.


class ServerDied(RuntimeError):
    """The server process exited while a level ran."""


def body_lines(reads: list[tuple[float, bytes]], chunked: bool) -> list[tuple[float, bytes]]:
    """(arrival time, line) of every line of a response body received as `reads` ((time, bytes)
    in order), chunked transfer encoding decoded: a line's time is that of the read that
    completed it. Parsing waits until the stream ended, so a read costs one append while it
    streams (the time stamps of every other request's chunks wait for no parsing)."""
    raw = b"".join(data for _, data in reads)
    ends, total = [], 0
    for when, data in reads:
        total += len(data)
        ends.append((total, when))
    # The decoded body as (raw offset, decoded bytes) pieces.
    pieces, at = [], 0
    if chunked:
        while at < len(raw):
            eol = raw.find(b"\r\n", at)
            if eol < 0:
                break
            size = int(raw[at:eol].split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            pieces.append((eol + 2, raw[eol + 2 : eol + 2 + size]))
            at = eol + 2 + size + 2
    else:
        pieces.append((0, raw))
    lines, pending = [], b""
    for offset, piece in pieces:
        start = 0
        while (eol := piece.find(b"\n", start)) >= 0:
            done_at = offset + eol + 1  # the raw offset that completes the line
            when = next(t for end, t in ends if end >= done_at)
            lines.append((when, (pending + piece[start:eol]).strip()))
            pending, start = b"", eol + 1
        pending += piece[start:]
    return lines


def body_complete(raw_tail: bytes, chunked: bool) -> bool:
    """Whether a chunked body's terminating chunk has arrived (a server may keep the connection)."""
    return chunked and (raw_tail.endswith(b"\r\n0\r\n\r\n") or raw_tail == b"0\r\n\r\n")


async def stream_completion(port: int, body: dict, record: dict, start: float, path: str = "/v1/completions") -> None:
    """POST a streamed completion to 127.0.0.1:port; fill `record` (send_s, chunk_s, end_s,
    output_tokens, prompt_tokens, error). A failed request is data: its error, never an exception
    (cancellation excepted)."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    record["send_s"] = time.perf_counter() - start  # before the connection, as vLLM's client starts its clock
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + payload)
        await writer.drain()
        status = (await reader.readline()).decode("latin-1").split()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        reads: list[tuple[float, bytes]] = []
        tail = b""
        while data := await reader.read(65536):
            reads.append((time.perf_counter(), data))
            tail = (tail + data)[-16:]
            if body_complete(tail, chunked):
                break
        if len(status) < 2 or status[1] != "200":
            text = b"".join(data for _, data in reads)[:200]
            record["error"] = f"server answered {' '.join(status[1:])[:60]}: {text!r}"
            return
        for when, line in body_lines(reads, chunked):
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                record["chunk_s"].append(when - start)
            if chunk.get("usage"):
                record["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                record["output_tokens"] = chunk["usage"]["completion_tokens"]
        if not record["chunk_s"]:
            record["error"] = "the stream carried no text"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        record["end_s"] = time.perf_counter() - start
        if writer is not None:
            writer.close()


def new_record(prompt: list[int]) -> dict:
    return {"prompt_tokens": len(prompt), "output_tokens": 0, "send_s": None, "chunk_s": [], "end_s": None,
            "error": None}  # fmt: skip


async def _run_level(engine, load: dict, requests: list, warmup: int, measured: int, rng: random.Random) -> list:
    """Run one load level against the server; return its request records in send order: `warmup`
    requests, `measured` requests, then cool-down requests that keep the load on until every
    measured request has ended (those still running then are cancelled). Closed loop: each of
    `concurrency` workers sends its next request when its last one ends. Open loop: a request
    every gamma-distributed gap (serving.arrival_gaps), however many are in flight, and at most
    `measured` cool-down requests."""
    start = time.perf_counter()
    records: list[dict] = []
    tasks: set[asyncio.Task] = set()
    left = {"measured": measured}
    done = asyncio.Event()
    if measured == 0:
        done.set()

    async def one() -> None:
        index = len(records)
        prompt, output_len = requests[index % len(requests)]  # cool-down past the list reuses prompts
        record = new_record(prompt)
        records.append(record)
        try:
            await engine.send(prompt, output_len, record, start)
        except asyncio.CancelledError:
            record["error"] = "cancelled: the level ended"
            record["end_s"] = time.perf_counter() - start
            raise
        if warmup <= index < warmup + measured:
            left["measured"] -= 1
            if left["measured"] == 0:
                done.set()

    def launch() -> asyncio.Task:
        task = asyncio.ensure_future(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    async def worker() -> None:
        while not done.is_set():
            if not engine.alive():  # no burst of refused connections before the watchdog looks
                raise ServerDied(engine.death())
            await launch()

    async def arrivals() -> None:
        gaps = serving.arrival_gaps(load["request_rate"], load["burstiness"], rng)
        due = 0.0
        # An overloaded server never catches up: at most as many cool-down requests as measured ones.
        for _ in range(warmup + 2 * measured):
            await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
            if done.is_set():
                return
            if not engine.alive():
                raise ServerDied(engine.death())
            launch()
            due += next(gaps)

    async def watchdog() -> None:
        while engine.alive():
            await asyncio.sleep(0.5)
        raise ServerDied(engine.death())

    if load["load_kind"] == "concurrency":
        drivers = [asyncio.ensure_future(worker()) for _ in range(load["concurrency"])]
    else:
        drivers = [asyncio.ensure_future(arrivals())]
    guard = asyncio.ensure_future(watchdog())
    finished = asyncio.ensure_future(done.wait())
    try:
        # Until the measured requests have ended; a driver that stops sending (an open loop at its
        # cool-down cap) does not end the level, one that raised (ServerDied) does.
        waiting = {finished, guard, *drivers}
        while not finished.done():
            ended, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in ended:
                if task is not finished and task.exception():
                    raise task.exception()
    finally:
        for task in [*drivers, *list(tasks), guard, finished]:
            task.cancel()
        await asyncio.gather(*drivers, *list(tasks), guard, finished, return_exceptions=True)
    return records


def run_level(engine, cell: dict, point: dict, repeat, latency_s: float | None) -> dict:
    """One load level of a serve cell (`point`: the sweep point and its load), measured: the raw
    record the host turns into a row (cellbench.measure.level_columns)."""
    found = serving.settings(cell["serve"])
    plan = serving.plan(point, found["requests_per_level"], found["warmup_requests"], latency_s)
    wave = serving.in_flight(point, latency_s)
    # Enough distinct prompts for warm-up, the measured requests and a long cool-down.
    count = plan["warmup"] + 2 * plan["measured"] + 2 * wave
    requests = point_requests(cell, point, repeat, count, engine)
    rng = random.Random(f"{cell['sweep']['seed']}:arrivals:{serving.label(point)}:{point['input_len']}:"
                        f"{point['output_len']}:{repeat}")  # fmt: skip
    sample = cpu_sample()
    started_at_s = time.time()
    begin = time.perf_counter()
    records = asyncio.run(_run_level(engine, point, requests, plan["warmup"], plan["measured"], rng))
    wall = time.perf_counter() - begin
    return {**point, "repeat": repeat, "wall_s": wall, "warmup_requests": plan["warmup"],
            "measured_requests": plan["measured"], "unloaded_latency_s": latency_s, "requests": records,
            **host_share(sample, cpu_sample()), "started_at_s": started_at_s, "finished_at_s": time.time()}  # fmt: skip


def unloaded_latency(engine, cell: dict, point: dict, count: int) -> float | None:
    """Median E2E latency of `count` requests of the point sent one after another (the server's
    warm-up, and what a request-rate level's size is planned from)."""
    requests = point_requests(cell, {**point, "load_kind": None}, "unloaded", count, engine)
    latencies = []
    for prompt, output_len in requests:
        record = new_record(prompt)
        start = time.perf_counter()
        asyncio.run(engine.send(prompt, output_len, record, start))
        if record["error"]:
            raise RuntimeError(f"warm-up request failed: {record['error']}")
        latencies.append(serving.request_timings(record)["e2e_s"])
    return serving.percentile(latencies, 50)


def measure_levels(engine, cell: dict, raw: dict, raw_path: Path) -> None:
    """Every load level of a serve cell on this one server: per sweep point (input x output
    length), warm-up, the swept levels (each `repeats` times), then the capacity search. raw.json
    is rewritten after each level, so a server that dies keeps the levels already measured."""
    found = serving.settings(cell["serve"])
    search = found["search"]
    shapes = list(dict.fromkeys((p["input_len"], p["output_len"]) for p in cell["points"]))
    if search:
        raw["search"] = {"done": False, "searches": []}
    for input_len, output_len in shapes:
        shape = {"input_len": input_len, "output_len": output_len}
        latency = unloaded_latency(engine, cell, {"batch_size": 1, **shape}, max(1, cell["sweep"]["warmup"]))
        for point in [p for p in cell["points"] if (p["input_len"], p["output_len"]) == (input_len, output_len)]:
            for repeat in range(cell["sweep"]["repeats"]):
                raw["points"].append(run_level(engine, cell, point, repeat, latency))
                write_json(raw_path, raw)
        if not search:
            continue
        record = {**shape, "metric": search["metric"], "probes": [], "outcome": None}
        raw["search"]["searches"].append(record)
        while (value := serving.next_probe([(p["load"], p["held"]) for p in record["probes"]], search)) is not None:
            load = serving.level(search["metric"], value, "search", found["burstiness"])
            point = {"batch_size": load["concurrency"] or 0, **shape, **load}
            level = run_level(engine, cell, point, 0, latency)
            figures = serving.level_figures(level["requests"], level["warmup_requests"], level["measured_requests"],
                                            found["slo"])  # fmt: skip
            record["probes"].append({"load": value, "slo_share": figures["slo_share"],
                                     "held": serving.passed(figures, search["slo_share"])})  # fmt: skip
            raw["points"].append(level)
            write_json(raw_path, raw)
        record["outcome"] = serving.outcome([(p["load"], p["held"]) for p in record["probes"]], search)
        write_json(raw_path, raw)
    if search:
        raw["search"]["done"] = True


class OpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 inside this container (still --network none), and
    a streaming client beside it. Load time = server start until /health answers. Subclasses
    give the command line (start) and a request's body (completion_body: sampling, length).

    A point sends its batch_size requests at once (closed loop, concurrency = batch size), or
    with seeded Poisson arrivals at serve.request_rate. Per request it records the send time and
    the arrival time of every streamed chunk that carried text (as vLLM's serving benchmark
    does); the host computes TTFT, TPOT, ITL and E2E latency from these timestamps.
    """

    PORT = 8000
    NAME = "server"  # in messages
    ERROR_LINE = r"Error|Exception"  # a log line that says why the server stopped

    def start(self, argv: list[str], shown: str) -> None:
        """Start the server (`shown`: its command as the log prints it) and wait until it answers."""
        print(f"$ {shown}", flush=True)
        self.log: list[str] = []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._echo, daemon=True).start()
        while not self._healthy():
            if not self.alive():
                time.sleep(0.2)  # the echo thread reads the last lines
                raise RuntimeError(self.death())
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.process.poll() is None

    def death(self) -> str:
        """The server's exit as one line: its code and the last error line of its log."""
        errors = [line for line in self.log if re.search(self.ERROR_LINE, line)]
        last = errors[-1].strip() if errors else "no error line in its log"
        return f"{self.NAME} exited with code {self.process.returncode}: {last}"[:500]

    def _echo(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)
            sys.stdout.write(line)

    def _healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.PORT, timeout=5)
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def _get(self, path: str) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.PORT, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.NAME} answered {response.status} to GET {path}: {data[:300]!r}")
        return json.loads(data)

    def completion_body(self, prompt: list[int], output_len: int) -> dict:
        """A streamed /v1/completions request of exactly output_len tokens (ignore_eos)."""
        raise NotImplementedError

    async def send(self, prompt: list[int], output_len: int, record: dict, start: float) -> None:
        """One request of a load level through the asyncio client (stream_completion)."""
        await stream_completion(self.PORT, self.completion_body(prompt, output_len), record, start)

    def _stream(self, prompt: list[int], output_len: int, start: float, record: dict) -> None:
        body = self.completion_body(prompt, output_len)
        connection = http.client.HTTPConnection("127.0.0.1", self.PORT, timeout=600)
        record["send_s"] = time.perf_counter() - start
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.NAME} answered {response.status}: {response.read()[:300]!r}")
        while line := response.readline():
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            now = time.perf_counter() - start
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                record["chunk_s"].append(now)
            if chunk.get("usage"):
                record["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
                record["output_tokens"] = chunk["usage"]["completion_tokens"]

    def _complete(self, body: dict) -> dict:
        """One non-streamed /v1/completions request; its JSON answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.PORT, timeout=600)
        connection.request("POST", "/v1/completions", json.dumps({"model": self.model_path, **body}),
                           {"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.NAME} answered {response.status}: {data[:300]!r}")
        return json.loads(data)

    def generate(self, prompts: list[list[int]], output_len) -> list[dict]:
        lengths = per_request(output_len, len(prompts))
        rng = random.Random(f"{self.seed}:arrivals:{len(prompts)}:{output_len}")
        send_at, clock = [], 0.0
        for _ in prompts:
            send_at.append(clock)
            if self.request_rate:
                clock += rng.expovariate(self.request_rate)
        records = [{"prompt_tokens": len(p), "output_tokens": 0, "send_s": None, "chunk_s": []} for p in prompts]
        errors: list[BaseException] = []

        def client(index: int) -> None:
            try:
                time.sleep(max(0.0, start + send_at[index] - time.perf_counter()))
                self._stream(prompts[index], lengths[index], start, records[index])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return records

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)


class VllmServer(OpenAIServer):
    """vLLM's OpenAI-compatible server (its api_server module, under SERVER_ENV_WRAPPER)."""

    NAME = "vLLM server"
    MODULE = "vllm.entrypoints.openai.api_server"

    def __init__(self, cell: dict):
        from transformers import AutoTokenizer

        self.model_path = cell.get("model_path", "/model")
        args = ["--model", self.model_path, "--host", "127.0.0.1", "--port", str(self.PORT), "--dtype", cell["dtype"],
                "--seed", str(cell["sweep"]["seed"]), "--disable-uvicorn-access-log"]  # fmt: skip
        if cell["quantization"]:
            args += ["--quantization", cell["quantization"]]
        args += contract.cli_flags(cell["engine_args"])
        self.env_file = str(Path(os.environ.get("HOME", "/tmp")) / f"server-env-{os.getpid()}.json")
        argv = server_env_argv(self.env_file, cell["env"], self.MODULE, args)
        self.start(argv, f"{sys.executable} -m {self.MODULE} " + " ".join(args))
        self.request_rate = cell["serve"].get("request_rate")
        self.seed = cell["sweep"]["seed"]
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.vocab_size = len(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)

    def completion_body(self, prompt: list[int], output_len: int) -> dict:
        return {
            "model": self.model_path, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
            "ignore_eos": True, "temperature": 1.0, "top_p": 1.0, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip

    def effective(self) -> dict:
        """What the server's engine resolved, read from the config line it logs at start."""
        text = "".join(self.log)
        # The server's log names no engine args one by one: none is resolved here (unknown, so
        # "same as" never claims two serve cells agree on one).
        # env: the server process's once it answers (its platform has set what it sets), never
        # this client's; None (unknown) when the wrapper wrote none. Read here, after load_s.
        env = read_server_env(self.env_file)
        found = {"engine": "vllm", "mode": "serve", "engine_args": {}, "env": env}
        patterns = {
            "dtype": r"dtype=torch\.(\w+)",
            "quantization": r"quantization=(\w+)",
            "enforce_eager": r"enforce_eager=(True|False)",
            "max_model_len": r"max_seq_len=(\d+)",
            "compilation_mode": r"'mode': <(CompilationMode\.\w+)",
            # On CPU the server keeps cores for its front end; the engine computes on the rest.
            "engine_core_ids": r"core ids=\[([0-9, ]*)\]",
            "reserved_cpus": r"reserved_cpus=\[([0-9, ]*)\]",
        }
        for key, pattern in patterns.items():
            match = re.search(pattern, text)
            if match:
                value = match.group(1)
                found[key] = (
                    int(value) if value.isdigit() else {"True": True, "False": False, "None": None}.get(value, value)
                )
        return found

    def quality(self, texts: dict) -> dict:
        answer = self._complete({"prompt": texts["prompts"], "max_tokens": texts["max_tokens"], "temperature": 0.0})
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        nll_sum, nll_tokens = 0.0, 0
        for chunk in texts["chunks"]:
            # Token ids in, so the scored ids are known; prompt_logprobs is vLLM's own parameter.
            ids = self.tokenizer(chunk).input_ids
            scored = self._complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
            logprobs = scored["choices"][0].get("prompt_logprobs")
            if not logprobs:
                raise QualityUnsupported("the vLLM server returned no prompt_logprobs")
            for position in range(1, len(ids)):
                nll_sum -= logprobs[position][str(ids[position])]["logprob"]
                nll_tokens += 1
        return {
            "greedy": [choice["text"] for choice in choices],
            "greedy_tokens": answer["usage"]["completion_tokens"],
            "nll_sum": nll_sum,
            "nll_tokens": nll_tokens,
            "method": "vllm server /v1/completions: temperature 0; NLL from prompt_logprobs=0 on token-id prompts",
        }


LLAMA_SERVER = "/opt/llama.cpp/bin/llama-server"  # built with llama-bench and the libraries (containers/llamacpp)

# ggml's enum ggml_type values of the KV cache types llama-server takes (ggml/include/ggml.h),
# so a serve cell reports type_k as the offline llama.cpp engine does (params.type_k).
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
FLASH_ATTN_TYPES = {"auto": -1, "disabled": 0, "enabled": 1}  # llama.h's llama_flash_attn_type


def server_slots(cell: dict) -> int:
    """The parallel slots a llama-server cell asks for by default: as many as it ever sends at
    once (its largest batch or concurrency level), so those requests decode together."""
    return serving.most_in_flight(cell.get("serve"), [point["batch_size"] for point in cell["points"]])


def llama_server_argv(cell: dict, threads: int) -> list[str]:
    """llama-server's command line for a cell (contract.llama_server_flags maps its engine_args)."""
    defaults = {"threads": threads, "threads_batch": threads, "cont_batching": True}
    # Verbosity 4 (trace) logs what llama.cpp's library resolved at start (context, batch sizes,
    # flash attention, KV cache types, threads), which effective() reads; a few lines per request.
    return [LLAMA_SERVER, "--model", f"/model/{cell['model_gguf']}", "--host", "127.0.0.1",
            "--port", str(OpenAIServer.PORT), "--seed", str(cell["sweep"]["seed"]), "--log-verbosity", "4",
            *contract.llama_server_flags(cell["engine_args"], server_slots(cell), defaults)]  # fmt: skip


def llama_server_resolved(log: str, props: dict | None) -> dict:
    """What llama-server resolved, from its start log (llama.cpp's context and KV-cache lines, its
    system_info line) and its GET /props answer; a key whose line is missing is left out."""
    found = {}
    patterns = {
        "quantization": r"file type\s*=\s*(\S+)",
        "n_ctx": r"llama_context: n_ctx\s*=\s*(\d+)",
        "n_ctx_slot": r"llama_context: n_ctx_seq\s*=\s*(\d+)",
        "n_batch": r"llama_context: n_batch\s*=\s*(\d+)",
        "n_ubatch": r"llama_context: n_ubatch\s*=\s*(\d+)",
        "kv_unified": r"llama_context: kv_unified\s*=\s*(true|false)",
        "n_threads": r"n_threads = (\d+) \(n_threads_batch",
        "n_threads_batch": r"n_threads_batch = (\d+)\)",
        "type_k": r"K \((\w+)\):",
        "type_v": r"V \((\w+)\):",
        "system_info": r"system_info: .*? \| (.+)$",
    }
    for key, pattern in patterns.items():
        match = re.search(pattern, log, re.MULTILINE)
        if match:
            value = match.group(1).strip()
            found[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    for key in ("type_k", "type_v"):  # as the offline engine reports them: ggml's type numbers
        if key in found:
            found[key] = GGML_TYPES.get(found[key], found[key])
    # The context logs the mode asked for ("auto"), then what auto resolved to: the last one said.
    modes = re.findall(
        r"llama_context: flash_attn\s*=\s*(\w+)|Flash Attention (enabled)|Flash Attention not supported, set to (\w+)",
        log,
    )
    if modes:
        mode = next(group for group in modes[-1] if group)
        found["flash_attn_type"] = FLASH_ATTN_TYPES.get(mode, mode)
    if props:
        settings = props.get("default_generation_settings") or {}
        found["n_slots"] = props.get("total_slots")
        found["n_ctx_slot"] = settings.get("n_ctx", found.get("n_ctx_slot"))
        found["build"] = props.get("build_info")
        found["quantization"] = props.get("model_ftype", found.get("quantization"))
    return found


class LlamaServer(OpenAIServer):
    """llama.cpp's own llama-server on the cell's GGUF, with parallel slots and continuous
    batching: a point of batch N is N requests decoded together (-np N), where the offline
    llama.cpp engine runs them one after another. Built from the same compile as the libraries
    the offline engine loads. The prompts are the offline engine's (same vocabulary, same control
    tokens left out), read from the GGUF with llama-cpp-python's vocab-only load.
    """

    NAME = "llama-server"
    ERROR_LINE = r"(?i)\berror\b|failed"

    def __init__(self, cell: dict):
        import llama_cpp
        from llama_cpp import Llama

        if not cell.get("model_gguf"):
            raise ValueError(f"model {cell['model']}: the prepared model keeps no GGUF file for llama.cpp")
        self.model_path = f"/model/{cell['model_gguf']}"
        vocab_model = Llama(model_path=self.model_path, vocab_only=True, verbose=False)
        self.vocab_size = vocab_model.n_vocab()
        vocab = vocab_model._model.vocab
        self.special_ids = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_control(vocab, t)}
        vocab_model.close()
        self.cell, self.requested = cell, list(cell["engine_args"])
        self.argv = llama_server_argv(cell, len(os.sched_getaffinity(0)))  # the container's CPUs
        self.start(self.argv, " ".join(self.argv))
        # The file type its start log names (a vocab-only load has no model description).
        stored = llama_server_resolved("".join(self.log), None).get("quantization")
        try:
            check_stored_quantization(cell, stored) if stored else None
        except ValueError:
            self.close()
            raise
        self.request_rate = cell["serve"].get("request_rate")
        self.seed = cell["sweep"]["seed"]

    def completion_body(self, prompt: list[int], output_len: int) -> dict:
        # As the offline llama.cpp engine samples: temperature 1 with top-k, top-p, min-p and the
        # repeat penalty off (llama-server's defaults are 40, 0.95, 0.05, 1.0); a fixed length.
        return {
            "model": self.model_path, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip

    def effective(self) -> dict:
        try:
            props = self._get("/props")
        except (OSError, RuntimeError, ValueError):
            props = None
        resolved = llama_server_resolved("".join(self.log), props)
        # The requested args under the study's names, as llama-server resolved those it reports.
        own = {"max_model_len": "n_ctx_slot", "parallel": "n_slots", "batch_size": "n_batch",
               "ubatch_size": "n_ubatch", "threads": "n_threads", "threads_batch": "n_threads_batch"}  # fmt: skip
        engine_args = {}
        for name in self.requested:
            key = own.get(contract.LLAMA_SERVER_ALIASES.get(name, name))
            if key in resolved:
                engine_args[name] = resolved[key]
        return {
            "mode": "serve",
            "server": "llama-server",
            **resolved,
            "argv": self.argv,
            "engine_args": engine_args,
            "env": self._server_env(),
        }

    def _server_env(self) -> dict | None:
        """The server's environment as it was started with (a C++ process: its /proc environ),
        selected as for the other engines plus llama-server's own LLAMA_ARG_* settings."""
        try:
            pairs = Path(f"/proc/{self.process.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return None
        environ = dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)
        requested = [*self.cell["env"], *(name for name in environ if name.startswith("LLAMA_ARG_"))]
        return selected_env(requested, environ)

    def quality(self, texts: dict) -> dict:
        raise QualityUnsupported(
            "llama-server gives no prompt log-probabilities (its /v1/completions ignores echo and prompt_logprobs; "
            "its logprobs cover generated tokens only), so the reference text's NLL cannot be scored"
        )


# One class per engine the contract declares (tests/test_contract.py holds the two lists equal).
ENGINE_CLASSES = {"vllm": VllmEngine, "llamacpp": LlamaCppEngine, "transformers": TransformersEngine}
SERVER_CLASSES = {"vllm": VllmServer, "llamacpp": LlamaServer}


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
    if cell.get("profile"):  # where an engine that profiles in another process writes its trace
        cell["profile_dir"] = str(raw_path.parent / "engine-profile")
    # Before the engine exists, so the engine's own threads cannot slow it.
    raw["canary"] = canary()
    write_json(raw_path, raw)
    try:
        start = time.perf_counter()
        engine = (SERVER_CLASSES if cell["mode"] == "serve" else ENGINE_CLASSES)[cell["engine"]](cell)
        raw["load_s"] = time.perf_counter() - start
        raw["effective"] = {"engine": cell["engine"], **engine.effective()}
        raw["status"] = "measuring"
        # Epoch seconds (the host's clock too: one kernel), to align the host's telemetry and
        # progress with the repeats; perf_counter times the repeats themselves.
        raw["measuring_at_s"] = time.time()
        write_json(raw_path, raw)
        levels = cell["mode"] == "serve" and serving.has_levels(cell["serve"])
        if levels:  # load levels against the one server; else every point as a batch, as ever
            measure_levels(engine, cell, raw, raw_path)
        for point in [] if levels else cell["points"]:
            count = point["batch_size"]
            warmup = as_batch(point_requests(cell, point, -1, count, engine))
            if raw.get("dataset") is None and cell.get("dataset_prompts"):
                raw["dataset"] = dataset_facts(cell, engine)
            for _ in range(sweep["warmup"]):
                engine.generate(*warmup)
            for repeat in range(sweep["repeats"]):
                prompts, output_len = as_batch(point_requests(cell, point, repeat, count, engine))
                lines = point_lines(cell, point, repeat, count, engine)
                sample = cpu_sample()
                started_at_s = time.time()
                begin = time.perf_counter()
                requests = engine.generate(prompts, output_len)
                wall = time.perf_counter() - begin
                finished_at_s = time.time()
                host = host_share(sample, cpu_sample())
                for request, line in zip(requests, lines or [], strict=False):
                    request["dataset_line"] = line
                raw["points"].append(
                    {**point, "repeat": repeat, "wall_s": wall, "requests": requests, **host,
                     "started_at_s": started_at_s, "finished_at_s": finished_at_s}
                )  # fmt: skip
                write_json(raw_path, raw)
        # Quality: after every speed point, outside their timed regions, on the same engine load.
        if cell.get("quality_texts"):
            raw["quality"] = measure_quality(engine, cell["quality_texts"])
            write_json(raw_path, raw)
        # Profile: last, on the same engine load, never inside a timed region (round 1 only).
        if cell.get("profile"):
            raw["profile"] = measure_profile(engine, cell, raw_path.parent)
            shutil.rmtree(cell["profile_dir"], ignore_errors=True)  # its trace is packed beside raw.json
            write_json(raw_path, raw)
        if hasattr(engine, "close"):
            engine.close()
        raw["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes data for the host
        raw["status"] = "failed"
        raw["error"] = one_line(exc)
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
