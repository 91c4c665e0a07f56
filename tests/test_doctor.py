"""`cellbench doctor` judgements from made-up facts, and one real run on this machine."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cellbench import config, doctor

ROOT = Path(__file__).resolve().parents[1]

NO_GPU = {
    "uid": 0,
    "groups": {0: "root"},
    "docker_client": "28.2.2",
    "docker_server": "20.10.24",
    "docker_error": None,
    "runtimes": ["runc"],
    "default_runtime": "runc",
    "disk_path": "/var/lib/docker",
    "disk_free_gb": 60.0,
    "kfd": False,
    "render_nodes": [],
    "rocm_gpus": [],
    "cuda_gpus": [],
    "tools": {"rocm-smi": None, "rocminfo": None, "nvidia-smi": None},
    "images": {"cpu": {"base": "cellbench/base:bookworm", "base_present": True}},
    "models": {},
    "hub_dir": "/root/.cache/huggingface/hub",
}
AMD_BOX = {
    **NO_GPU,
    "kfd": True,
    "render_nodes": ["/dev/dri/renderD128"],
    "rocm_gpus": ["gfx1100"],
    "tools": {"rocm-smi": "/opt/rocm/bin/rocm-smi", "rocminfo": "/opt/rocm/bin/rocminfo", "nvidia-smi": None},
    "images": {"rocm": {"base": "vllm/vllm-openai-rocm:v0.31.0", "base_present": True}},
    "models": {
        name: {"commit": "a" * 40}
        for name in ("qwen3-8b", "qwen3-8b-awq", "qwen2.5-7b-instruct-gptq-int4", "qwen2.5-7b-instruct")
    },
}


def _judge(facts, path):
    study = config.load_study(ROOT / path)
    cells = list(config.resolve(study)["cells"].values())
    lines = doctor.machine_checks(facts) + doctor.study_checks(facts, study, cells)
    return lines, doctor.verdict(path, lines)


def test_no_gpu_machine_runs_the_cpu_study_only():
    lines, final = _judge(NO_GPU, "config/config.yaml")
    assert final.mark == doctor.OK
    text = doctor.report(lines)
    assert "GPU: none on this machine (no /dev/kfd, no /dev/dri, no nvidia-smi); only cpu studies can run" in text
    lines, final = _judge(NO_GPU, "config/rocm-awq.yaml")
    assert final.mark == doctor.FAIL
    text = doctor.report(lines)
    assert "❌ device rocm: cells need 1 AMD (ROCm) GPU(s), this machine has 0 (no /dev/kfd)" in text
    assert "❌ model qwen3-8b: Qwen/Qwen3-8B not in /root/.cache/huggingface/hub" in text


def test_amd_box_with_cached_models_runs_the_seed_study():
    lines, final = _judge(AMD_BOX, "config/rocm-awq.yaml")
    assert final.mark == doctor.OK, doctor.report(lines)
    facts = copy.deepcopy(AMD_BOX)
    facts["images"]["rocm"]["base_present"] = False
    lines, final = _judge(facts, "config/rocm-awq.yaml")
    assert final.mark == doctor.OK  # the pull is tried at build time: a warning, not a blocker
    assert any(c.mark == doctor.WARN and "docker pull" in c.text for c in lines)
    facts["disk_free_gb"] = 10
    lines, final = _judge(facts, "config/rocm-awq.yaml")
    assert final.mark == doctor.FAIL
    assert "❌ disk: 10 GB free under /var/lib/docker, images need ~30" in doctor.report(lines)


def test_non_root_user_is_told_which_groups_are_missing():
    facts = {**AMD_BOX, "uid": 1000, "groups": {1000: "me", 44: "video"}}
    text = doctor.report(doctor.machine_checks(facts))
    assert "not in docker, render (sudo usermod -aG docker,render $USER)" in text


def test_cuda_needs_the_nvidia_runtime():
    facts = {**NO_GPU, "cuda_gpus": ["NVIDIA H100"], "tools": {**NO_GPU["tools"], "nvidia-smi": "/usr/bin/nvidia-smi"}}
    facts["models"] = AMD_BOX["models"]
    facts["images"] = {"cuda": {"base": "vllm/vllm-openai:v0.31.0", "base_present": True}}
    lines, final = _judge(facts, "config/cuda-awq.yaml")
    assert final.mark == doctor.FAIL
    assert "❌ docker runtime: no nvidia runtime; install the NVIDIA Container Toolkit" in doctor.report(lines)
    lines, final = _judge({**facts, "runtimes": ["nvidia", "runc"]}, "config/cuda-awq.yaml")
    assert final.mark == doctor.OK


def test_no_docker_daemon_blocks_every_study():
    lines, final = _judge({**NO_GPU, "docker_server": None, "docker_error": "Cannot connect"}, "config/config.yaml")
    assert final.mark == doctor.FAIL
    assert "❌ docker: no daemon answers (Cannot connect); run scripts/setup.sh" in doctor.report(lines)


@pytest.mark.skipif(os.path.exists("/dev/kfd") or os.path.exists("/dev/nvidiactl"), reason="a GPU machine")
def test_doctor_on_this_machine_without_gpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    argv = [sys.executable, "-m", "cellbench.cli", "doctor", "--configfile"]
    cpu = subprocess.run([*argv, "config/config.yaml"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "GPU: none on this machine" in cpu.stdout
    if "❌ docker" in cpu.stdout:  # unit tests may run where no Docker daemon was started
        assert cpu.returncode == 1
    else:
        assert cpu.returncode == 0 and "✅ config/config.yaml can run here" in cpu.stdout
    rocm = subprocess.run([*argv, "config/rocm-awq.yaml"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert rocm.returncode == 1
    assert "❌ device rocm" in rocm.stdout and "❌ config/rocm-awq.yaml cannot run here" in rocm.stdout
