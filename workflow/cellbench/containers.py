"""`docker run` command lines, built as data from a cell and its device kind.

Everything here is pure: the same cell, run id and paths give the same argv, which the golden
tests pin per device kind.
"""

from __future__ import annotations

import os

from . import contract, devices

CONTAINER_PREFIX = "cellbench-"
LABEL_CELL = "cellbench.cell"
LABEL_RUN = "cellbench.run"
LABEL_ORIGIN = "cellbench.origin"  # the working directory whose results/ the container writes
MOUNT_MODEL, MOUNT_OUT, MOUNT_SCRIPTS = "/model", "/out", "/cellbench"
RUNTIME_FAILED = 125  # `docker run` exit code when docker itself failed, before the command ran
# The engine runs as nobody:nogroup. vLLM on CPU runs so (tested); it needs a writable HOME for
# its caches and a user name for torch's cache paths, neither of which nobody has.
CONTAINER_USER = "65534:65534"


def container_name(cell_id: str, run_id: str) -> str:
    """Deterministic for a run; the run id keeps two checkouts running the same cell apart."""
    return f"{CONTAINER_PREFIX}{cell_id}-{run_id}"


def device_flags(
    device: str, gpus: list[devices.Gpu], group_ids: list[int] | None = None, runtime: str = "docker"
) -> list[str]:
    """Flags giving a container its GPUs. `gpus` carry host indices; inside they count from 0.

    podman differs from docker on two points: it reads `--gpus` as CDI device names, so docker's
    `device=0` is invalid there, and NVIDIA GPUs go by their CDI name instead
    (`--device nvidia.com/gpu=<uuid>`, from the spec `nvidia-ctk cdi generate` writes; see
    https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/cdi-support.html);
    and a rootless podman maps the host's device groups away, so `--group-add keep-groups`
    (podman run --group-add, https://docs.podman.io/en/latest/markdown/podman-run.1.html) keeps
    the calling user's video/render groups for the device nodes. podman accepts keep-groups
    only alone, without numeric groups.
    """
    if device == "cpu":
        if gpus:
            raise ValueError("a cpu cell cannot be given GPUs")
        return []
    if not gpus:
        raise ValueError(f"a {device} cell needs at least one GPU")
    visible = ",".join(str(i) for i in range(len(gpus)))
    podman = runtime == "podman"
    if device == "rocm":
        if not group_ids and not podman:
            raise ValueError("a rocm cell needs the group ids of /dev/kfd and its render nodes")
        # /dev/kfd is the compute interface; the render nodes passed decide which GPUs the
        # container can open, so inside it they are numbered 0..n-1.
        flags = ["--device", "/dev/kfd"]
        for gpu in gpus:
            if not gpu.render_node:
                raise ValueError(f"rocm GPU {gpu.index} has no render node")
            flags += ["--device", gpu.render_node]
        if podman:
            flags += ["--group-add", "keep-groups"]
        else:
            for gid in group_ids or []:  # the host's video/render groups owning those nodes, as numbers
                flags += ["--group-add", str(gid)]
        flags += [
            "--ipc", "host",
            "--security-opt", "seccomp=unconfined",
            # vLLM on ROCm refuses to start when these two disagree.
            "-e", f"HIP_VISIBLE_DEVICES={visible}",
            "-e", f"CUDA_VISIBLE_DEVICES={visible}",
        ]  # fmt: skip
        return flags
    if device == "cuda":
        if podman:
            flags = []
            for gpu in gpus:  # the GPU's UUID (stable across reboots), else its index
                uuid = gpu.key.removeprefix("cuda-")
                flags += ["--device", f"nvidia.com/gpu={uuid if uuid != gpu.key else gpu.index}"]
            return [*flags, "--group-add", "keep-groups", "--ipc", "host", "-e", f"CUDA_VISIBLE_DEVICES={visible}"]
        # docker reads --gpus as CSV: the quotes keep "device=0,1" one field, not "device=0" and "1".
        devices_csv = ",".join(str(gpu.index) for gpu in gpus)
        return ["--gpus", f'"device={devices_csv}"', "--ipc", "host", "-e", f"CUDA_VISIBLE_DEVICES={visible}"]
    raise ValueError(f"unknown device kind {device!r}")


def resource_flags(resources: dict, ipc_host: bool = False) -> list[str]:
    """`--shm-size` sizes a private /dev/shm; with `--ipc host` (every GPU cell) the container
    uses the host's /dev/shm and docker ignores the size, so it is left out rather than shown
    as if it applied (https://docs.docker.com/reference/cli/docker/container/run/#ipc)."""
    flags = []
    if resources.get("shm_size") and not ipc_host:
        flags += ["--shm-size", resources["shm_size"]]
    if resources.get("cpus"):
        flags += ["--cpuset-cpus", resources["cpus"]]
    if resources.get("memory"):
        # Same as --memory: no swap beyond the limit, so an OOM is an OOM, not a slow cell.
        flags += ["--memory", resources["memory"], "--memory-swap", resources["memory"]]
    return flags


def hardening_flags(device: str, user: str | None) -> list[str]:
    """No privilege escalation; on CPU no capabilities either. GPU images keep docker's default
    capabilities (their device flags are unverified here without the hardware)."""
    if not user:
        return []
    flags = ["--user", user, "-e", "HOME=/tmp", "-e", "USER=cellbench", "--security-opt", "no-new-privileges"]
    if device == "cpu":
        flags += ["--cap-drop", "ALL"]
    return flags


def passthrough_secrets(environ: dict[str, str]) -> list[str]:
    """Secrets go by name only (`-e NAME`): docker reads the value, no file or argv holds it."""
    flags = []
    for name in sorted(environ):
        if contract.is_secret_name(name) and name.startswith(("HF_", "HUGGING")):
            flags += ["-e", name]
    return flags


def docker_run_command(
    cell: dict,
    *,
    run_id: str,
    image_ref: str,
    model_dir: str,
    out_dir: str,
    scripts_dir: str,
    contract_file: str = contract.__file__,
    gpus: list[devices.Gpu] | None = None,
    group_ids: list[int] | None = None,
    runtime: str = "docker",
    environ: dict[str, str] | None = None,
    origin: str = ".",
    labels: dict[str, str] | None = None,
    user: str | None = None,
    command: list[str] | None = None,
) -> list[str]:
    gpus = gpus or []
    environ = os.environ if environ is None else environ
    # The serving definitions (stdlib only, like contract.py) are mounted beside it.
    serving_file = os.path.join(os.path.dirname(os.path.abspath(contract_file)), "serving.py")
    argv = [
        runtime, "run", "--rm", "--init",
        "--name", container_name(cell["id"], run_id),
        "--label", f"{LABEL_CELL}={cell['id']}",
        "--label", f"{LABEL_RUN}={run_id}",
        "--label", f"{LABEL_ORIGIN}={os.path.abspath(origin)}",
        "--network", "none",
        "-v", f"{os.path.abspath(model_dir)}:{MOUNT_MODEL}:ro",
        "-v", f"{os.path.abspath(scripts_dir)}:{MOUNT_SCRIPTS}:ro",
        "-v", f"{os.path.abspath(contract_file)}:{contract.MOUNT_CONTRACT}/contract.py:ro",
        "-v", f"{serving_file}:{contract.MOUNT_CONTRACT}/serving.py:ro",
        "-v", f"{os.path.abspath(out_dir)}:{MOUNT_OUT}:rw",
    ]  # fmt: skip
    for key, value in sorted((labels or {}).items()):
        argv += ["--label", f"{key}={value}"]
    argv += hardening_flags(cell["device"], user)
    gpu_flags = device_flags(cell["device"], gpus, group_ids, runtime)
    argv += gpu_flags
    argv += resource_flags(cell["resources"], ipc_host="--ipc" in gpu_flags)
    for name, value in sorted(cell["env"].items()):
        argv += ["-e", f"{name}={value}"]
    argv += passthrough_secrets(environ)
    # Cells have no network: tell the hub client, so it never waits on a hub it cannot reach.
    argv += ["-e", "HF_HUB_OFFLINE=1"]
    # `command` replaces the bench script, e.g. an engine's own benchmark under the same conditions.
    argv += [image_ref, *(command or ["python3", f"{MOUNT_SCRIPTS}/bench_cell.py", f"{MOUNT_OUT}/cell.json"])]
    return argv
