#!/usr/bin/env python3
"""Host canary: a fixed workload of a few seconds whose speed says how fast this machine is now.

Runs INSIDE a cell's container, before the engine loads, once per round. Its figures do not
measure the engine; they measure the host: a round whose canary is much slower than the
machine's usual one ran on a disturbed host, and a machine whose canary is 3x slower than
another's today is a slower machine before anyone blames a configuration.

- matmul_1t_gflops: float32 256x256 matrix products in one process with one BLAS thread;
- matmul_all_gflops: the same in one single-threaded process per CPU of the container, at once
  (processes, not BLAS threads, so every image's BLAS is driven alike);
- memcpy_gb_s: copies of a 64 MiB array, bytes read + written per second, one thread.
Each figure is the best of 3 trials of 0.2 s.

usage: canary.py            prints one JSON object
Standard library and numpy (present in every engine image); without numpy it prints nulls.
"""

import json
import os
import subprocess
import sys
import time

SECONDS = 0.2  # per trial; the best of TRIALS is kept: a transient (the previous container's
TRIALS = 3  # removal, a daemon's tick) slows one trial, not the machine's capability
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker(kind: str, start_at: float) -> float:
    import numpy as np

    if kind == "matmul":
        a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
        b = a.T.copy()
        work, step = 2 * 256**3 / 1e9, lambda: a @ b
    else:
        src = np.ones(64 << 20, dtype=np.uint8)
        dst = np.empty_like(src)
        work, step = 2 * src.nbytes / 1e9, lambda: np.copyto(dst, src)
    step()  # first touch of the pages and BLAS init, outside the timed loop
    while time.time() < start_at:  # concurrent workers start together
        time.sleep(0.001)
    best = 0.0
    for _ in range(TRIALS):
        count, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < SECONDS:
            step()
            count += 1
        best = max(best, count * work / (time.perf_counter() - begin))
    return best


def run(kind: str, processes: int) -> float:
    """Sum of the rates of `processes` single-threaded workers running at the same time."""
    env = {**os.environ, **SINGLE_THREAD}
    start_at = time.time() + 0.3 + 0.05 * processes  # after every worker imported numpy
    argv = [sys.executable, __file__, "--worker", kind, repr(start_at)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return sum(float(p.communicate()[0]) for p in procs)


def main() -> dict:
    cpus = len(os.sched_getaffinity(0))
    try:
        import numpy  # noqa: F401
    except ImportError:
        return {"cpus": cpus, "matmul_1t_gflops": None, "matmul_all_gflops": None, "memcpy_gb_s": None}
    begin = time.perf_counter()
    found = {
        "cpus": cpus,
        "matmul_1t_gflops": run("matmul", 1),
        "matmul_all_gflops": run("matmul", cpus),
        "memcpy_gb_s": run("memcpy", 1),
    }
    found["seconds"] = time.perf_counter() - begin
    return found


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(worker(sys.argv[2], float(sys.argv[3])))
    else:
        print(json.dumps(main()))
