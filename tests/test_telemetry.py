"""Telemetry: cgroup and vendor-tool parsing on recorded output (tests/fixtures/telemetry/README.md
says which files were recorded here and which were written from the vendors' documented
formats), alignment with the repeats, the Parquet file, and the sampler with its reads faked."""

import itertools
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cellbench import telemetry

FIXTURES = Path(__file__).parent / "fixtures" / "telemetry"
CGROUP = Path("/sys/fs/cgroup")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_cgroup_v1_files_of_a_docker_container():
    found = telemetry.cgroup_files(fixture("proc-cgroup-v1.txt"))
    assert found[0] == telemetry.CgroupFiles(
        1,
        CGROUP / "cpuacct/docker/CONTAINER_ID/cpuacct.usage",
        CGROUP / "memory/docker/CONTAINER_ID/memory.usage_in_bytes",
        CGROUP / "memory/docker/CONTAINER_ID/memory.stat",
    )
    assert found[1].cpu == CGROUP / "cpu,cpuacct/docker/CONTAINER_ID/cpuacct.usage"
    assert {f.version for f in found[2:]} == {2}  # its "0::" line: the unified hierarchy, tried last


def test_cgroup_v2_files():
    folder = CGROUP / "system.slice/docker-CONTAINER_ID.scope"
    found = telemetry.cgroup_files(fixture("proc-cgroup-v2.txt"))
    assert found[0] == telemetry.CgroupFiles(2, folder / "cpu.stat", folder / "memory.current", folder / "memory.stat")
    assert found[1].cpu == CGROUP / "unified/system.slice/docker-CONTAINER_ID.scope/cpu.stat"
    assert len(found) == 2


def test_cpu_seconds_v1_nanoseconds_and_v2_microseconds():
    assert telemetry.cpu_seconds(fixture("cpuacct.usage-v1.txt"), 1) == pytest.approx(2.082405926)
    assert telemetry.cpu_seconds(fixture("cpu.stat-v2.txt"), 2) == 2.5
    with pytest.raises(ValueError):
        telemetry.cpu_seconds("user_usec 5\n", 2)


def test_memory_as_docker_stats_counts_it():
    # Recorded together: 56086528 B with no inactive file cache; docker stats said 53.49MiB.
    mib = telemetry.memory_mib(fixture("memory.usage_in_bytes-v1.txt"), fixture("memory.stat-v1.txt"), 1)
    assert mib == pytest.approx(56086528 / 2**20) and round(mib, 2) == 53.49
    assert telemetry.docker_stats(fixture("docker-stats.jsonl"))["memory_mb"] == pytest.approx(53.49)
    # v2: 3 MiB used, 1 MiB of it inactive file cache -> 2 MiB.
    assert telemetry.memory_mib("3145728\n", "anon 2097152\ninactive_file 1048576\n", 2) == 2.0


def test_cpu_cores_between_two_samples():
    assert telemetry.cpu_cores(None, (10.0, 2.0)) is None
    assert telemetry.cpu_cores((10.0, 2.0), (12.0, 3.5)) == 0.75  # 1.5 CPU s in 2 s
    assert telemetry.cpu_cores((10.0, 2.0), (10.0, 3.5)) is None


def test_docker_stats_cpu_percent_is_a_share_of_one_core():
    sample = telemetry.docker_stats(fixture("docker-stats.jsonl"))
    assert sample["cpu_cores"] == pytest.approx(1.0055)


def test_nvidia_smi_streamed_lines():
    samples = [s for s in map(telemetry.parse_nvidia_line, fixture("nvidia-smi-lms.csv").splitlines()) if s]
    assert len(samples) == 6  # the blank line is no sample
    assert samples[0] == {"source": "nvidia-smi", "gpu": 0, "gpu_util_pct": 97.0, "power_w": 612.45,
                          "sm_clock_mhz": 1980.0, "vram_mb": 40321.0}  # fmt: skip
    assert samples[1]["power_w"] is None and samples[4]["sm_clock_mhz"] is None  # [N/A], [Not Supported]
    assert [s["gpu"] for s in samples] == [0, 1, 0, 1, 0, 1]
    assert telemetry.parse_nvidia_line("WARNING: infoROM is corrupted at gpu 0000:3B:00.0") is None


def test_nvidia_command_streams_at_the_interval_on_the_cells_gpus():
    argv = telemetry.nvidia_command(0.5, [2, 3])
    assert argv == ["nvidia-smi", "--query-gpu=index,utilization.gpu,power.draw,clocks.sm,memory.used",
                    "--format=csv,noheader,nounits", "-lms", "500", "-i", "2,3"]  # fmt: skip


def test_rocm_smi_json():
    samples = telemetry.parse_rocm_smi(fixture("rocm-smi.json"))
    assert samples == [
        {"source": "rocm-smi", "gpu": 0, "gpu_util_pct": 87.0, "power_w": 512.0, "vram_pct": 62.0},
        {"source": "rocm-smi", "gpu": 1, "gpu_util_pct": 0.0, "power_w": 141.0, "vram_pct": 1.0},
    ]


def test_amd_smi_metric_json():
    samples = telemetry.parse_amd_smi(fixture("amd-smi-metric.json"))
    assert samples[0] == {"source": "amd-smi", "gpu": 0, "gpu_util_pct": 91.0, "power_w": 598.0,
                          "sm_clock_mhz": 2100.0, "vram_mb": 121872.0}  # fmt: skip
    assert samples[1]["power_w"] is None and samples[1]["sm_clock_mhz"] == 132.0


RAW = {  # fmt: skip
    "status": "ok",
    "measuring_at_s": 100.0,
    "points": [
        {
            "batch_size": 1,
            "input_len": 128,
            "output_len": 64,
            "repeat": 0,
            "started_at_s": 110.0,
            "finished_at_s": 120.0,
        },
        {
            "batch_size": 8,
            "input_len": 128,
            "output_len": 64,
            "repeat": 1,
            "started_at_s": 125.0,
            "finished_at_s": 130.0,
        },
        {"batch_size": 8, "input_len": 128, "output_len": 64, "repeat": 0, "wall_s": 1.0},  # before the marks
    ],
}


def test_marks_are_the_repeats_with_their_epoch_times():
    assert telemetry.marks(RAW) == [
        (110.0, 120.0, "batch 1, 128→64, repeat 1"),
        (125.0, 130.0, "batch 8, 128→64, repeat 2"),
    ]
    assert telemetry.marks(None) == []


def test_samples_are_labelled_with_their_phase_and_repeat():
    samples = [{"t_s": t} for t in (50.0, 115.0, 122.0, 140.0)]
    labelled = telemetry.label_samples(samples, RAW, container_start=40.0)
    assert [(s["t_rel_s"], s["phase"], s["point"]) for s in labelled] == [
        (10.0, "load", None),
        (75.0, "repeat", "batch 1, 128→64, repeat 1"),
        (82.0, "between", None),
        (100.0, "after", None),
    ]
    # A round that failed while loading: everything is load.
    assert {s["phase"] for s in telemetry.label_samples(samples, {"status": "failed"}, 40.0)} == {"load"}


def test_parquet_keeps_the_columns_and_its_version(tmp_path):
    path = tmp_path / "telemetry.parquet"
    telemetry.write_parquet(path, [{"t_s": 1.0, "t_rel_s": 0.5, "source": "cgroup-v1", "cpu_cores": 1.5}])
    table = pq.read_table(path)
    assert table.column_names == list(telemetry.COLUMNS)
    assert table.schema.metadata[b"cellbench.telemetry_version"] == b"1"
    assert table.to_pylist()[0]["cpu_cores"] == 1.5 and table.to_pylist()[0]["gpu"] is None
    telemetry.write_parquet(path, [])  # telemetry off: an empty file of the same columns
    assert pq.read_table(path).num_rows == 0 and pq.read_table(path).column_names == list(telemetry.COLUMNS)
    assert [p.name for p in tmp_path.iterdir()] == ["telemetry.parquet"]  # no temp file left


def test_sampler_reads_the_cgroup_files_at_the_interval():
    cpu_ns = itertools.count(0, 50_000_000)  # 50 ms more CPU at every read

    def read(path: Path) -> str:
        return {
            "cgroup": fixture("proc-cgroup-v1.txt"),
            "cpuacct.usage": f"{next(cpu_ns)}\n",
            "memory.usage_in_bytes": fixture("memory.usage_in_bytes-v1.txt"),
            "memory.stat": fixture("memory.stat-v1.txt"),
        }[path.name]

    with telemetry.Sampler("docker", "c", {"interval_s": 0.05}, find=lambda: 4242, read=read) as sampler:
        time.sleep(0.4)
    assert len(sampler.samples) >= 3 and sampler.notes == []
    assert {s["source"] for s in sampler.samples} == {"cgroup-v1"}
    assert sampler.samples[0]["cpu_cores"] is None and sampler.samples[1]["cpu_cores"] > 0
    assert round(sampler.samples[-1]["memory_mb"], 2) == 53.49
    assert [s["t_s"] for s in sampler.samples] == sorted(s["t_s"] for s in sampler.samples)


def test_sampler_switched_off_samples_nothing():
    with telemetry.Sampler("docker", "c", {"enabled": False}, find=lambda: pytest.fail("looked up")) as sampler:
        pass
    assert sampler.samples == [] and sampler._threads == []


def _round_with_telemetry(results: Path, cell_id: str, k: int, samples: list[dict]) -> None:
    import json

    from cellbench import paths

    paths.round_dir(cell_id, k, results).mkdir(parents=True)
    telemetry.write_parquet(paths.cell_telemetry(cell_id, k, results), samples)
    prov = {"cell": {"name": cell_id.rsplit("-", 1)[0]}, "container": RAW}
    paths.cell_provenance(cell_id, k, results).write_text(json.dumps(prov))


def test_report_rounds_take_each_cells_first_round_with_samples_and_draw(tmp_path):
    import json

    import matplotlib.image
    from cellbench import plots

    samples = telemetry.label_samples(
        [{"t_s": 90.0 + i, "source": "cgroup-v1", "cpu_cores": 1.0 + (i % 3), "memory_mb": 500.0 + i}
         for i in range(45)],
        RAW, container_start=90.0,
    )  # fmt: skip
    _round_with_telemetry(tmp_path, "vllm-0000000001", 1, [])  # telemetry off in round 1
    _round_with_telemetry(tmp_path, "vllm-0000000001", 2, samples)
    (tmp_path / "study.json").write_text(json.dumps({"study": "s", "cells": {"vllm-0000000001": 3, "x-0000000002": 1}}))
    rounds = telemetry.report_rounds(tmp_path / "study.json", tmp_path)
    assert [(r["cell_name"], r["round"], len(r["samples"])) for r in rounds] == [("vllm", 2, 45)]
    # The marks move to the container's clock: started 90 s (epoch), first repeat 110-120 s.
    assert rounds[0]["marks"][0] == (20.0, 30.0, "batch 1, 128→64, repeat 1")
    plots.telemetry(rounds, tmp_path / "telemetry.png")
    plots.telemetry([], tmp_path / "none.png")
    assert matplotlib.image.imread(tmp_path / "telemetry.png").std() > 0
    assert matplotlib.image.imread(tmp_path / "none.png").std() > 0  # says there is nothing yet
