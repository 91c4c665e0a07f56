"""Scheduler resources of one cell job (Slurm through Snakemake's executor plugin).

Pure functions of the resolved cell, so the same study asks a cluster for the same resources
everywhere: CPUs from the cell's cpuset, memory from its container limit, GPUs as a gres, and a
wall-time limit that lets the runner's own timeout fire first (so a slow cell becomes a
`timeout` row instead of a job Slurm killed without a word).
"""

from __future__ import annotations

import math

from .config import ConfigError, cpuset_cpus
from .config import memory_mb as config_memory_mb

# Minutes beyond the cell timeout: model checksum, image load on a fresh node, container start
# and removal, writing the results.
RUNTIME_MARGIN_MIN = 10


def cpu_count(cpuset: str) -> int:
    """CPUs in a --cpuset-cpus list such as '0-3,8' (parsed by config.cpuset_cpus, the parser
    validation uses); an empty list (no pinning) asks for one."""
    return len(cpuset_cpus(cpuset)) or 1


def memory_mb(memory: str) -> int:
    """A docker memory size ('12g', '512m', bytes without a unit) in MB; empty (no limit) is 0."""
    return math.ceil(config_memory_mb(memory))


def runtime_min(timeout_s: int) -> int:
    return math.ceil(timeout_s / 60) + RUNTIME_MARGIN_MIN


def gres(gpus: int) -> str:
    return f"gpu:{gpus}" if gpus else ""


def job_resources(cell: dict) -> dict:
    """Snakemake resources of the cell's job (names as the Slurm executor plugin reads them)."""
    resources = cell["resources"]
    try:
        return {
            "cpus_per_task": cpu_count(resources.get("cpus", "")),
            "mem_mb": memory_mb(resources.get("memory", "")),
            "runtime": runtime_min(cell["timeout_s"]),
            "gres": gres(resources.get("gpus", 0)),
        }
    except ConfigError as error:
        raise ConfigError(f"config: cell {cell['name']}: {error}") from None


def round_priorities(cells: dict) -> dict[tuple[str, int], int]:
    """Snakemake priority of every (cell id, round): all rounds 1 first, then all rounds 2, ...,
    so a slow drift of the host touches every cell alike. Inside a round the cell order reverses
    every other round, so no cell always runs first (right after an image build, say)."""
    ids = sorted(cells)
    most = max((cell["sweep"]["rounds"] for cell in cells.values()), default=1)
    priorities = {}
    for k in range(1, most + 1):
        order = ids if k % 2 else ids[::-1]
        for position, cell_id in enumerate(order):
            if k <= cells[cell_id]["sweep"]["rounds"]:
                priorities[(cell_id, k)] = (most - k + 1) * len(ids) - position
    return priorities


def per_cell(values: dict[str, object]):
    """A run_cell job attribute from each cell's value: the value itself when every cell has the
    same one, else a function of the job's wildcards. Snakemake calls a rule's functions once per
    job through its input-function machinery (about 0.1 ms a call, inspecting the function each
    time); with ten of them per job that was a third of a 10,000-cell dry run. Values must be hashable."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return distinct.pop()
    return lambda wildcards: values[wildcards.cell_id]


def run_cell_attributes(cells: dict) -> dict:
    """The per-cell inputs, params and resources of the run_cell rule, each by per_cell: the
    image and model manifests, the model folder, and the scheduler resources (job_resources and
    the GPUs that `--resources gpu=K` counts)."""
    from . import paths

    jobs = {cell_id: job_resources(cell) for cell_id, cell in cells.items()}
    by_name = {
        "image": {cell_id: paths.image_manifest(cell["image"]) for cell_id, cell in cells.items()},
        "model": {cell_id: paths.model_manifest(cell["model"]) for cell_id, cell in cells.items()},
        "model_dir": {cell_id: paths.model_dir(cell["model"]) for cell_id, cell in cells.items()},
        "gpu": {cell_id: cell["resources"]["gpus"] for cell_id, cell in cells.items()},
    }
    for name in ("cpus_per_task", "mem_mb", "runtime", "gres"):
        by_name[name] = {cell_id: job[name] for cell_id, job in jobs.items()}
    return {name: per_cell(values) for name, values in by_name.items()}
