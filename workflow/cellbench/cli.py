"""`cellbench` command: the steps Snakemake rules call, and a few for people."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Only what `run-cell` needs loads here: it runs once per cell, and every other module's import
# time would be paid by every cell. The others load in the commands that use them.
from . import (
    atomic,
    config,
    devices,
    images,
    lifecycle,
    metrics,
    models,
    paths,
    provenance,
    runner,
    runtimes,
    slots,
)

DEFAULT_STUDY = "config/config.yaml"


def _study(path: str) -> dict:
    return config.read(path)[1]


def cmd_validate(args) -> int:
    study = _study(args.configfile)
    for cell in study["cells"].values():
        print(cell["id"])
    print(f"{args.configfile}: ok, {len(study['cells'])} cells", file=sys.stderr)
    return 0


def cmd_build_image(args) -> int:
    manifest = images.build_image(args.name, json.loads(args.spec), Path(args.out), Path(args.log))
    verb = "reused" if manifest["reused_existing_image"] else "built"
    print(f"cellbench: image {args.name}: {verb} {manifest['tag']} ({manifest['image_id'][:19]})", file=sys.stderr)
    if args.name in os.environ.get(runtimes.ARCHIVES_ENV, "").split(","):  # asked by profiles/slurm
        save_archive(Path(args.out))
    return 0


def save_archive(manifest_path: Path, verify: bool = False) -> None:
    archive, saved = runtimes.save_manifest_archive(manifest_path, verify)
    print(f"cellbench: image {archive.stem}: {'saved' if saved else 'already in'} {archive}", file=sys.stderr)


def cmd_save_image(args) -> int:
    for manifest in args.manifest:  # by hand: a damaged archive of the same size is saved again
        save_archive(Path(manifest), verify=True)
    return 0


def cmd_prepare_model(args) -> int:
    spec = json.loads(args.spec)
    if spec["source"] == "hf-cache":
        from . import hfcache

        prepared = hfcache.prepare(args.name, spec, Path(args.out_dir), Path(args.log), dict(os.environ))
        print(f"cellbench: model {args.name}: {spec['repo_id']}@{prepared['commit']}, {len(prepared['files'])} files")
        return 0
    manifest = json.loads(Path(args.image_manifest).read_text())
    prepared = models.prepare_pypi_gguf(args.name, spec, manifest, Path(args.out_dir), Path(args.log))
    print(f"cellbench: model {args.name}: {len(prepared['files'])} files, sample {prepared['smoke']['greedy']!r}")
    return 0


def cmd_run_cell(args) -> int:
    # Shared first: the chmod moves ctime, which would invalidate the stamp check_checksums leaves behind.
    models.share_for_reading(Path(args.model_dir))  # models prepared before cells ran unprivileged
    models.check_checksums(Path(args.model_dir))
    args.runtime = args.runtime or runtimes.runtime_from_env()
    return runner.main_run_cell(args)


def _quality_tolerance(args) -> dict:
    """The study's quality tolerances, from its record (results/study.json) when given."""
    from . import quality

    record = json.loads(Path(args.study_file).read_text()) if getattr(args, "study_file", None) else None
    return quality.tolerance(record)


def _points(args):
    """summary.parquet -> the point table (cellbench.aggregate.cell_points): once per command."""
    from . import aggregate

    statistics = json.loads(args.statistics) if args.statistics else None
    tolerance = _quality_tolerance(args)
    points = aggregate.cell_points(metrics.scan_metrics([args.summary]), args.baseline_id, statistics, tolerance)
    return points, statistics, tolerance


# polars' allocator (jemalloc, read from this variable when polars loads: pola-rs/polars#23128)
# keeps freed pages 10 s by default, so an aggregation of 10,000 cells still held ~400 MB of its
# points stage while it wrote the tables, and peaked over 1 GB. Half a second brought the peak
# under 1 GB at no measured cost; 0 cost 50 % more time (docs/pipeline-benchmarks.md). A value
# the user set wins.
POLARS_ALLOCATOR = ("_RJEM_MALLOC_CONF", "dirty_decay_ms:500,muzzy_decay_ms:0")


def cmd_aggregate(args) -> int:
    import time

    os.environ.setdefault(*POLARS_ALLOCATOR)  # before polars is imported, below
    from . import compare, machines, profiles, report, rowcache

    files = list(args.metrics)
    if args.study_file:  # the study's own rounds, from the file: a list on the command line has a size limit
        files = [str(path) for path in paths.study_round_files(Path(args.study_file))] + files
    cache = None if args.no_cache else Path(args.cache or paths.aggregate_cache(Path(args.summary).parent))
    rows = rowcache.combine(files, args.summary, cache)
    started = time.perf_counter()
    table = None  # the points in polars, where the cache gave them so: summary.csv is written from them
    if rows.folder is None:  # a full aggregation: no cache to keep points in
        points, statistics, tolerance = _points(args)
    else:
        from . import aggregate, pointcache, stats

        stats.load_quantiles(rows.folder / pointcache.QUANTILES)
        statistics = json.loads(args.statistics) if args.statistics else None
        tolerance = _quality_tolerance(args)
        table, kept = pointcache.cell_points(rows, args.baseline_id, statistics, tolerance, as_polars=True)
        points = aggregate.to_pandas(table)
        print(f"cellbench: points: {kept.line()}")
    took = {"points": time.perf_counter() - started}
    confidence = config.statistics({"statistics": statistics or {}})["confidence"]
    where = (
        profiles.markdown_section(profiles.report_sections(Path(args.study_file), baseline=args.baseline_name))
        if args.study_file
        else []
    )
    written = report.write_tables(
        points, args.study, args.baseline_name, Path(args.tables), confidence, tolerance, extra=where, table=table
    )
    written += machines.write_tables(points, args.machine_id, Path(args.tables))
    if rows.folder is not None:
        stats.save_quantiles(rows.folder / pointcache.QUANTILES)
    took["tables"] = time.perf_counter() - started - took["points"]
    print("cellbench: tables: " + ", ".join(str(p) for p in written))
    run = compare.snapshot(Path(args.summary), args.machine_id or provenance.machine_id(None))
    took["snapshot"] = time.perf_counter() - started - took["points"] - took["tables"]
    if run:
        print(f"cellbench: this machine's rows kept as run {run.stem} (cellbench compare {run.stem} LATER_RUN)")
    # Where an aggregation's time went (benchmarks/aggregate_scale.py reads this line).
    print(f"cellbench: aggregate: {rows.line()}; " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()))
    return 0


def cmd_report(args) -> int:
    """summary.parquet -> diagnostics.md, verdicts.md, plots and the HTML report."""
    # matplotlib only where plots are drawn
    from . import diagnostics, expectations, plots, profiles, report_html, telemetry, verdicts

    points, _, tolerance = _points(args)
    points = verdicts.with_roofline(points, json.loads(args.bandwidth)) if not points.empty else points
    cells = diagnostics.cells(points)
    found = expectations.verdicts(points, json.loads(args.expectations))
    sentences = expectations.ratio_sentences(points, args.baseline_name)
    tables, html_path = Path(args.tables), Path(args.html)
    atomic.write_text(paths.diagnostics(tables), diagnostics.diagnostics_markdown(cells, args.study))
    verdicts_md = verdicts.verdicts_markdown(found, sentences, points, args.study, tolerance)
    atomic.write_text(paths.verdicts(tables), verdicts_md)
    rounds = telemetry.report_rounds(Path(args.study_file)) if args.study_file else []
    drawn = plots.write_plots(points, Path(args.plots), rounds)
    where = profiles.report_sections(Path(args.study_file), baseline=args.baseline_name) if args.study_file else []
    page = report_html.page(
        args.study, args.baseline_name, points, found, sentences, cells, drawn, html_path, tolerance, where
    )
    atomic.write_text(html_path, page)
    print(f"cellbench: report: {html_path}, {paths.diagnostics(tables)}, {paths.verdicts(tables)}")
    return 0


def cmd_rerun(args) -> int:
    """Rerun exactly one cell (and the tables after it); other cells are untouched."""
    study = _study(args.configfile)
    matches = [c for c in study["cells"].values() if args.cell in (c["id"], c["name"])]
    if not matches:
        names = ", ".join(sorted(c["name"] for c in study["cells"].values()))
        print(f"cellbench: no cell named {args.cell!r} in {args.configfile} (cells: {names})", file=sys.stderr)
        return 2
    # Every round of the cell, interleaved with nothing else: the other cells' rounds stand.
    targets = [str(path) for path in paths.round_files({matches[0]["id"]: matches[0]})]
    snakefile = str(paths.PROJECT_ROOT / "Snakefile")
    argv = [
        "snakemake",
        "--cores",
        "1",
        "--snakefile",
        snakefile,
        "--configfile",
        args.configfile,
        "--forcerun",
        *targets,
    ]
    print("$ " + " ".join(argv), file=sys.stderr)
    return subprocess.run(argv).returncode


def cmd_compare(args) -> int:
    """Two runs of a study on this machine (or two results folders), cell by cell and point by point."""
    from . import compare

    if not 0 < args.confidence < 1:
        print(
            f"cellbench: --confidence {args.confidence}: expected a level between 0 and 1, e.g. 0.95", file=sys.stderr
        )
        return 2
    try:
        a, b = compare.load(args.run_a), compare.load(args.run_b)
        table = compare.compare(a, b, args.confidence)
    except compare.CompareError as exc:
        print(f"cellbench: {exc}", file=sys.stderr)
        return 2
    print(compare.render(table, args.run_a, args.run_b, args.confidence))
    return 0


def cmd_profile_diff(args) -> int:
    """Two profiled cells of the study: which ops grew or shrank, per profiled step."""
    from . import profiles

    cells = _study(args.configfile)["cells"]
    try:
        a, b = profiles.find(cells, args.cell_a), profiles.find(cells, args.cell_b)
        frame_a, frame_b = profiles.load(a, paths.RESULTS), profiles.load(b, paths.RESULTS)
    except profiles.ProfileError as exc:
        print(f"cellbench: {exc}", file=sys.stderr)
        return 2
    print(profiles.diff_text(a["name"], b["name"], frame_a, frame_b, args.top))
    return 0


def cmd_runs(args) -> int:
    from . import compare

    runs = compare.list_runs()
    print("\n".join(runs) if runs else "no runs yet: `snakemake --cores 1` keeps one each time the tables change")
    return 0


def cmd_archive(args) -> int:
    from . import archive

    if args.study_file:  # the rule: the study as the pipeline resolved it (config.study_record)
        study = json.loads(Path(args.study_file).read_text())["config"]
    elif args.config_json:
        study = json.loads(args.config_json)
    else:
        study = config.load_study(args.configfile)
    resolved = config.resolve(study)
    target, manifest, missing = archive.create(
        study,
        resolved,
        machine_id=args.machine_id,
        git_sha=provenance.git_sha(),
        results=paths.RESULTS,
        out_dir=Path(args.out_dir),
        with_images=args.with_images,
        log=sys.stderr,
    )
    cells = sum(rel.endswith("/metrics.parquet") for rel in manifest["members"])
    size_mb = target.stat().st_size / 2**20
    print(
        f"cellbench: archived {cells} cells of {resolved['study']} from {args.machine_id}: {target} ({size_mb:.1f} MB)"
    )
    if missing:
        print(f"cellbench: {len(missing)} cells not run yet, not archived: {', '.join(missing)}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from . import archive

    defaults = archive.Limits()
    limits = archive.Limits(
        archive_bytes=defaults.archive_bytes if args.max_archive_mb is None else args.max_archive_mb * archive.MiB,
        member_bytes=defaults.member_bytes if args.max_member_mb is None else args.max_member_mb * archive.MiB,
    )
    try:
        outcome, target = archive.import_archive(Path(args.file), paths.RESULTS, args.machine_id, limits)
    except archive.ArchiveError as exc:
        print(f"cellbench: import {args.file}: refused: {exc}", file=sys.stderr)
        return 2
    if outcome == "unchanged":
        print(f"cellbench: {args.file} is already imported in {target}; nothing to do")
    else:
        print(f"cellbench: imported {args.file} into {target}; run `snakemake --cores 1` to refresh the tables")
    return 0


def _origin(value: str) -> str:
    """--origin: a working directory's path. Empty would mean every origin, and a control
    character could never have been a working directory snakemake ran in."""
    if not value or not value.isprintable():
        raise argparse.ArgumentTypeError(f"{config.quote(value)} is not a folder's path")
    return value


def cmd_clean(args) -> int:
    """Remove leftover cell containers and run folders: those whose runner process is gone."""
    if not (args.containers or args.runs):
        print("cellbench: clean: say what to clean (--containers, --runs)", file=sys.stderr)
        return 2
    if args.runs:
        results = Path(args.origin or ".") / paths.RESULTS
        if not results.is_dir():
            print(
                f"cellbench: clean: no results folder at {config.quote(str(results))} "
                "(run it where snakemake ran, or give --origin that folder)",
                file=sys.stderr,
            )
            return 2
        removed_dirs = lifecycle.remove_stale_run_dirs(results)
        for work in removed_dirs:
            print(f"removed {work}")
        print(
            f"cellbench: clean: {len(removed_dirs)} run folder(s) of killed runners in {results} removed",
            file=sys.stderr,
        )
        if not args.containers:
            return 0
    args.runtime = args.runtime or runtimes.runtime_from_env()
    lifecycle.ensure_runtime(args.runtime)
    removed = lifecycle.remove_leftovers(args.runtime, args.origin)
    for container in removed:
        print(f"removed {container['name']} ({container['state']})")
    scope = f"of {Path(args.origin).resolve()}" if args.origin else "of every origin"
    print(f"cellbench: clean: {len(removed)} leftover container(s) {scope} removed", file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    """Machine checks, measurement stability, then what the study needs; exit 1 when the study cannot run here."""
    from . import doctor

    try:
        study, resolved = config.read(args.configfile)
        cells = list(resolved["cells"].values())
    except config.ConfigError as exc:
        print(doctor.report([doctor.Check(doctor.FAIL, str(exc))]))
        return 2
    facts = doctor.gather(study, dict(os.environ))
    machine = doctor.machine_checks(facts)
    needs = doctor.study_checks(facts, study, cells)
    print("this machine:\n" + doctor.report(machine))
    # Never part of the conclusion: an unquiet host measures badly but still measures.
    print("measurement stability:\n" + doctor.report(doctor.stability_checks(facts["stability"])))
    print(f"study {study['study']} ({args.configfile}, {len(cells)} cells):\n" + doctor.report(needs))
    final = doctor.conclusion(args.configfile, machine + needs)
    print(doctor.report([final]))
    return 0 if final.mark == doctor.OK else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a study and list its cell ids")
    p.add_argument("configfile", nargs="?", default=DEFAULT_STUDY)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("rerun", help="rerun one cell by name or id, then the tables")
    p.add_argument("cell")
    p.add_argument("--configfile", default=DEFAULT_STUDY)
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("compare", help="two runs (ids from `cellbench runs`, or results folders), with significance")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--confidence", type=float, default=0.95)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile-diff", help="two profiled cells: which ops grew or shrank, in share of the step")
    p.add_argument("cell_a")
    p.add_argument("cell_b")
    p.add_argument("--top", type=int, default=10, help="ops shown, by the size of their share change")
    p.add_argument("--configfile", default=DEFAULT_STUDY)
    p.set_defaults(func=cmd_profile_diff)

    p = sub.add_parser("runs", help="runs of this machine kept for `cellbench compare`")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "clean", help="remove leftover containers and run folders of cellbench runs whose runner is gone"
    )
    p.add_argument("--containers", action="store_true", help="cell containers (label cellbench.cell)")
    p.add_argument("--runs", action="store_true", help="run folders of rounds whose runner was killed")
    p.add_argument("--origin", type=_origin, help="only those started from this working directory")
    p.add_argument("--runtime", choices=runtimes.RUNTIMES, help="default: CELLBENCH_RUNTIME, else docker")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("doctor", help="check this machine (Docker, GPUs, tools, disk) against a study")
    p.add_argument("--configfile", default=DEFAULT_STUDY)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("build-image", help="(rule) build an engine image and write its manifest")
    for flag in ("--name", "--spec", "--out", "--log"):
        p.add_argument(flag, required=True)
    p.set_defaults(func=cmd_build_image)

    p = sub.add_parser("save-image", help="docker save built images beside their manifests, for nodes that lack them")
    p.add_argument("--manifest", nargs="+", required=True, help=f"{paths.image_manifest('NAME')} of built images")
    p.set_defaults(func=cmd_save_image)

    p = sub.add_parser("prepare-model", help="(rule) prepare a model directory and its manifest")
    for flag in ("--name", "--spec", "--out-dir", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("--image-manifest", help="image that converts the model (pypi-gguf)")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("run-cell", help="(rule) run one cell in its container")
    for flag in ("--cell", "--study", "--config-hash", "--image-manifest", "--model-dir"):
        p.add_argument(flag, required=True)
    p.add_argument("--machine-id", default=None)
    p.add_argument("--round", type=int, default=1, help="round of the cell (a fresh container and engine load)")
    p.add_argument("--runtime", choices=runtimes.RUNTIMES, help="default: CELLBENCH_RUNTIME, else docker")
    p.set_defaults(func=cmd_run_cell)

    p = sub.add_parser("aggregate", help="(rule) all metrics -> summary.parquet and tables")
    for flag in ("--study", "--baseline-id", "--baseline-name", "--summary", "--tables"):
        p.add_argument(flag, required=True)
    p.add_argument("--machine-id", default=None, help="this machine: the reference of machines.md")
    p.add_argument("--statistics", default=None, help="the study's statistics settings as JSON")
    p.add_argument("--study-file", default=None, help=f"{paths.study_file()}: aggregate every round of its cells")
    p.add_argument("--cache", default=None, help=f"default: {paths.aggregate_cache()} beside --summary")
    p.add_argument("--no-cache", action="store_true", help="a full aggregation: read every metrics file")
    p.add_argument("metrics", nargs="*")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("archive", help=f"pack this machine's results of a study into {paths.archive_dir()}/*.tar.gz")
    p.add_argument("--configfile", default=DEFAULT_STUDY)
    p.add_argument("--config-json", default=None, help="the study as JSON instead of --configfile")
    p.add_argument("--study-file", default=None, help=f"(rule) {paths.study_file()} instead of --configfile")
    p.add_argument("--machine-id", default=None)
    p.add_argument("--out-dir", default=str(paths.archive_dir()))
    p.add_argument("--with-images", action="store_true", help="add `docker save` of the images (large)")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser(
        "import", help=f"verify an archive from another machine, then unpack it into {paths.imported_dir()}/"
    )
    p.add_argument("file")
    p.add_argument("--machine-id", default=None, help="this machine (an archive from it is refused)")
    p.add_argument("--max-archive-mb", type=int, help="refuse a larger archive, in MiB (default: the built-in limit)")
    p.add_argument("--max-member-mb", type=int, help="refuse a larger member, in MiB (default: the built-in limit)")
    p.set_defaults(func=cmd_import)

    # `explain` was its name before 2026-12: kept as an alias for scripts that call it.
    p = sub.add_parser(
        "report", aliases=["explain"], help="(rule) summary -> diagnostics, verdicts, plots, HTML report"
    )
    for flag in ("--summary", "--study", "--baseline-id", "--baseline-name", "--tables", "--plots", "--html"):
        p.add_argument(flag, required=True)
    p.add_argument("--expectations", default="[]", help="the study's expectations as JSON")
    p.add_argument("--bandwidth", default="{}", help="the study's bandwidth_gb_s as JSON")
    p.add_argument("--statistics", default=None, help="the study's statistics settings as JSON")
    p.add_argument("--study-file", default=None, help=f"{paths.study_file()}: quality tolerances, rounds' telemetry")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if wanted := paths.other_checkout(os.environ):
        print(
            f"cellbench: this cellbench runs the code in {config.quote(str(paths.PROJECT_ROOT))}, but the Snakefile "
            f"that called it is in {config.quote(wanted)}: install that checkout (`pip install -e DIR`, as its "
            "scripts/setup.sh does)",
            file=sys.stderr,
        )
        return 2
    try:
        if getattr(args, "machine_id", "unset") is None:
            args.machine_id = provenance.machine_id()  # CELLBENCH_MACHINE_ID is checked here
        return args.func(args)
    except OSError as exc:
        # A path given on the command line that the system refuses (too long, a loop, not
        # allowed): one line naming it, for every command, instead of a traceback.
        print(f"cellbench: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not isinstance(exc, _reported_errors()):
            raise
        print(f"cellbench: {exc}", file=sys.stderr)
        return 2


def os_error_line(exc: OSError) -> str:
    if exc.filename is None:
        return str(exc) or type(exc).__name__  # "[Errno 32] Broken pipe": the reason once
    return f"{config.quote(exc.filename)}: {exc.strerror or type(exc).__name__}"


def _reported_errors() -> tuple[type[Exception], ...]:
    """Errors a command reports in one line. The archive's only once a command loaded it: a
    command that did not load the module cannot raise its error."""
    errors = (
        config.ConfigError,
        images.ImageError,
        models.ModelError,
        metrics.SchemaError,
        runtimes.RuntimeSetupError,
        lifecycle.RuntimeUnavailable,
        devices.DeviceError,
        slots.SlotError,
    )
    archive = sys.modules.get(f"{__package__}.archive")
    return errors + ((archive.ArchiveError,) if archive else ())


if __name__ == "__main__":
    sys.exit(main())
