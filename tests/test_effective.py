import json

from cellbench import effective


def cell(name, env=None, quantization="awq", dtype="float16", **engine_args):
    return {
        "id": f"{name}-h", "name": name, "engine": "vllm", "image": "rocm", "model": "qwen3-8b-awq", "mode": "offline",
        "sweep": {"batch_size": [1]}, "dtype": dtype, "quantization": quantization,
        "engine_args": engine_args, "env": env or {},
    }  # fmt: skip


def rocm_effective(env=None, **extra):
    """What vLLM's ROCm platform leaves behind for a quantized model: VLLM_USE_TRITON_AWQ=1,
    whatever was asked (RocmPlatform.verify_quantization sets it unconditionally)."""
    return {
        "dtype": "float16", "quantization": "awq", "enforce_eager": False, "compilation_mode": "3",
        "engine_args": {}, "env": {"VLLM_USE_TRITON_AWQ": "1", **(env or {})}, **extra,
    }  # fmt: skip


def test_rocm_triton_override_is_recorded():
    asked = cell("awq-triton_off", env={"VLLM_USE_TRITON_AWQ": "0"})
    found = effective.overrides(asked, rocm_effective())
    assert found == [{"setting": "env.VLLM_USE_TRITON_AWQ", "requested": "0", "effective": "1"}]
    assert effective.describe_override(found[0]) == "VLLM_USE_TRITON_AWQ forced to 1 by the engine"


def test_cells_with_equal_effective_settings_are_marked_same_as():
    default = cell("awq")
    off = cell("awq-triton_off", env={"VLLM_USE_TRITON_AWQ": "0"})
    on = cell("awq-triton_on", env={"VLLM_USE_TRITON_AWQ": "1"})
    marks = effective.same_as([(default, rocm_effective()), (off, rocm_effective()), (on, rocm_effective())])
    assert marks == {
        "awq-triton_off-h": "same as awq: VLLM_USE_TRITON_AWQ forced to 1 by the engine",
        "awq-triton_on-h": "same as awq: VLLM_USE_TRITON_AWQ resolved to 1",
    }


def test_cells_that_really_differ_are_not_marked():
    eager = cell("eager", enforce_eager=True)
    compiled = cell("compiled", enforce_eager=False)
    marks = effective.same_as(
        [(eager, rocm_effective(enforce_eager=True)), (compiled, rocm_effective(enforce_eager=False))]
    )
    assert marks == {}


def test_matching_values_in_other_spellings_are_not_overrides():
    asked = cell("c", dtype="half", quantization=None, enforce_eager=True, max_model_len=512)
    used = {
        "dtype": "float16", "quantization": None, "enforce_eager": True, "max_model_len": 512,
        "engine_args": {"enforce_eager": True, "max_model_len": "512"}, "env": {},
    }  # fmt: skip
    assert effective.overrides(asked, used) == []


def test_unreported_settings_are_neither_overrides_nor_evidence_of_sameness():
    a = cell("a", seed=1)
    b = cell("b", seed=2)
    assert effective.overrides(a, rocm_effective()) == []
    assert effective.same_as([(a, rocm_effective()), (b, rocm_effective())]) == {}


def test_cells_whose_engine_never_started_are_skipped():
    assert effective.overrides(cell("x"), None) == [] and effective.overrides_json(cell("x"), None) is None
    assert effective.same_as([(cell("x"), None), (cell("y"), None)]) == {}


def test_engine_set_env_lists_what_changed_while_starting():
    changed = effective.engine_set_env(
        {"VLLM_WORKER_MULTIPROC_METHOD": "fork", "OMP_NUM_THREADS": "2"},
        {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "OMP_NUM_THREADS": "2", "LD_PRELOAD": "/x/libgomp.so"},
    )
    assert changed == {
        "LD_PRELOAD": {"before": None, "after": "/x/libgomp.so"},
        "VLLM_WORKER_MULTIPROC_METHOD": {"before": "fork", "after": "spawn"},
    }


def test_same_as_rows_works_per_machine():
    default, off = cell("awq"), cell("awq-triton_off", env={"VLLM_USE_TRITON_AWQ": "0"})
    rows = [
        {"machine_id": m, "cell_id": c["id"], "settings_json": json.dumps(c), "effective_json": json.dumps(e)}
        for m in ("amd-1", "amd-2")
        for c, e in ((default, rocm_effective()), (off, rocm_effective()))
    ]
    marks = effective.same_as_rows(rows)
    assert set(marks) == {("amd-1", "awq-triton_off-h"), ("amd-2", "awq-triton_off-h")}
