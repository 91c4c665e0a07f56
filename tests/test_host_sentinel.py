"""The host sentinel inside the container (bench_cell.py) and the canary's columns."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cellbench import measure

ROOT = Path(__file__).resolve().parents[1]


def test_foreign_cpu_is_host_busy_time_minus_the_containers_own(bench):
    # 2 s of wall; the host was busy 3.0 CPU-s, 1.2 of them this container's: 0.9 cores elsewhere.
    before, after = (10.0, 100.0, 5.0, 40.0), (12.0, 103.0, 5.2, 41.2)
    found = bench.host_share(before, after)
    assert found["host_foreign_cpu"] == pytest.approx(0.9)
    assert found["host_steal_cpu"] == pytest.approx(0.1)
    assert bench.host_share(None, after) == {"host_foreign_cpu": None, "host_steal_cpu": None}


def test_cpu_sample_reads_this_machine(bench):
    sample = bench.cpu_sample()
    # On a host with cgroup files readable the sample exists; its host busy time is positive.
    assert sample is None or (sample[1] > 0 and sample[3] >= 0)


def test_canary_columns_keep_numbers_only():
    found = measure.canary_columns({"matmul_1t_gflops": 31.5, "matmul_all_gflops": "x", "memcpy_gb_s": 7})
    assert found == {"canary_matmul_1t_gflops": 31.5, "canary_matmul_all_gflops": None, "canary_memcpy_gb_s": 7}
    assert set(measure.canary_columns(None).values()) == {None}


def test_canary_runs_and_reports_positive_rates():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "canary.py")], capture_output=True, text=True)
    found = json.loads(done.stdout)
    assert found["cpus"] >= 1
    assert found["matmul_1t_gflops"] > 0 and found["matmul_all_gflops"] > 0 and found["memcpy_gb_s"] > 0
