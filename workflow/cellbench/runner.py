"""Run one cell in its own container and write its metrics, provenance and engine log.

The container runs in the foreground under a deterministic name. Whatever happens (success,
engine failure, timeout, Ctrl-C, SIGTERM from Snakemake or Slurm) the container is removed.
A cell's own failure becomes rows with a status; an interruption writes nothing, so the next
run redoes the cell instead of trusting half of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from . import (
    atomic,
    containers,
    datasets,
    devices,
    diagnose,
    effective,
    lifecycle,
    measure,
    metrics,
    paths,
    profiles,
    progress,
    provenance,
    quality_texts,
    roofline,
    runtimes,
    slots,
    telemetry,
)


class Interrupted(Exception):
    pass


class RunnerError(RuntimeError):
    """The run could not happen for reasons outside the cell (docker, disk): nothing is written."""


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def _wait(process: subprocess.Popen, timeout_s: float, pipeline: int) -> int:
    """Wait for the container client; raise TimeoutExpired, or Interrupted if the pipeline died."""
    deadline = time.monotonic() + timeout_s
    ticks = lifecycle.start_ticks(pipeline)
    while True:
        try:
            return process.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                raise
        if not lifecycle.process_alive(pipeline, ticks):
            raise Interrupted(f"the death of its pipeline (pid {pipeline})")


def remove_container(name: str, runtime: str = "docker") -> None:
    subprocess.run([runtime, "rm", "-f", name], capture_output=True, check=False)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_container(argv: list[str], name: str, log_path: Path, timeout_s: float) -> tuple[int | None, bool]:
    """Run `argv` (a foreground `docker run`); return (exit code, timed_out)."""
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                return _wait(process, timeout_s, lifecycle.pipeline_pid()), False
            except subprocess.TimeoutExpired:
                return None, True
            finally:
                if process.poll() is None:
                    remove_container(name, argv[0])  # kills the engine, then the client exits
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
    finally:
        remove_container(name, argv[0])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def model_mount(model_dir: Path, manifest: dict) -> tuple[Path, str]:
    """(host folder mounted read-only at /model, the model's path inside the container). A hub
    cache model mounts its whole repo folder: snapshot files are symlinks into its blobs/."""
    if manifest.get("snapshot_dir"):
        repo = Path(manifest["repo_dir"])
        return repo, f"{containers.MOUNT_MODEL}/{Path(manifest['snapshot_dir']).relative_to(repo)}"
    return Path(model_dir), containers.MOUNT_MODEL


@contextlib.contextmanager
def claimed_gpus(cell: dict, environ: dict[str, str], root: str = "/") -> Iterator[list[devices.Gpu]]:
    """The GPUs this cell may use, held for the with-block (none for a cpu cell)."""
    if cell["device"] == "cpu":
        yield []
        return
    found = devices.discover(cell["device"], environ, root)
    if not found:
        raise devices.DeviceError(f"cell {cell['name']} needs a {cell['device']} GPU; none found on this machine")
    by_key = {gpu.key: gpu for gpu in found}
    # Waiting for a free GPU can take long: Ctrl-C or SIGTERM then ends the cell like during a run.
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with slots.acquire(list(by_key), cell["resources"]["gpus"], slots.lock_dir(environ)) as keys:
            yield [by_key[key] for key in keys]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class PreparedRound:
    """One round of a cell, ready to run: its run directory (holding cell.json), the model's mount
    and the image at hand."""

    cell: dict
    round: int
    runtime: str
    image_manifest: dict
    model_dir: Path
    model_manifest: dict
    mount_dir: Path
    run_id: str
    work: Path
    image_source: str

    def outputs(self) -> dict[Path, Path]:
        """Each file of the round as written in the run directory -> where it is published."""
        folder = paths.round_dir(self.cell["id"], self.round)
        # metrics, provenance, log, telemetry, profile: in that order
        return {self.work / name: folder / name for name in paths.ROUND_OUTPUTS}


@dataclasses.dataclass(frozen=True)
class ContainerRun:
    """What the container did and left: its exit, the GPUs it had, raw.json and the engine's log."""

    argv: list[str]
    code: int | None
    timed_out: bool
    wall_s: float
    host_load_max: float
    gpus: list[devices.Gpu]
    raw: dict | None
    log_text: str
    telemetry: list[dict] = dataclasses.field(default_factory=list)  # samples, labelled with the repeats
    telemetry_notes: list[str] = dataclasses.field(default_factory=list)


def run_cell(
    cell: dict,
    *,
    study: str,
    config_hash: str,
    machine: str,
    image_manifest: dict,
    model_dir: Path,
    round: int = 1,
    runtime: str = "docker",
) -> str:
    """Run one round of the cell; write its metrics.parquet, provenance.json, engine.log;
    return its status. The round's run directory is removed whatever happens."""
    lifecycle.ensure_runtime(runtime)
    run_id = new_run_id()
    work = paths.run_dir(cell["id"], run_id)
    work.mkdir(parents=True)
    try:
        (work / lifecycle.RUN_OWNER).write_text(lifecycle.runner_label())  # who may remove it if we are killed
        prepared = prepare_round(cell, round, runtime, image_manifest, model_dir, run_id, work)
        ran = run_round(prepared)
        return record_round(prepared, ran, study=study, config_hash=config_hash, machine=machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_round(
    cell: dict, round: int, runtime: str, image_manifest: dict, model_dir: Path, run_id: str, work: Path
) -> PreparedRound:
    """Write the cell's cell.json (its points, where the model is inside the container) into the
    run directory `work`, and make sure the runtime has the image (loading its archive if need be)."""
    model_manifest = json.loads((Path(model_dir) / paths.MODEL_MANIFEST).read_text())
    mount_dir, model_path = model_mount(model_dir, model_manifest)
    # The GGUF's file name comes from the prepared model's manifest (llama.cpp loads /model/<gguf>).
    gguf = model_manifest.get("gguf")
    try:  # a jsonl or shipped dataset's prompts, read again (and refused if the file changed)
        dataset_prompts = datasets.cell_entry(cell.get("dataset", datasets.DEFAULT))
    except datasets.DatasetError as exc:
        raise RunnerError(f"dataset {exc}") from None
    cell_json = {**cell, "points": measure.planned_points(cell), "model_path": model_path, "model_gguf": gguf,
                 # The quality step's texts, on the one round that measures it (else null).
                 "quality_texts": quality_texts.cell_entry(cell.get("quality", False), round),
                 "dataset_prompts": dataset_prompts,
                 # Like quality, only round 1 profiles: later rounds add speed samples, not profiles.
                 "profile": cell.get("profile") if round == 1 else None}  # fmt: skip
    (work / "cell.json").write_text(json.dumps(cell_json, indent=1))
    archive = paths.image_archive(image_manifest["name"])
    image_source = runtimes.ensure_image(runtime, image_manifest["image_id"], archive)
    return PreparedRound(cell=cell, round=round, runtime=runtime, image_manifest=image_manifest, model_dir=model_dir,
                         model_manifest=model_manifest, mount_dir=mount_dir, run_id=run_id, work=work,
                         image_source=image_source)  # fmt: skip


def run_round(prepared: PreparedRound) -> ContainerRun:
    """Run the round's container in the foreground on the GPUs it claims; return what it did.
    Raise RunnerError when the runtime itself failed, OSError(ENOSPC) when the disk was full:
    neither is the cell's doing, so nothing is recorded."""
    cell, work, runtime = prepared.cell, prepared.work, prepared.runtime
    name = containers.container_name(cell["id"], prepared.run_id)
    engine_log = work / paths.cell_log(cell["id"], prepared.round).name
    with claimed_gpus(cell, dict(os.environ)) as gpus:
        nodes = ["/dev/kfd", *(gpu.render_node for gpu in gpus)] if cell["device"] == "rocm" else []
        argv = containers.docker_run_command(
            cell,
            run_id=prepared.run_id,
            image_ref=prepared.image_manifest["image_id"],
            model_dir=str(prepared.mount_dir),
            out_dir=str(work),
            scripts_dir=str(paths.SCRIPTS_DIR),
            gpus=gpus,
            group_ids=devices.device_gids(nodes),
            runtime=runtime,
            labels={lifecycle.LABEL_RUNNER: lifecycle.runner_label()},
            user=containers.CONTAINER_USER,
        )
        # The command line in the round's log: what ran where (on a cluster, which node and which
        # GPUs the scheduler gave), readable even when the runtime refuses it.
        print(f"cellbench: cell {cell['id']} round {prepared.round} on {socket.gethostname()}: {shlex.join(argv)}",
              file=sys.stderr)  # fmt: skip
        # The engine runs as an unprivileged user: it may write only its output directory.
        work.chmod(0o777)
        load_before = os.getloadavg()[0]
        started = time.time()
        # A line per finished repeat while it runs, read from raw.json as the container rewrites
        # it; and the container's CPU, memory (and GPUs) sampled at the cell's interval.
        sampler = telemetry.Sampler(runtime, name, cell.get("telemetry"), cell["device"], [g.index for g in gpus])
        with progress.Follower(work / "raw.json", cell, prepared.round), sampler:
            code, timed_out = run_container(argv, name, engine_log, cell["timeout_s"])
        wall_s = time.time() - started
        # Like pyperf's metadata: a busy host is recorded, so a reader can discount the figure.
        host_load_max = max(load_before, os.getloadavg()[0])

    raw = _read_raw(work / "raw.json")
    log_text = engine_log.read_text(errors="replace")
    if raw is None and code == containers.RUNTIME_FAILED:
        # docker itself failed (daemon gone, bad flag, missing image): not the cell's doing.
        lines = [line for line in log_text.splitlines() if line.strip()]
        raise RunnerError(f"{runtime} could not run the container: {lines[-1] if lines else 'exit 125'}")
    if (raw or {}).get("status") != "ok" and "No space left on device" in log_text:
        raise OSError(errno.ENOSPC, "no space left on device", str(work))
    samples = telemetry.label_samples(sampler.samples, raw, sampler.start)
    return ContainerRun(argv=argv, code=code, timed_out=timed_out, wall_s=wall_s, host_load_max=host_load_max,
                        gpus=gpus, raw=raw, log_text=log_text, telemetry=samples,
                        telemetry_notes=sampler.notes)  # fmt: skip


def record_round(prepared: PreparedRound, ran: ContainerRun, *, study: str, config_hash: str, machine: str) -> str:
    """The round's status, rows and provenance, written in the run directory and then published
    into the round's folder all at once; return the status."""
    cell, raw = prepared.cell, ran.raw
    memory = cell["resources"].get("memory")
    status, error = _outcome(raw, ran.code, ran.timed_out, cell["timeout_s"], ran.log_text, memory=memory)
    context = {
        "study": study,
        "machine_id": machine,
        "run_id": prepared.run_id,
        "config_hash": config_hash,
        "git_sha": provenance.git_sha(),
        "image_id": prepared.image_manifest["image_id"],
        "host_load_max": ran.host_load_max,
        "round": prepared.round,
    }
    rows = measure.rows_for_cell(cell, raw, context, status=status, error=error)
    facts = engine_facts(cell, raw, ran.log_text, error, prepared.model_dir, prepared.model_manifest)
    table = metrics.to_table([{**row, **facts["columns"]} for row in rows])
    record = provenance.scrub(
        {
            **context,
            "cell": cell,
            "status": measure.classify(status, error),
            "error": error,
            "exit_code": ran.code,
            "timed_out": ran.timed_out,
            "container_wall_s": ran.wall_s,
            "docker_run": ran.argv,
            "runtime": prepared.runtime,
            "image_source": prepared.image_source,
            "scheduler": provenance.scheduler_facts(),
            "image": prepared.image_manifest,
            "host": provenance.host_facts(),
            "gpus": [dataclasses.asdict(gpu) for gpu in ran.gpus],
            "gpu": devices.gpu_summary((raw or {}).get("provenance", {}).get("gpu", {})),
            "container": raw,
            "telemetry": {
                "settings": cell.get("telemetry"),
                "samples": len(ran.telemetry),
                "sources": sorted({s["source"] for s in ran.telemetry}),
                "notes": ran.telemetry_notes,
            },
            **facts["provenance"],
        }
    )
    # Everything that takes space is written inside the run directory first; then four
    # renames on the same file system publish the round, so a full disk leaves nothing half.
    staged = prepared.outputs()
    metrics_file, provenance_file, _engine_log, telemetry_file, profile_file = staged  # the run directory's copies
    metrics.write_parquet(metrics_file, table)
    atomic.write_json(provenance_file, record)
    telemetry.write_parquet(telemetry_file, ran.telemetry)
    # The container's profile.json as rows (none when the round took no profile); its trace
    # travels only when there is one.
    profiles.write_parquet(profile_file, profiles.rows_of(profiles.read_profile_json(prepared.work / "profile.json")))
    trace = prepared.work / paths.ROUND_PROFILE_TRACE
    if trace.exists():
        staged[trace] = paths.cell_profile_trace(cell["id"], prepared.round)
    else:  # a rerun without a profile leaves no trace of an earlier one beside its rows
        paths.cell_profile_trace(cell["id"], prepared.round).unlink(missing_ok=True)
    staged.update(stage_serve_results(prepared, raw, context))
    paths.round_dir(cell["id"], prepared.round).mkdir(parents=True, exist_ok=True)
    _publish(staged)
    return record["status"]


def stage_serve_results(prepared: PreparedRound, raw: dict | None, context: dict) -> dict[Path, Path]:
    """Each load level's vLLM-format JSON (measure.bench_serve_results), written in the run
    directory -> where it is published; an earlier run's files of the round are removed."""
    cell, folder = prepared.cell, paths.serve_results_dir(prepared.cell["id"], prepared.round)
    if folder.is_dir():
        shutil.rmtree(folder)
    staged = {}
    for name, result in measure.bench_serve_results(cell, raw, context):
        work = prepared.work / paths.ROUND_SERVE_RESULTS / f"{name}.json"
        work.parent.mkdir(exist_ok=True)
        atomic.write_json(work, result)
        staged[work] = paths.serve_result(cell["id"], prepared.round, name)
    if staged:
        folder.mkdir(parents=True, exist_ok=True)
    return staged


def engine_facts(
    cell: dict, raw: dict | None, log_text: str, error: str | None, model_dir: Path, manifest: dict
) -> dict:
    """What the engine changed, what its log says, and the weight bytes it reads per decode step."""
    raw = raw or {}
    used = raw.get("effective")
    found = diagnose.findings(log_text, error) + effective.unreported(cell, used)
    # An hf-cache model's files stay in its hub snapshot; the manifest says where.
    model_config = _read_raw(Path(manifest.get("snapshot_dir") or model_dir) / "config.json") or {}
    weight_bytes = roofline.engine_weight_bytes(
        roofline.stored_weight_bytes(manifest),
        model_config.get("torch_dtype") or model_config.get("dtype"),
        (used or {}).get("dtype"),
        quantized=bool((used or {}).get("quantization") or cell["quantization"]),
    )
    env_at_start = raw.get("provenance", {}).get("env_at_start", {})
    return {
        "columns": {
            "overrides_json": effective.overrides_json(cell, used),
            "findings_json": json.dumps(found, sort_keys=True),
            "weight_bytes": weight_bytes,
        },
        "provenance": {
            "overrides": effective.overrides(cell, used),
            "engine_set_env": effective.engine_set_env(env_at_start, used["env"]) if used else {},
            "findings": found,
            "weight_bytes": weight_bytes,
        },
    }


def _publish(moves: dict[Path, Path]) -> None:
    """Rename every file into place, or none: a failure undoes the renames already done."""
    done = []
    try:
        for src, dest in moves.items():
            os.replace(src, dest)
            done.append(dest)
    except BaseException:
        for dest in done:
            dest.unlink(missing_ok=True)
        raise


def _read_raw(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _outcome(raw, code, timed_out, timeout_s, log_text, memory=None) -> tuple[str, str | None]:
    logged = measure.error_from_log(log_text)
    if timed_out:
        # A failing engine can hang instead of exiting; name what it logged before the kill.
        cause = f" after the engine logged: {logged}" if logged else ""
        return "timeout", f"cell exceeded its timeout of {timeout_s} s; container killed{cause}"
    if raw and raw.get("status") == "ok" and code == 0:
        return "ok", None
    if raw and raw.get("oom_kills"):
        return "failed", f"out of memory: the container hit its memory limit ({raw['oom_kills']} process(es) killed)"
    if raw and raw.get("error"):
        # The engine's own message is often "see root cause above"; the log names the cause.
        error = logged if logged and measure.classify("failed", logged) == "unsupported" else raw["error"]
        return "failed", error
    if code == 137 and memory:
        return "failed", f"container killed (exit 137): out of memory at its {memory} limit, or killed from outside"
    if code == 137:
        return "failed", "container killed (exit 137: out of memory or SIGKILL)"
    return "failed", logged or f"container exited with code {code} before reporting"


def main_run_cell(args) -> int:
    """CLI entry: `cellbench run-cell --cell JSON ...`."""
    cell = json.loads(args.cell)
    manifest = json.loads(Path(args.image_manifest).read_text())
    try:
        status = run_cell(
            cell,
            study=args.study,
            config_hash=args.config_hash,
            machine=args.machine_id,
            image_manifest=manifest,
            model_dir=Path(args.model_dir),
            round=args.round,
            runtime=args.runtime,
        )
    except Interrupted as exc:
        print(f"cellbench: cell {cell['id']} interrupted by {exc}; container removed, nothing written", file=sys.stderr)
        return 130
    except (RunnerError, lifecycle.RuntimeUnavailable) as exc:
        print(f"cellbench: cell {cell['id']} not run: {exc}; nothing written", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = exc.filename or paths.cell_dir(cell["id"])
        print(f"cellbench: cell {cell['id']}: no space left on the device of {where}; nothing written", file=sys.stderr)
        return 1
    print(f"cellbench: cell {cell['id']}: {status}", file=sys.stderr)
    line = progress.study_progress()
    if line:
        progress.emit(line)
    return 0
