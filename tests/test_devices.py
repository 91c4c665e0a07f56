"""GPU discovery from a fake sysfs tree, and parsing of what vendor tools print. The samples in
tests/samples/ follow the tools' published output formats (rocminfo blocks with padded lines,
nvidia-smi --format=csv, hipcc --version); they were not captured on this project's machines,
which have no GPU."""

from pathlib import Path

import pytest
from cellbench import devices
from test_containers import fake_kfd

SAMPLES = Path(__file__).parent / "samples"


def test_rocm_gpus_follow_kfd_node_order_and_name_their_render_nodes(tmp_path):
    fake_kfd(tmp_path, [129, 128])
    gpus = devices.rocm_gpus(tmp_path)
    assert [(g.index, g.render_node, g.name) for g in gpus] == [
        (0, "/dev/dri/renderD129", "gfx1100"),
        (1, "/dev/dri/renderD128", "gfx1100"),
    ]
    assert len({g.key for g in gpus}) == 2


def test_rocm_gpus_on_a_machine_without_kfd(tmp_path):
    assert devices.rocm_gpus(tmp_path) == []


def test_rocm_gpu_without_render_minor_is_an_error(tmp_path):
    fake_kfd(tmp_path, [128])
    (tmp_path / devices.KFD_NODES / "1" / "properties").write_text("simd_count 192\n")
    with pytest.raises(devices.DeviceError, match="no drm_render_minor"):
        devices.rocm_gpus(tmp_path)


def test_allowed_gpus_by_index(tmp_path):
    fake_kfd(tmp_path, [128, 129, 130])
    gpus = devices.rocm_gpus(tmp_path)
    assert [g.index for g in devices.allowed(gpus, "0,2")] == [0, 2]
    assert devices.allowed(gpus, None) == gpus
    with pytest.raises(devices.DeviceError, match="no GPU with index 5"):
        devices.allowed(gpus, "5")
    with pytest.raises(devices.DeviceError, match="expected GPU indices"):
        devices.allowed(gpus, "gpu0")
    assert [g.index for g in devices.discover("rocm", {devices.GPUS_ENV: "1"}, tmp_path)] == [1]
    # In a Slurm job only the GPUs of its gres are used (CELLBENCH_GPUS still wins).
    assert [g.index for g in devices.discover("rocm", {"SLURM_JOB_GPUS": "0,2"}, tmp_path)] == [0, 2]
    assert [g.index for g in devices.discover("rocm", {"SLURM_JOB_GPUS": "0,2", devices.GPUS_ENV: "1"}, tmp_path)] == [
        1
    ]


def test_nvidia_gpu_listing():
    text = "0, GPU-1a2b, NVIDIA H100 80GB HBM3\n1, GPU-3c4d, NVIDIA H100 80GB HBM3\n"
    gpus = devices.parse_nvidia_gpus(text)
    assert [(g.index, g.key, g.name) for g in gpus] == [
        (0, "cuda-GPU-1a2b", "NVIDIA H100 80GB HBM3"),
        (1, "cuda-GPU-3c4d", "NVIDIA H100 80GB HBM3"),
    ]
    assert devices.parse_nvidia_gpus("NVIDIA-SMI has failed because it couldn't communicate with the driver") == []


def test_device_gids_are_numbers_of_the_nodes(tmp_path):
    node = tmp_path / "renderD128"
    node.write_text("")
    assert devices.device_gids([str(node)]) == [node.stat().st_gid]


def test_parse_rocminfo_gpu_agents():
    assert devices.parse_rocminfo((SAMPLES / "rocminfo-mi300x.txt").read_text()) == [
        {"arch": "gfx942", "name": "AMD Instinct MI300X"}
    ]
    assert devices.parse_rocminfo((SAMPLES / "rocminfo-rx7900.txt").read_text()) == [
        {"arch": "gfx1100", "name": "Radeon RX 7900 XTX"},
        {"arch": "gfx1036", "name": "AMD Radeon Graphics"},
    ]
    assert devices.parse_rocminfo("") == []


def test_gpu_summary_from_what_the_container_captured():
    rocm = devices.gpu_summary(
        {
            "rocminfo": (SAMPLES / "rocminfo-mi300x.txt").read_text(),
            "hipcc": (SAMPLES / "hipcc-version.txt").read_text(),
            "torch": {"hip": "7.2.26015", "cuda": None},
        }
    )
    assert rocm["device_name"] == "AMD Instinct MI300X" and rocm["arch"] == "gfx942"
    assert rocm["hip_version"] == "7.2.26015-fc0010cf6a" and rocm["torch_hip"] == "7.2.26015"
    cuda = devices.gpu_summary({"nvidia_smi": (SAMPLES / "nvidia-smi-query.csv").read_text()})
    assert cuda["device_name"] == "NVIDIA H100 80GB HBM3" and cuda["driver"] == "580.65.06"
    assert len(cuda["gpus"]) == 2
    # torch's own answer wins over the tools' (it is the device the engine used).
    named = devices.gpu_summary({"torch": {"device_name": "AMD Radeon AI PRO R9700", "arch": "gfx1201"}})
    assert named == {"device_name": "AMD Radeon AI PRO R9700", "arch": "gfx1201"}
    assert devices.gpu_summary({}) == {}


# What a real NVIDIA H200 (driver 580.159.04, torch 2.11) gave (issue 19).
H200_SMI = "name, driver_version, memory.total [MiB]\nNVIDIA H200, 580.159.04, 143771 MiB\n"


def test_nvidia_smi_csv_of_a_real_h200():
    assert devices.parse_nvidia_smi_csv(H200_SMI) == [
        {"name": "NVIDIA H200", "driver_version": "580.159.04", "memory.total": "143771 MiB"}
    ]
    summary = devices.gpu_summary({"nvidia_smi": H200_SMI})
    assert summary["device_name"] == "NVIDIA H200" and summary["driver"] == "580.159.04"
    # bench_cell.py asks for compute_cap too; the same H200 answered so (2026-12-01).
    with_cap = "name, driver_version, memory.total [MiB], compute_cap\nNVIDIA H200, 580.159.04, 143771 MiB, 9.0\n"
    assert devices.gpu_summary({"nvidia_smi": with_cap})["arch"] == "sm_90"


def test_a_device_name_recorded_as_arch_is_no_arch():
    """Cells recorded before issue 19 on CUDA hold torch's gcnArchName, the device name."""
    old = devices.gpu_summary({"torch": {"device_name": "NVIDIA H200", "arch": "NVIDIA H200", "cuda": "12.9"}})
    assert "arch" not in old
    assert devices.gpu_summary({"torch": {"arch": "sm_90"}})["arch"] == "sm_90"


class _Props:
    def __init__(self, name, gcn, major, minor):
        self.name, self.gcnArchName, self.major, self.minor = name, gcn, major, minor


def test_torch_arch_is_gfx_on_rocm_and_compute_capability_on_cuda(bench):
    # torch 2.11 on an H200: gcnArchName repeats the device name on CUDA builds.
    assert bench.gpu_arch(_Props("NVIDIA H200", "NVIDIA H200", 9, 0), None) == "sm_90"
    assert bench.gpu_arch(_Props("AMD Instinct MI300X", "gfx942:sramecc+:xnack-", 9, 4), "7.2.26015") == "gfx942"
