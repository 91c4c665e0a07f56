"""GPU slot allocation with real flock'ed lock files, from threads of this process and from
separate processes (fake device names: no GPU is needed to test who gets which)."""

import multiprocessing
import os
import signal
import time

import pytest
from cellbench import devices, runner, slots
from test_containers import fake_kfd

KEYS = ["rocm-renderD128", "rocm-renderD129", "rocm-renderD130", "rocm-renderD131"]


def _hold(keys, count, directory, queue, seconds):
    with slots.acquire(keys, count, directory, timeout_s=30, poll_s=0.05) as got:
        queue.put((os.getpid(), time.monotonic(), got))
        time.sleep(seconds)
        # Stamped while still held: a later claim of the same GPU must be stamped after it.
        queue.put((os.getpid(), time.monotonic(), None))


def test_concurrent_processes_get_disjoint_gpus(tmp_path):
    """Four processes want 2 of 4 GPUs each: at any moment the held sets never overlap."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(KEYS, 2, tmp_path, queue, 0.4)) for _ in range(4)]
    for proc in procs:
        proc.start()
    events = [queue.get(timeout=30) for _ in range(8)]
    for proc in procs:
        proc.join(timeout=30)
    held: dict[int, list[str]] = {}
    for pid, _, got in sorted(events, key=lambda e: e[1]):
        if got is None:
            del held[pid]
            continue
        assert len(got) == 2
        busy = {key for keys in held.values() for key in keys}
        assert not busy & set(got), f"{got} given while {busy} were held"
        held[pid] = got
        assert len(held) <= 2
    assert all(proc.exitcode == 0 for proc in procs)


def test_a_killed_holder_frees_its_gpu(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    holder = ctx.Process(target=_hold, args=(KEYS[:1], 1, tmp_path, queue, 60))
    holder.start()
    assert queue.get(timeout=30)[2] == KEYS[:1]
    with (
        pytest.raises(slots.SlotError, match="no 1 free GPUs of 1"),
        slots.acquire(KEYS[:1], 1, tmp_path, timeout_s=0.2, poll_s=0.05),
    ):
        pass
    os.kill(holder.pid, signal.SIGKILL)  # a crash: no clean-up code runs
    holder.join(timeout=30)
    with slots.acquire(KEYS[:1], 1, tmp_path, timeout_s=5, poll_s=0.05) as got:
        assert got == KEYS[:1]


def test_in_one_process_claims_are_disjoint_and_released(tmp_path):
    with slots.acquire(KEYS, 3, tmp_path) as first:
        assert first == KEYS[:3]
        with slots.acquire(KEYS, 1, tmp_path, timeout_s=0) as second:
            assert second == KEYS[3:]
        assert (tmp_path / f"{KEYS[0]}.lock").read_text() == f"{os.getpid()}\n"
    with slots.acquire(KEYS, 4, tmp_path, timeout_s=0) as everything:
        assert everything == KEYS


def test_asking_for_more_gpus_than_exist(tmp_path):
    with (
        pytest.raises(slots.SlotError, match="needs 2 GPUs, this machine offers 1"),
        slots.acquire(KEYS[:1], 2, tmp_path),
    ):
        pass


def test_lock_dir_from_environment(tmp_path):
    assert slots.lock_dir({slots.LOCK_DIR_ENV: str(tmp_path)}) == tmp_path
    assert slots.lock_dir({}).name == "gpu-locks"


def test_runner_claims_the_cells_gpu_count_from_the_machine(tmp_path):
    fake_kfd(tmp_path, [128, 129, 130])
    environ = {slots.LOCK_DIR_ENV: str(tmp_path / "locks")}
    tp2 = {"name": "tp2", "device": "rocm", "resources": {"gpus": 2}}
    with runner.claimed_gpus(tp2, environ, tmp_path) as first:
        assert [g.render_node for g in first] == ["/dev/dri/renderD128", "/dev/dri/renderD129"]
        with runner.claimed_gpus({**tp2, "resources": {"gpus": 1}}, environ, tmp_path) as second:
            assert [g.render_node for g in second] == ["/dev/dri/renderD130"]
    with runner.claimed_gpus({**tp2, "device": "cpu"}, environ, tmp_path) as none:
        assert none == []
    with (
        pytest.raises(devices.DeviceError, match="tp2 needs a rocm GPU; none found on this machine"),
        runner.claimed_gpus(tp2, environ, tmp_path / "elsewhere"),
    ):
        pass
