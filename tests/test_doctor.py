"""`cellbench doctor` judgements from made-up facts, and one real run on this machine."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cellbench import config, devices, doctor
from test_containers import fake_kfd

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
    return lines, doctor.conclusion(path, lines)


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


# The real H200 host of issue 19: driver 580.159.04, the toolkit's hook on PATH, no runtime
# named nvidia, the user not in video/render (NVIDIA device nodes need neither).
H200_SMI = "name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.159.04, 143771 MiB\n"
H200_BOX = {
    **NO_GPU,
    "uid": 1000,
    "groups": {1000: "me", 999: "docker"},
    "runtimes": ["io.containerd.runc.v2", "runc"],
    "cuda_gpus": [devices.parse_nvidia_gpus("0, GPU-5f1e, NVIDIA H200\n")[0].name],
    "nvidia_driver": devices.parse_nvidia_smi_csv(H200_SMI)[0]["driver_version"],
    "cdi_specs": [],
    "tools": {
        **NO_GPU["tools"],
        "nvidia-smi": "/usr/bin/nvidia-smi",
        "nvidia-container-runtime-hook": "/usr/bin/nvidia-container-runtime-hook",
    },
    "images": {"cuda": {"base": "vllm/vllm-openai:v0.31.0", "base_present": True}},
    "models": AMD_BOX["models"],
}


def test_h200_with_the_toolkit_hook_can_run_the_cuda_study():
    lines, final = _judge(H200_BOX, "config/cuda-awq.yaml")
    text = doctor.report(lines)
    assert final.mark == doctor.OK, text
    assert "✅ NVIDIA containers: docker --gpus can use nvidia-container-runtime-hook on PATH" in text
    assert "✅ GPU: 1 found: NVIDIA H200" in text  # the vendor once
    assert "✅ NVIDIA driver: 580.159.04 (image cuda needs >= 580)" in text
    assert "✅ groups: docker, me: ok" in text  # no video/render on an NVIDIA-only host
    # A CDI spec alone also serves (docker with CDI, podman).
    facts = {**H200_BOX, "tools": {**H200_BOX["tools"], "nvidia-container-runtime-hook": None}}
    lines, final = _judge({**facts, "cdi_specs": ["/etc/cdi/nvidia.yaml"]}, "config/cuda-awq.yaml")
    assert final.mark == doctor.OK and "CDI spec /etc/cdi/nvidia.yaml" in doctor.report(lines)


def test_cuda_without_toolkit_or_cdi_cannot_run():
    facts = {**H200_BOX, "tools": {**H200_BOX["tools"], "nvidia-container-runtime-hook": None}}
    lines, final = _judge(facts, "config/cuda-awq.yaml")
    assert final.mark == doctor.FAIL
    assert "❌ NVIDIA containers: docker --gpus needs the NVIDIA Container Toolkit" in doctor.report(lines)
    # podman needs a CDI spec even where the hook exists.
    lines, final = _judge({**H200_BOX, "runtime": "podman"}, "config/cuda-awq.yaml")
    assert final.mark == doctor.FAIL and "nvidia-ctk cdi generate" in doctor.report(lines)


def test_an_old_driver_for_the_cuda_image_warns():
    lines, _ = _judge({**H200_BOX, "nvidia_driver": "550.54.15"}, "config/cuda-awq.yaml")
    assert "⚠️ NVIDIA driver: 550.54.15 is older than image cuda (vllm/vllm-openai:v0.31.0, CUDA 13) needs (>= 580)" in (
        doctor.report(lines)
    )
    facts = {
        **H200_BOX,
        "nvidia_driver": "550.54.15",
        "images": {"cuda": {"base": "vllm/vllm-openai:v0.31.0-cu129", "base_present": True}},
    }
    lines, _ = _judge(facts, "config/cuda-awq.yaml")
    assert "✅ NVIDIA driver: 550.54.15 (image cuda needs >= 525)" in doctor.report(lines)


def test_amd_groups_are_still_asked_for_on_an_amd_host():
    text = doctor.report(doctor.machine_checks({**AMD_BOX, "uid": 1000, "groups": {1000: "me", 999: "docker"}}))
    assert "not in video, render" in text


def test_device_errors_are_check_lines_not_tracebacks(tmp_path):
    fake_kfd(tmp_path, [128])
    (tmp_path / devices.KFD_NODES / "1" / "properties").write_text("simd_count 192\n")
    found = doctor.gather_gpus({}, str(tmp_path))
    assert found["rocm_gpus"] == [] and "no drm_render_minor" in found["device_errors"][0]
    fake_kfd(tmp_path / "b", [128])
    found = doctor.gather_gpus({devices.GPUS_ENV: "3"}, str(tmp_path / "b"))
    assert found["rocm_gpus"] == ["gfx1100"] and "no GPU with index 3" in found["device_errors"][0]
    text = doctor.report(doctor.machine_checks({**AMD_BOX, **found}))
    assert "❌ GPU discovery: CELLBENCH_GPUS='3': no GPU with index 3 on this machine" in text


def test_cdi_specs_naming_nvidia_gpus(tmp_path):
    (tmp_path / "etc/cdi").mkdir(parents=True)
    (tmp_path / "etc/cdi/nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    (tmp_path / "etc/cdi/other.yaml").write_text("kind: vendor.com/thing\n")
    assert doctor.cdi_specs(str(tmp_path)) == ["/etc/cdi/nvidia.yaml"]


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


# Measurement stability: a fake /proc and /sys under tmp_path, two /proc/stat samples, fake `docker ps`.
CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7763\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7763\n"
MEMINFO = "MemTotal:       16777216 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n"
STAT = "cpu  {user} 0 100 {idle} 0 0 0 {steal} 0 0\ncpu0 1 0 1 1 0 0 0 0 0 0\n"


def _stability(tmp_path, *, load="0.40", steal=(0, 0), governors=(), swap_kb=(0, 0), meminfo=MEMINFO, ps=(0, "")):
    """Stability facts read from a fake root; the second /proc/stat appears while the sampler waits."""
    for rel, text in {"proc/cpuinfo": CPUINFO, "proc/loadavg": f"{load} 0.30 0.20 1/200 4242\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    swap = f"SwapTotal:      {swap_kb[0]} kB\nSwapFree:       {swap_kb[1]} kB\n"
    (tmp_path / "proc/meminfo").write_text(meminfo + swap)
    (tmp_path / "proc/stat").write_text(STAT.format(user=1000, idle=5000, steal=steal[0]))
    for cpu, name in enumerate(governors):
        path = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"
        path.parent.mkdir(parents=True)
        path.write_text(name + "\n")
    # 200 jiffies pass between the samples: user 100, idle 100 - steal, steal `steal[1] - steal[0]`.
    later = STAT.format(user=1100, idle=5100 - (steal[1] - steal[0]), steal=steal[1])
    facts = doctor.gather_stability(
        str(tmp_path), wait=lambda: (tmp_path / "proc/stat").write_text(later), docker_ps=lambda: ps
    )
    return doctor.report(doctor.stability_checks(facts)).splitlines()


def test_quiet_host_is_fine(tmp_path):
    lines = _stability(tmp_path, governors=("performance", "performance"))
    assert lines == [
        "✅ CPU: AMD EPYC 7763, 2 cores",
        "✅ running containers: none",
        "✅ host load: 0.40 on 2 cores (1-minute average)",
        "✅ CPU steal: 0.0 % of CPU time over 0.5 s",
        "✅ CPU frequency governor: performance on 2 CPUs",
        "✅ swap: none in use, 8.0 GB memory available",
    ]


def test_other_containers_are_named_and_ours_told_apart(tmp_path):
    ours = "cellbench-cpu-llamacpp-r1\tcpu-llamacpp\n"
    others = "".join(f"c{i}\t\n" for i in range(7))
    lines = _stability(tmp_path, ps=(0, ours + others))
    assert lines[1] == (
        "⚠️ running containers: 7 other than cellbench's, competing for CPU: c0, c1, c2, c3, c4 and 2 more; "
        "stop them before measuring; also 1 cellbench cell(s): cellbench-cpu-llamacpp-r1"
    )
    lines = _stability(tmp_path, ps=(0, ours))
    assert lines[1] == (
        "✅ running containers: only cellbench cells: cellbench-cpu-llamacpp-r1 "
        "(a study is running; if not, 'cellbench clean --containers')"
    )
    lines = _stability(tmp_path, ps=(1, "Cannot connect to the Docker daemon"))
    assert lines[1] == "⚠️ running containers: not checked (Cannot connect to the Docker daemon)"


def test_busy_host_warns(tmp_path):
    assert _stability(tmp_path, load="1.00")[2] == "✅ host load: 1.00 on 2 cores (1-minute average)"
    assert _stability(tmp_path, load="1.37")[2] == (
        "⚠️ host load: other work is running: 1.37 on 2 cores; "
        "figures will be lower and noisier; quiet the host or add rounds"
    )


def test_steal_time_over_two_percent_warns(tmp_path):
    # 4 of 200 jiffies is 2 %: still fine; 10 of 200 is not.
    assert _stability(tmp_path, steal=(50, 54))[3] == "✅ CPU steal: 2.0 % of CPU time over 0.5 s"
    assert _stability(tmp_path, steal=(50, 60))[3] == (
        "⚠️ CPU steal: 5.0 % of CPU time went to this VM's neighbours; "
        "figures will move with their load; use a dedicated host or add rounds"
    )


def test_governor_other_than_performance_warns_and_turbo_is_reported(tmp_path):
    assert _stability(tmp_path)[4] == "✅ CPU frequency governor: not readable (a VM usually hides it)"
    lines = _stability(tmp_path / "a", governors=("performance", "powersave"))
    assert lines[4] == (
        "⚠️ CPU frequency governor: performance on 1 of 2 CPUs, powersave on 1 of 2 CPUs; "
        "frequency scaling moves figures between runs: cpupower frequency-set -g performance"
    )
    (tmp_path / "b/sys/devices/system/cpu/intel_pstate").mkdir(parents=True)
    (tmp_path / "b/sys/devices/system/cpu/intel_pstate/no_turbo").write_text("1\n")
    lines = _stability(tmp_path / "b", governors=("performance",))
    assert lines[4:6] == [
        "✅ CPU frequency governor: performance on 1 CPU",
        "✅ CPU turbo boost: off (keep it the same on machines you compare)",
    ]
    (tmp_path / "c/sys/devices/system/cpu/cpufreq").mkdir(parents=True)
    (tmp_path / "c/sys/devices/system/cpu/cpufreq/boost").write_text("1\n")
    assert _stability(tmp_path / "c")[5] == "✅ CPU turbo boost: on (keep it the same on machines you compare)"


def test_swap_in_use_warns_only_when_memory_is_short(tmp_path):
    # 1 GiB of swap in use with half the memory available: worth a line, not a warning.
    assert _stability(tmp_path, swap_kb=(2097152, 1048576))[-1] == "✅ swap: 1.0 GB in use, 8.0 GB memory available"
    short = MEMINFO.replace("8388608", "1048576")
    assert _stability(tmp_path, swap_kb=(2097152, 1048576), meminfo=short)[-1] == (
        "⚠️ swap: 1.0 GB in use and only 1.0 GB of 16.0 GB memory available; "
        "paging stalls the engine; free memory before measuring"
    )


def test_stability_never_blocks_and_unreadable_files_are_said_so(tmp_path):
    facts = doctor.gather_stability(str(tmp_path), wait=lambda: None, docker_ps=lambda: (0, ""))
    lines = doctor.stability_checks(facts)
    assert all(c.mark != doctor.FAIL for c in lines)
    assert doctor.report(lines).splitlines() == [
        "✅ CPU: model not listed in /proc/cpuinfo, unknown number of cores",
        "✅ running containers: none",
        "✅ host load: /proc/loadavg not readable",
        "✅ CPU steal: /proc/stat not readable",
        "✅ CPU frequency governor: not readable (a VM usually hides it)",
        "✅ swap: /proc/meminfo not readable",
    ]


def test_disk_need_counts_the_cuda_image_at_its_unpacked_size():
    """vllm/vllm-openai's cu129 variant is about 26 GB unpacked (issue 19); 20 GB underestimated it."""
    facts = {**H200_BOX, "images": {"cuda": {"base": "vllm/vllm-openai:v0.31.0", "base_present": False}}}
    lines, final = _judge({**facts, "disk_free_gb": 24}, "config/cuda-awq.yaml")
    assert final.mark == doctor.FAIL and "❌ disk: 24 GB free under /var/lib/docker, images need ~28" in doctor.report(
        lines
    )
