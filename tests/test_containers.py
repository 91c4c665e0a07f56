"""Golden `docker run` command lines per device kind. Regenerate after a deliberate change with
CELLBENCH_UPDATE_GOLDEN=1 pytest tests/test_containers.py, then read the diff."""

import os
from pathlib import Path

import pytest
from cellbench import config, containers, devices

GOLDEN = Path(__file__).parent / "golden"
ENVIRON = {"HF_TOKEN": "hf_secret_value", "PATH": "/usr/bin", "MY_API_KEY": "k"}


def _cell(study, device, **settings):
    study["images"][device] = {"context": f"containers/{device}", "device": device}
    study["defaults"].update(image=device, **settings)
    return config.expand_cells(study)[0]


def fake_kfd(root: Path, minors: list[int]) -> None:
    """A KFD topology like a host with one CPU node and a GPU per render minor, in node order."""
    nodes = root / devices.KFD_NODES
    for node, minor in enumerate([None, *minors]):
        (nodes / str(node)).mkdir(parents=True)
        (nodes / str(node) / "gpu_id").write_text("0\n" if minor is None else f"{4000 + node}\n")
        (nodes / str(node) / "name").write_text("" if minor is None else "gfx1100\n")
        props = "cpu_cores_count 16\nsimd_count 0\n" if minor is None else f"simd_count 192\ndrm_render_minor {minor}\n"
        (nodes / str(node) / "properties").write_text(props)


# Render minors need not follow GPU indices: here a display card holds renderD128.
RENDER_MINORS = [129, 130, 131, 128]
# podman's own GPU flags (CDI names for NVIDIA, keep-groups); its cpu line is test_podman_run_golden.
PODMAN_CASES = ["rocm", "cuda", "cuda-tp2"]
CASES = {
    "cpu": dict(device="cpu", gpus=[], resources={"cpus": "0-1", "memory": "12g", "shm_size": "2g"}),
    "rocm": dict(device="rocm", gpus=[1], resources={"shm_size": "16g", "gpus": 1}),
    "rocm-tp2": dict(device="rocm", gpus=[2, 3], resources={"shm_size": "16g", "gpus": 2}),
    "cuda": dict(device="cuda", gpus=[0], resources={"shm_size": "8g", "gpus": 1}),
    "cuda-tp2": dict(device="cuda", gpus=[0, 1], resources={"shm_size": "8g", "gpus": 2}),
}


def _gpus(device: str, indices: list[int], tmp_path: Path) -> list[devices.Gpu]:
    if device == "rocm":
        fake_kfd(tmp_path, RENDER_MINORS)
        return [gpu for gpu in devices.rocm_gpus(tmp_path) if gpu.index in indices]
    return [devices.Gpu(i, f"cuda-GPU-{i}", "NVIDIA H100") for i in indices]


@pytest.mark.parametrize(
    "runtime, case", [("docker", c) for c in sorted(CASES)] + [("podman", c) for c in PODMAN_CASES]
)
def test_docker_run_golden(study, runtime, case, tmp_path):
    spec = CASES[case]
    cell = _cell(study, spec["device"], resources=spec["resources"], env={"VLLM_USE_TRITON_AWQ": "0"})
    if spec["gpus"]:
        cell["engine_args"]["tensor_parallel_size"] = len(spec["gpus"])
    argv = containers.docker_run_command(
        cell,
        run_id="RUN",
        image_ref="sha256:IMAGE",
        model_dir="/models/m",
        out_dir="/results/cells/x/.run-RUN",
        scripts_dir="/repo/scripts",
        contract_file="/repo/workflow/cellbench/contract.py",
        gpus=_gpus(spec["device"], spec["gpus"], tmp_path),
        group_ids=[44, 992] if spec["device"] == "rocm" else None,  # the host's video and render
        environ=ENVIRON,
        origin="/work/study",
        user=containers.CONTAINER_USER,  # as the runner starts every cell
        runtime=runtime,
    )
    text = "\n".join(argv).replace(cell["id"], "<cell_id>") + "\n"
    golden = GOLDEN / f"{runtime}-run-{case}.txt"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert "hf_secret_value" not in text  # secrets travel by name only
    assert "HF_TOKEN" in argv
    # --ipc host shares the host's /dev/shm: docker ignores --shm-size then, so it is not passed.
    assert ("--shm-size" in argv) == (spec["device"] == "cpu")
    if runtime == "podman":  # podman reads --gpus as CDI names: device=0 would be invalid
        assert "--gpus" not in argv and not any("device=" in a for a in argv)


AMD = [
    devices.Gpu(4, "rocm-renderD132", "gfx942", "/dev/dri/renderD132"),
    devices.Gpu(5, "rocm-renderD133", "gfx942", "/dev/dri/renderD133"),
]


def test_gpu_kinds_need_gpus_and_cpu_refuses_them(study):
    with pytest.raises(ValueError, match="needs at least one GPU"):
        containers.device_flags("rocm", [], [44])
    with pytest.raises(ValueError, match="cannot be given GPUs"):
        containers.device_flags("cpu", AMD[:1])
    with pytest.raises(ValueError, match="unknown device kind"):
        containers.device_flags("tpu", AMD[:1])
    with pytest.raises(ValueError, match="group ids"):
        containers.device_flags("rocm", AMD, [])
    with pytest.raises(ValueError, match="no render node"):
        containers.device_flags("rocm", [devices.Gpu(0, "x", "gfx942")], [44])


def test_rocm_flags_follow_the_issue():
    flags = containers.device_flags("rocm", AMD, [44, 992])
    assert "HIP_VISIBLE_DEVICES=0,1" in flags and "CUDA_VISIBLE_DEVICES=0,1" in flags
    assert [flags[i + 1] for i, f in enumerate(flags) if f == "--device"] == [
        "/dev/kfd", "/dev/dri/renderD132", "/dev/dri/renderD133",
    ]  # fmt: skip
    assert [flags[i + 1] for i, f in enumerate(flags) if f == "--group-add"] == ["44", "992"]
    assert flags[flags.index("--ipc") + 1] == "host"
    assert flags[flags.index("--security-opt") + 1] == "seccomp=unconfined"


def test_cuda_gpus_are_one_csv_field():
    flags = containers.device_flags("cuda", [devices.Gpu(2, "a", "x"), devices.Gpu(3, "b", "x")])
    assert flags[:2] == ["--gpus", '"device=2,3"']  # docker splits --gpus on commas outside quotes
    assert "CUDA_VISIBLE_DEVICES=0,1" in flags


def test_podman_gpus_are_cdi_devices_with_the_callers_groups():
    flags = containers.device_flags(
        "cuda", [devices.Gpu(2, "cuda-GPU-aa", "x"), devices.Gpu(3, "b", "x")], None, "podman"
    )
    assert [flags[i + 1] for i, f in enumerate(flags) if f == "--device"] == [
        "nvidia.com/gpu=GPU-aa",
        "nvidia.com/gpu=3",
    ]
    assert flags[flags.index("--group-add") + 1] == "keep-groups" and "CUDA_VISIBLE_DEVICES=0,1" in flags
    rocm = containers.device_flags("rocm", AMD, None, "podman")  # no numeric groups: podman takes keep-groups alone
    assert [rocm[i + 1] for i, f in enumerate(rocm) if f == "--group-add"] == ["keep-groups"]
    assert "/dev/dri/renderD133" in rocm


def test_podman_run_golden(study):
    """podman takes the same command line; only the program differs (CELLBENCH_RUNTIME=podman)."""
    spec = CASES["cpu"]
    cell = _cell(study, "cpu", resources=spec["resources"], env={"VLLM_USE_TRITON_AWQ": "0"})
    common = dict(run_id="RUN", image_ref="sha256:IMAGE", model_dir="/models/m", out_dir="/results/cells/x/.run-RUN",
                  scripts_dir="/repo/scripts", contract_file="/repo/workflow/cellbench/contract.py",
                  environ=ENVIRON, origin="/work/study")  # fmt: skip
    argv = containers.docker_run_command(cell, runtime="podman", **common)
    text = "\n".join(argv).replace(cell["id"], "<cell_id>") + "\n"
    golden = GOLDEN / "podman-run-cpu.txt"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert argv[1:] == containers.docker_run_command(cell, **common)[1:]
