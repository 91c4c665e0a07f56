"""Serve mode records the server process's environment, not the client's (issue 19 item 3): the
server runs under a wrapper that writes its os.environ as it changes, so a variable the platform
sets at runtime (RocmPlatform.verify_quantization: VLLM_USE_TRITON_AWQ=1) is seen."""

import json
import os
import subprocess

from cellbench import effective

# A stand-in for vLLM's server module: sets a variable in os.environ after start, as vLLM's ROCm
# platform does for every quantized model, then serves a while.
FAKE_SERVER = """
import os, sys, time
os.environ["VLLM_USE_TRITON_AWQ"] = "1"
os.environ["HF_TOKEN"] = "hf_not_recorded"
print("args", sys.argv[1:], flush=True)
time.sleep(1.5)
"""


def test_the_wrapper_records_what_the_server_process_set_at_runtime(tmp_path, bench):
    (tmp_path / "fake_vllm_server.py").write_text(FAKE_SERVER)
    out = tmp_path / "server-env.json"
    argv = bench.server_env_argv(str(out), {"VLLM_USE_TRITON_AWQ": "0"}, "fake_vllm_server", ["--port", "8000"])
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "VLLM_USE_TRITON_AWQ": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "args ['--port', '8000']" in done.stdout  # the module ran as `python -m` runs it
    recorded = json.loads(out.read_text())
    assert recorded["VLLM_USE_TRITON_AWQ"] == "1"  # the client still has 0
    assert "HF_TOKEN" not in recorded


def _server(bench, env_file):
    server = bench.VllmServer.__new__(bench.VllmServer)  # no real server: only effective() is asked
    server.log, server.env_file = ["INFO dtype=torch.float16, quantization=awq, enforce_eager=False\n"], env_file
    return server


def test_serve_effective_env_comes_from_the_server_or_is_unknown(tmp_path, monkeypatch, bench):
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setenv("VLLM_USE_TRITON_AWQ", "0")  # the client's: never reported
    env_file = tmp_path / "server-env.json"
    env_file.write_text(json.dumps({"VLLM_USE_TRITON_AWQ": "1"}))
    used = _server(bench, str(env_file)).effective()
    assert {"engine", "engine_args", "env"} <= set(used) and used["env"] == {"VLLM_USE_TRITON_AWQ": "1"}
    cell = {
        "engine": "vllm",
        "dtype": "auto",
        "quantization": "awq",
        "engine_args": {},
        "env": {"VLLM_USE_TRITON_AWQ": "0"},
    }
    assert effective.overrides(cell, used) == [
        {"setting": "env.VLLM_USE_TRITON_AWQ", "requested": "0", "effective": "1"}
    ]
    # No file from the server: unknown, so no override is claimed and no "same as" either.
    unknown = _server(bench, str(tmp_path / "missing.json")).effective()
    assert unknown["env"] is None and "env" in unknown
    assert effective.overrides(cell, unknown) == []
    assert effective.engine_set_env({"VLLM_USE_TRITON_AWQ": "0"}, None) == {}
    assert effective.identity(cell, unknown, ["env.VLLM_USE_TRITON_AWQ"]) is None


def test_selected_env_keeps_the_runtime_prefixes_of_issue_19(bench):
    environ = {
        "HSA_ENABLE_IPC_MODE_LEGACY": "1", "HIP_FORCE_DEV_KERNARG": "1", "ROCR_VISIBLE_DEVICES": "0",
        "PYTORCH_TUNABLEOP_ENABLED": "1", "TRITON_CACHE_DIR": "/tmp/t", "NCCL_DEBUG": "INFO",
        "RCCL_MSCCL_ENABLE": "0", "NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0",
        "PATH": "/usr/bin", "NCCL_AUTH_TOKEN": "x",
    }  # fmt: skip
    kept = bench.selected_env((), environ)
    assert set(kept) == set(environ) - {"PATH", "NCCL_AUTH_TOKEN"}  # secrets never, whatever the prefix
