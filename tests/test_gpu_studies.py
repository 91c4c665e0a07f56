"""The seed's GPU studies validate here and hold the seed's cells; GPU counts are checked."""

import copy
from pathlib import Path

import pytest
from cellbench import config

ROOT = Path(__file__).resolve().parents[1]
SEED_CELLS = {
    # Qwen3-8B bf16 vs AWQ (Triton AWQ as vLLM picks it, and VLLM_USE_TRITON_AWQ=0), GPTQ, 7B bf16.
    "qwen3-8b-bf16": ("qwen3-8b", "bfloat16", None, {}),
    "qwen3-8b-awq": ("qwen3-8b-awq", "auto", "awq", {}),
    "qwen3-8b-awq-no-triton": ("qwen3-8b-awq", "auto", "awq", {"VLLM_USE_TRITON_AWQ": "0"}),
    "qwen2.5-7b-gptq": ("qwen2.5-7b-instruct-gptq-int4", "auto", "gptq", {}),
    "qwen2.5-7b-bf16": ("qwen2.5-7b-instruct", "bfloat16", None, {}),
}


@pytest.mark.parametrize("name, device", [("rocm-awq", "rocm"), ("cuda-awq", "cuda")])
def test_gpu_study_holds_the_seed_cells(name, device):
    study = config.load_study(ROOT / "config" / f"{name}.yaml")
    cells = list(config.resolve(study)["cells"].values())
    for group, (model, dtype, quantization, env) in SEED_CELLS.items():
        mine = [c for c in cells if c["group"] == group]
        assert sorted(c["engine_args"]["enforce_eager"] for c in mine) == [False, True], group
        for cell in mine:
            assert (cell["model"], cell["dtype"], cell["quantization"], cell["env"]) == (
                model,
                dtype,
                quantization,
                env,
            )
            assert cell["device"] == device and cell["resources"]["gpus"] == 1
            assert cell["engine_args"]["max_model_len"] == 8192
            assert cell["engine_args"]["gpu_memory_utilization"] == 0.9
            assert cell["engine_args"]["tensor_parallel_size"] == 1
            assert cell["sweep"]["batch_size"][0] == 1 and cell["sweep"]["batch_size"][-1] == 64
    repos = {spec["repo_id"] for spec in study["models"].values()}
    assert repos >= {
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-8B-AWQ",
        "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
        "Qwen/Qwen2.5-7B-Instruct",
    }


def test_cuda_study_adds_marlin_kernels():
    cells = config.resolve(config.load_study(ROOT / "config" / "cuda-awq.yaml"))["cells"].values()
    assert {c["quantization"] for c in cells} == {None, "awq", "gptq", "awq_marlin", "gptq_marlin"}


@pytest.fixture
def rocm_study():
    return copy.deepcopy(config.load_study(ROOT / "config" / "rocm-awq.yaml"))


def test_tensor_parallel_beyond_the_gpus_given_is_a_config_error(rocm_study):
    rocm_study["defaults"]["engine_args"]["tensor_parallel_size"] = 2
    with pytest.raises(config.ConfigError, match=r"tensor_parallel_size is 2 but resources.gpus gives 1"):
        config.resolve(rocm_study)
    rocm_study["defaults"]["resources"]["gpus"] = 2
    assert config.resolve(rocm_study)["cells"]


def test_gpu_cells_need_gpus_and_cpu_cells_none(rocm_study, study):
    rocm_study["defaults"]["resources"]["gpus"] = 0
    with pytest.raises(config.ConfigError, match="a rocm cell has resources.gpus 0; expected at least 1"):
        config.resolve(rocm_study)
    study["defaults"]["resources"]["gpus"] = 1
    with pytest.raises(config.ConfigError, match="resources.gpus is 1 but image 'cpu' is a cpu image"):
        config.resolve(study)


def test_hf_cache_model_needs_a_repo_id(rocm_study):
    del rocm_study["models"]["qwen3-8b"]["repo_id"]
    with pytest.raises(config.ConfigError, match="models.qwen3-8b.repo_id: required for hf-cache"):
        config.resolve(rocm_study)


def _seed_ranges(name):
    return config.load_study(ROOT / "config" / f"{name}.yaml")["expectations"]


def _point(cell, device, tok_s):
    return {"cell_name": cell, "machine_id": "m", "device_name": device, "status": "ok", "output_tok_s": tok_s,
            "batch_size": 1, "input_len": 128, "output_len": 256}  # fmt: skip


@pytest.mark.parametrize(
    "name, ranges",
    [
        ("rocm-awq", {"qwen3-8b-bf16-no_enforce_eager": (25, 30), "qwen3-8b-awq-no_enforce_eager": (35, 45),
                      "qwen2.5-7b-bf16-no_enforce_eager": (30, 35)}),
        ("cuda-awq", {"qwen3-8b-bf16-no_enforce_eager": (30, 35), "qwen3-8b-awq-marlin-no_enforce_eager": (50, 70)}),
    ],
)  # fmt: skip
def test_gpu_studies_hold_the_seeds_figures(name, ranges):
    found = _seed_ranges(name)
    assert {e["cells"]: (e["min"], e["max"]) for e in found} == ranges
    for exp in found:
        assert exp["source"].startswith("seed") and exp["batch_size"] == 1 and exp["metric"] == "output_tok_s"
        assert exp["device"]
    text = " ".join(e["source"] for e in found)
    if name == "rocm-awq":  # what the seed saw, next to what it expected
        assert "observed 28+ tok/s" in text and "observed 19.34 tok/s" in text


def test_seed_ranges_judge_only_the_gpu_they_were_written_for():
    import pandas as pd
    from cellbench import expectations

    points = pd.DataFrame(
        [
            _point("qwen3-8b-bf16-no_enforce_eager", "NVIDIA H200", 33.0),
            _point("qwen3-8b-bf16-no_enforce_eager", "AMD Instinct MI300X", 28.0),
        ]
    )
    cuda = expectations.verdicts(points, _seed_ranges("cuda-awq"))
    judged = [(r["cell_name"], r.get("measured")) for r in cuda if r["verdict"] != expectations.MISSING]
    assert judged == [("qwen3-8b-bf16-no_enforce_eager", 33.0)]  # the MI300X point is not judged by NVIDIA's
    rocm = expectations.verdicts(points, _seed_ranges("rocm-awq"))
    assert [r.get("measured") for r in rocm if r["verdict"] == expectations.PASS] == [28.0]


def test_cuda_study_tests_the_triton_awq_theory():
    cells = config.resolve(config.load_study(ROOT / "config" / "cuda-awq.yaml"))["cells"].values()
    triton = [c for c in cells if c["group"] == "qwen3-8b-awq-triton"]
    assert len(triton) == 2
    assert all(c["env"] == {"VLLM_USE_TRITON_AWQ": "1"} and c["quantization"] == "awq" for c in triton)
    text = (ROOT / "config" / "cuda-awq.yaml").read_text()
    assert "validate\n# config/rocm-awq.yaml" not in text and "Triton AWQ as vLLM picks it" not in text


def test_an_expectation_device_must_be_a_regex(rocm_study):
    rocm_study["expectations"][0]["device"] = "AMD("
    with pytest.raises(config.ConfigError, match=r"expectations\[0\].device: not a valid regex"):
        config.resolve(rocm_study)
