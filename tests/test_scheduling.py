"""Slurm resources of a cell job, and the runtime choice: pure functions."""

import pytest
from cellbench import config, runtimes, scheduling


def test_cpus_from_the_cpuset():
    assert scheduling.cpu_count("") == 1
    assert scheduling.cpu_count("0-3,8") == 5
    assert scheduling.cpu_count("2") == 1
    for bad in ("3-1", "-", "a", "1,,2"):
        with pytest.raises(config.ConfigError, match="resources.cpus"):
            scheduling.cpu_count(bad)


def test_memory_in_mb():
    assert scheduling.memory_mb("") == 0
    assert scheduling.memory_mb("12g") == 12288
    assert scheduling.memory_mb("512m") == 512
    assert scheduling.memory_mb("2097152") == 2
    with pytest.raises(config.ConfigError, match="resources.memory"):
        scheduling.memory_mb("12x")


def test_job_resources_of_a_gpu_cell(study):
    study["defaults"].update(timeout_s=1800, resources={"cpus": "0-7", "memory": "64g", "gpus": 2})
    cell = config.expand_cells(study)[0]
    # 30 min of cell timeout plus the margin: the runner's timeout fires before Slurm's.
    assert scheduling.job_resources(cell) == {"cpus_per_task": 8, "mem_mb": 65536, "runtime": 40, "gres": "gpu:2"}


def test_a_cpu_cell_asks_for_no_gres(study):
    cell = config.expand_cells(study)[0]
    assert scheduling.job_resources(cell)["gres"] == ""


def test_bad_cpuset_names_the_cell(study):
    study["defaults"]["resources"] = {"cpus": "4-2"}
    cell = config.expand_cells(study)[0]
    with pytest.raises(config.ConfigError, match=f"cell {cell['name']}: resources.cpus"):
        scheduling.job_resources(cell)


def test_runtime_comes_from_the_machine_not_the_study():
    assert runtimes.runtime_from_env({}) == "docker"
    assert runtimes.runtime_from_env({"CELLBENCH_RUNTIME": "podman"}) == "podman"
    with pytest.raises(runtimes.RuntimeSetupError, match="CELLBENCH_RUNTIME='rkt'"):
        runtimes.runtime_from_env({"CELLBENCH_RUNTIME": "rkt"})
