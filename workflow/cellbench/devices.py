"""GPUs of the host as data: which devices exist, how a GPU index maps to its device node, and
what the vendor tools inside a container said about them.

Discovery reads a sysfs tree under a given root (a fake tree in tests) or the output of
`nvidia-smi`; parsing takes captured text. Nothing here starts a container.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

KFD_NODES = "sys/class/kfd/kfd/topology/nodes"
NVIDIA_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"]
ARCH = re.compile(r"^(gfx[0-9a-f]+|sm_[0-9]+a?)$")
GPUS_ENV = "CELLBENCH_GPUS"  # host GPU indices cellbench may use, e.g. "0,2"; unset: all


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Gpu:
    index: int  # host index, as HIP/ROCm (KFD order) or nvidia-smi number it
    key: str  # stable name of the physical device, used for its slot lock
    name: str
    render_node: str | None = None  # /dev/dri/renderD<N> (rocm)


def rocm_gpus(root: str | Path = "/") -> list[Gpu]:
    """AMD GPUs in the order the ROCm runtime numbers them: KFD topology nodes by node id,
    skipping CPU nodes (gpu_id 0). Each node names its render node (`drm_render_minor`): render
    minors need not be 128 + index (an integrated GPU or a display card can take renderD128)."""
    nodes = Path(root) / KFD_NODES
    if not nodes.is_dir():
        return []
    gpus = []
    for node in sorted((p for p in nodes.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            gpu_id = int((node / "gpu_id").read_text().strip() or 0)
            properties = dict(
                line.split(None, 1) for line in (node / "properties").read_text().splitlines() if " " in line
            )
        except (OSError, ValueError):
            continue
        if gpu_id == 0:
            continue
        minor = properties.get("drm_render_minor", "").strip()
        if not minor.isdigit():
            raise DeviceError(f"{node}/properties: no drm_render_minor for GPU node {node.name}")
        name = (node / "name").read_text().strip() if (node / "name").is_file() else ""
        gpus.append(Gpu(len(gpus), f"rocm-renderD{minor}", name, f"/dev/dri/renderD{minor}"))
    return gpus


def parse_nvidia_gpus(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,uuid,name --format=csv,noheader` -> GPUs."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 3 and row[0].strip().isdigit():
            index, uuid, name = (field.strip() for field in row[:3])
            gpus.append(Gpu(int(index), f"cuda-{uuid}", name))
    return gpus


def cuda_gpus() -> list[Gpu]:
    try:
        done = subprocess.run(NVIDIA_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_gpus(done.stdout) if done.returncode == 0 else []


def allowed(gpus: list[Gpu], spec: str | None) -> list[Gpu]:
    """Keep the GPUs whose host index is listed in `spec` ("0,2"); None or "" keeps all."""
    if not spec:
        return gpus
    try:
        wanted = {int(part) for part in spec.split(",") if part.strip()}
    except ValueError:
        raise DeviceError(f"{GPUS_ENV}={spec!r}: expected GPU indices like 0,2") from None
    unknown = wanted - {gpu.index for gpu in gpus}
    if unknown:
        raise DeviceError(f"{GPUS_ENV}={spec!r}: no GPU with index {min(unknown)} on this machine")
    return [gpu for gpu in gpus if gpu.index in wanted]


def discover(device: str, environ: dict[str, str], root: str | Path = "/") -> list[Gpu]:
    """GPUs of one device kind that cells may use on this host: CELLBENCH_GPUS if set, else the
    GPUs Slurm gave this job (its gres), else all."""
    found = {"rocm": lambda: rocm_gpus(root), "cuda": cuda_gpus}[device]()
    spec = environ.get(GPUS_ENV) or environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS")
    return allowed(found, spec)


def device_gids(paths: list[str]) -> list[int]:
    """Host group ids owning the device nodes. `--group-add` takes them as numbers: a group
    name is looked up in the image's /etc/group, where `render` is usually missing (the
    container then fails to start) or has another id than on the host."""
    return sorted({Path(path).stat().st_gid for path in paths})


# What the vendor tools printed inside the container -> a few comparable facts.


def parse_rocminfo(text: str) -> list[dict]:
    """GPU agents of `rocminfo`: gfx arch (`Name: gfx942`) and marketing name."""
    agents = []
    for block in re.split(r"\n\*{5,}\s*\n", text):
        kind = re.search(r"^\s*Device Type:\s*(\S+)", block, re.MULTILINE)
        if not kind or kind.group(1) != "GPU":
            continue
        name = re.search(r"^\s*Name:\s*(gfx[0-9a-z]+)\s*$", block, re.MULTILINE)
        marketing = re.search(r"^\s*Marketing Name:\s*(.+?)\s*$", block, re.MULTILINE)
        agents.append({"arch": name.group(1) if name else None, "name": marketing.group(1) if marketing else None})
    return agents


def parse_nvidia_smi_csv(text: str) -> list[dict]:
    """`nvidia-smi --query-gpu=name,driver_version,memory.total[,compute_cap] --format=csv` -> GPUs
    (the header names the fields, `memory.total [MiB]` keeps its first word)."""
    rows = list(csv.reader(io.StringIO(text.strip())))
    if not rows or not rows[0] or rows[0][0].strip() != "name":
        return []
    header = [h.strip().split(" ")[0] for h in rows[0]]
    return [dict(zip(header, (f.strip() for f in row), strict=False)) for row in rows[1:] if row]


def gpu_summary(container_gpu: dict) -> dict:
    """Device name, arch and software versions of a cell's GPUs from what bench_cell.py captured."""
    torch = container_gpu.get("torch") or {}
    # A gfx target or sm_XY only: cells recorded before issue 19 hold the device name as the
    # arch on CUDA (torch's gcnArchName repeats it there).
    arch = torch.get("arch") if ARCH.match(str(torch.get("arch") or "")) else None
    summary = {
        "device_name": torch.get("device_name"),
        "arch": arch,
        "torch_hip": torch.get("hip"),
        "torch_cuda": torch.get("cuda"),
    }
    agents = parse_rocminfo(container_gpu.get("rocminfo", ""))
    if agents:
        summary["device_name"] = summary["device_name"] or agents[0]["name"]
        summary["arch"] = summary["arch"] or agents[0]["arch"]
        summary["gpus"] = agents
    nvidia = parse_nvidia_smi_csv(container_gpu.get("nvidia_smi", ""))
    if nvidia:
        summary["device_name"] = summary["device_name"] or nvidia[0].get("name")
        summary["driver"] = nvidia[0].get("driver_version")
        capability = nvidia[0].get("compute_cap") or ""
        if not summary["arch"] and re.fullmatch(r"\d+\.\d+", capability):
            summary["arch"] = "sm_" + capability.replace(".", "")
        summary["gpus"] = nvidia
    hipcc = re.search(r"HIP version:\s*(\S+)", container_gpu.get("hipcc", ""))
    if hipcc:
        summary["hip_version"] = hipcc.group(1)
    return {key: value for key, value in summary.items() if value}
