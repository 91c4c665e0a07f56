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


def test_per_cell_is_a_constant_where_every_cell_agrees_else_a_lookup_by_cell_id():
    from types import SimpleNamespace

    assert scheduling.per_cell({"a-1": 4, "b-2": 4}) == 4  # Snakemake calls nothing per job
    lookup = scheduling.per_cell({"a-1": 4, "b-2": 8})
    assert callable(lookup)
    assert [lookup(SimpleNamespace(cell_id=c)) for c in ("a-1", "b-2")] == [4, 8]


def test_run_cell_attributes(study):
    from pathlib import Path
    from types import SimpleNamespace

    every = {cell["id"]: cell for cell in config.expand_cells(study)}
    cpu = {cell_id: cell for cell_id, cell in every.items() if cell["image"] == "cpu"}
    first, second = sorted(cpu)[:2]
    same = scheduling.run_cell_attributes(cpu)
    model = cpu[first]["model"]
    assert same["image"] == Path("results/images/cpu.json")
    assert same["model"] == Path(f"results/models/{model}/manifest.json")
    assert same["model_dir"] == Path(f"results/models/{model}")
    assert (same["gpu"], same["gres"]) == (0, "")
    # The llama.cpp cell has its own image: a lookup for the image alone.
    images = scheduling.run_cell_attributes(every)["image"]
    assert {images(SimpleNamespace(cell_id=c)).name for c in every} == {"cpu.json", "llamacpp.json"}
    cpu[second]["timeout_s"] = 3600  # one cell with its own time limit: a lookup for that resource only
    mixed = scheduling.run_cell_attributes(cpu)
    assert callable(mixed["runtime"]) and not callable(mixed["mem_mb"]) and not callable(mixed["image"])
    assert mixed["runtime"](SimpleNamespace(cell_id=second)) == 70  # 60 min + the 10 min margin
    assert mixed["runtime"](SimpleNamespace(cell_id=first)) == scheduling.runtime_min(cpu[first]["timeout_s"])


def test_plain_copy_copies_deeply():
    settings = {"engine_args": {"a": [1, {"b": 2}]}, "dtype": "bfloat16", "n": None}
    copied = config.plain_copy(settings)
    assert copied == settings
    copied["engine_args"]["a"][1]["b"] = 3
    assert settings["engine_args"]["a"][1]["b"] == 2


def test_provenance_keeps_the_slurm_job_and_the_gpus_of_its_step():
    from cellbench import provenance

    environ = {"SLURM_JOB_ID": "25", "SLURM_JOB_NODELIST": "cb-node2", "SLURM_STEP_GPUS": "1", "HOME": "/root",
               "SLURM_CPUS_ON_NODE": "2"}  # fmt: skip
    assert provenance.scheduler_facts(environ) == {"SLURM_JOB_ID": "25", "SLURM_JOB_NODELIST": "cb-node2",
                                                   "SLURM_STEP_GPUS": "1"}  # fmt: skip
    assert provenance.scheduler_facts({"HOME": "/root"}) == {}
