"""Golden `docker run` command lines per device kind. Regenerate after a deliberate change with
CELLBENCH_UPDATE_GOLDEN=1 pytest tests/test_containers.py, then read the diff."""

import os
from pathlib import Path

import pytest
from cellbench import config, containers

GOLDEN = Path(__file__).parent / "golden"
ENVIRON = {"HF_TOKEN": "hf_secret_value", "PATH": "/usr/bin", "MY_API_KEY": "k"}


def _cell(study, device, **settings):
    study["images"][device] = {"context": f"containers/{device}", "device": device}
    study["defaults"].update(image=device, **settings)
    return config.expand_cells(study)[0]


CASES = {
    "cpu": dict(device="cpu", gpus=[], resources={"cpus": "0-1", "memory": "12g", "shm_size": "2g"}),
    "rocm": dict(device="rocm", gpus=[1], resources={"shm_size": "16g", "gpus": 1}),
    "rocm-tp2": dict(device="rocm", gpus=[2, 3], resources={"shm_size": "16g", "gpus": 2}),
    "cuda": dict(device="cuda", gpus=[0], resources={"shm_size": "8g", "gpus": 1}),
    "cuda-tp2": dict(device="cuda", gpus=[0, 1], resources={"shm_size": "8g", "gpus": 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_docker_run_golden(study, case):
    spec = CASES[case]
    cell = _cell(study, spec["device"], resources=spec["resources"], env={"VLLM_USE_TRITON_AWQ": "0"})
    argv = containers.docker_run_command(
        cell,
        run_id="RUN",
        image_ref="sha256:IMAGE",
        model_dir="/models/m",
        out_dir="/results/cells/x/.run-RUN",
        scripts_dir="/repo/scripts",
        gpus=spec["gpus"],
        render_nodes=[f"/dev/dri/renderD{128 + g}" for g in spec["gpus"]] if spec["device"] == "rocm" else [],
        environ=ENVIRON,
        origin="/work/study",
    )
    text = "\n".join(argv).replace(cell["id"], "<cell_id>") + "\n"
    golden = GOLDEN / f"docker-run-{case}.txt"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert "hf_secret_value" not in text  # secrets travel by name only
    assert "HF_TOKEN" in argv


def test_gpu_kinds_need_gpus_and_cpu_refuses_them(study):
    with pytest.raises(ValueError, match="needs at least one GPU"):
        containers.device_flags("rocm", [], [])
    with pytest.raises(ValueError, match="cannot be given GPUs"):
        containers.device_flags("cpu", [0], [])
    with pytest.raises(ValueError, match="unknown device kind"):
        containers.device_flags("tpu", [0], [])


def test_rocm_visible_devices_agree():
    flags = containers.device_flags("rocm", [4, 5], ["/dev/dri/renderD132", "/dev/dri/renderD133"])
    assert "HIP_VISIBLE_DEVICES=0,1" in flags and "CUDA_VISIBLE_DEVICES=0,1" in flags
    assert flags.count("--device") == 3  # kfd + one render node per GPU


def test_podman_run_golden(study):
    """podman takes the same command line; only the program differs (CELLBENCH_RUNTIME=podman)."""
    spec = CASES["cpu"]
    cell = _cell(study, "cpu", resources=spec["resources"], env={"VLLM_USE_TRITON_AWQ": "0"})
    common = dict(run_id="RUN", image_ref="sha256:IMAGE", model_dir="/models/m", out_dir="/results/cells/x/.run-RUN",
                  scripts_dir="/repo/scripts", environ=ENVIRON, origin="/work/study")  # fmt: skip
    argv = containers.docker_run_command(cell, runtime="podman", **common)
    text = "\n".join(argv).replace(cell["id"], "<cell_id>") + "\n"
    golden = GOLDEN / "podman-run-cpu.txt"
    if os.environ.get("CELLBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert argv[1:] == containers.docker_run_command(cell, **common)[1:]
