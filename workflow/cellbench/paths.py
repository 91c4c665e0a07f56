"""Every path of the results layout, as a pure function of ids: the one place that spells it.

Rules, modules and scripts call these functions instead of writing "results/..." themselves
(tests/test_paths.py holds them to it). Paths are relative to the working directory; a function's
`results` argument takes another root with the same shapes: `Path()` for the relative names inside
an archive, or an imported archive's folder.

    results/                            RESULTS
      images/<image>.json               image_manifest       build_image
      images/<image>.tar                image_archive        `docker save` on shared storage
      images/<image>.tar.json           image_archive_record its image id and sha256
      models/<model>/                   model_dir            prepare_model
      models/<model>/manifest.json      model_manifest
      cells/<cell_id>/                  cell_dir
        round-<k>/                      round_dir            run_cell, one per round
          metrics.parquet               cell_metrics
          provenance.json               cell_provenance
          engine.log                    cell_log
          telemetry.parquet             cell_telemetry       the host's samples of the container
          bench-serve/<level>.json      serve_result         a serve load level, vLLM's result JSON
        .run-<run_id>/                  run_dir              a round in progress; removed after it
      summary.parquet                   summary              aggregate
      tables/                           tables_dir
        summary.md, summary.csv         summary_markdown, summary_csv
        machines.md, machines.csv       machines_markdown, machines_csv
        diagnostics.md, verdicts.md     diagnostics, verdicts    explain
      plots/<name>.png                  plots_dir, plot
      report/index.html                 report_html
      runs/<stamp>.parquet              runs_dir             `cellbench compare` snapshots
      archive/<machine>-<stamp>.tar.gz  archive_dir          `cellbench archive`
      imported/<machine>/<archive_id>/  imported_dir, imported_archive: cells/ as above
      logs/                             LOGS
        images/<image>.log              image_log
        models/<model>.log              model_log
        cells/<cell_id>/round-<k>.log   round_log
        <step>.log                      step_log             aggregate, explain, archive

Snakemake rules pass the wildcards below as ids (`paths.cell_metrics(paths.CELL_ID, paths.ROUND)`),
so a rule's patterns are these same functions, and constrain them with the shapes below.
"""

import json
import re
from collections.abc import Iterable
from pathlib import Path

# The checkout: Snakefile, scripts/, containers/ (the code, not the results).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = PROJECT_ROOT / "scripts"
# Set by the Snakefile to its own checkout, for the `cellbench` its rules call: one installed from
# another checkout would build that checkout's recipes and record that checkout's commit.
CHECKOUT_ENV = "CELLBENCH_CHECKOUT"
# The quality texts shipped with the package (their source: data/quality/SOURCE.md).
QUALITY_DIR = Path(__file__).resolve().with_name("data") / "quality"
QUALITY_REFERENCE = QUALITY_DIR / "reference.txt"  # the passage every cell scores (NLL)
QUALITY_PROMPTS = QUALITY_DIR / "prompts.json"  # the prompts every cell continues greedily
# Prompt sets shipped with the package, `dataset: {kind: shipped, name: NAME}` (data/prompts/SOURCE.md).
PROMPTS_DIR = Path(__file__).resolve().with_name("data") / "prompts"

RESULTS = Path("results")
LOGS = RESULTS / "logs"
CELLS_DIR = "cells"

# Wildcards of the rules, and what each may match.
CELL_ID = "{cell_id}"
ROUND = "{round}"
IMAGE = "{image}"
MODEL = "{model}"
# The shape of a cell id (its name, "-", config.cell_hash), not an alternation of
# every id: that regex makes 10k-cell DAGs slow.
CELL_ID_SHAPE = r"[a-z0-9_.-]+-[0-9a-f]{10}"
ROUND_SHAPE = r"[1-9][0-9]*"


def one_of(names: Iterable[str]) -> str:
    """A wildcard constraint that matches exactly these names (images, models of a study)."""
    return "|".join(re.escape(name) for name in names)


def image_manifest(image: str, results: Path = RESULTS) -> Path:
    return results / "images" / f"{image}.json"


def image_archive(image: str, results: Path = RESULTS) -> Path:
    """`docker save` of an image on shared storage, for nodes (or runtimes) that lack it."""
    return results / "images" / f"{image}.tar"


def image_archive_record(archive: Path) -> Path:
    """What an image archive holds (image id, sha256, bytes), checked before it is loaded."""
    return archive.with_name(archive.name + ".json")


def model_dir(model: str, results: Path = RESULTS) -> Path:
    return results / "models" / model


# A prepared model's folder holds its manifest beside the files (an hf-cache model's stay in the hub).
MODEL_MANIFEST = "manifest.json"


def model_manifest(model: str, results: Path = RESULTS) -> Path:
    return model_dir(model, results) / MODEL_MANIFEST


def cell_dir(cell_id: str, results: Path = RESULTS) -> Path:
    return results / CELLS_DIR / cell_id


# A round is one container and engine load of a cell; its files live in their own folder.
ROUND_DIR = "round-{round}"
# ROUND_FILES are the round's record, archived and imported whole (archive.CELL_FILES); the
# telemetry is published with them (ROUND_OUTPUTS) but not archived: archives stay as they were.
ROUND_FILES = ("metrics.parquet", "provenance.json", "engine.log")
ROUND_TELEMETRY = "telemetry.parquet"
# A profiled cell's ops (cellbench.profiles; no rows when the round took no profile) and, only
# when one was taken, its Chrome trace beside them (not a Snakemake output: most rounds have none).
ROUND_PROFILE = "profile.parquet"
ROUND_PROFILE_TRACE = "profile.trace.json.gz"
ROUND_OUTPUTS = (*ROUND_FILES, ROUND_TELEMETRY, ROUND_PROFILE)


def round_dir(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    return cell_dir(cell_id, results) / ROUND_DIR.format(round=round)


def cell_metrics(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    return round_dir(cell_id, round, results) / "metrics.parquet"


def cell_provenance(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    return round_dir(cell_id, round, results) / "provenance.json"


def cell_log(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    """The engine's log of a round (the container's output), a result like its metrics."""
    return round_dir(cell_id, round, results) / "engine.log"


def cell_telemetry(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    """CPU, memory (and GPU) samples of the round's container over time (cellbench.telemetry)."""
    return round_dir(cell_id, round, results) / ROUND_TELEMETRY


def cell_profile(cell_id: str, round: int | str = 1, results: Path = RESULTS) -> Path:
    """The round's profile: op, calls, self and total µs per step, share of the step, phase."""
    return round_dir(cell_id, round, results) / ROUND_PROFILE


def cell_profile_trace(cell_id: str, round: int | str = 1, results: Path = RESULTS) -> Path:
    """The round's profiler trace, gzipped Chrome-trace JSON (Perfetto, chrome://tracing)."""
    return round_dir(cell_id, round, results) / ROUND_PROFILE_TRACE


# A serve cell's load levels, each also as the JSON `vllm bench serve --save-result` writes
# (cellbench.measure.bench_serve_results), beside the round's rows; not archived, like telemetry.
ROUND_SERVE_RESULTS = "bench-serve"


def serve_results_dir(cell_id: str, round: int | str, results: Path = RESULTS) -> Path:
    return round_dir(cell_id, round, results) / ROUND_SERVE_RESULTS


def serve_result(cell_id: str, round: int | str, name: str, results: Path = RESULTS) -> Path:
    """One load level's vLLM-format result: `name` from cellbench.serving.result_name."""
    return serve_results_dir(cell_id, round, results) / f"{name}.json"


RUN_DIR_PREFIX = ".run-"


def run_dir(cell_id: str, run_id: str, results: Path = RESULTS) -> Path:
    """Where a round runs (a hidden folder beside its rounds, on their file system, so that
    publishing its files is a rename); removed when the round ends."""
    return cell_dir(cell_id, results) / f"{RUN_DIR_PREFIX}{run_id}"


def run_dirs(results: Path = RESULTS) -> list[Path]:
    """Every cell's run directories: rounds in progress, or left by a runner that was killed."""
    return sorted((results / CELLS_DIR).glob(f"*/{RUN_DIR_PREFIX}*"))


def cell_rounds(cells: dict) -> list[tuple[str, int]]:
    """(cell id, round) of every round of a study's cells, round numbers from 1."""
    return [(cell_id, k) for cell_id in sorted(cells) for k in range(1, cells[cell_id]["sweep"]["rounds"] + 1)]


def round_files(cells: dict, name: str = "metrics.parquet") -> list[Path]:
    return [round_dir(cell_id, k) / name for cell_id, k in cell_rounds(cells)]


def summary(results: Path = RESULTS) -> Path:
    """Every row of the study and of imported archives, with provenance."""
    return results / "summary.parquet"


def aggregate_cache(results: Path = RESULTS) -> Path:
    """What `cellbench aggregate` keeps between runs so that it reads only the metrics files that
    changed (cellbench.rowcache); deleting it costs one full aggregation, nothing else."""
    return results / "cache" / "aggregate"


def progress_cache(results: Path = RESULTS) -> Path:
    """What each round's study line keeps of the rounds' provenance (cellbench.progress), so that
    it reads only the rounds finished since; safe to delete."""
    return results / "cache" / "progress.json"


def tables_dir(results: Path = RESULTS) -> Path:
    return results / "tables"


def _table_file(name: str):
    """A file of the tables folder: f(tables=None) -> tables_dir() / name, or the given folder's."""

    def path(tables: Path | None = None) -> Path:
        return (tables or tables_dir()) / name

    path.__doc__ = f"tables/{name} (of tables_dir() unless a folder is given)"
    return path


summary_markdown = _table_file("summary.md")
summary_csv = _table_file("summary.csv")
machines_markdown = _table_file("machines.md")
machines_csv = _table_file("machines.csv")
diagnostics = _table_file("diagnostics.md")
verdicts = _table_file("verdicts.md")


def plots_dir(results: Path = RESULTS) -> Path:
    return results / "plots"


# The plots the explain step draws, in order.
PLOTS = (
    "throughput.png",
    "latency.png",
    "machines.png",
    "quality.png",
    "telemetry.png",
    "serve-latency.png",
    "serve-goodput.png",
)


def plot(name: str, plots: Path | None = None) -> Path:
    if name not in PLOTS:
        raise ValueError(f"{name}: not a plot of cellbench ({', '.join(PLOTS)})")
    return (plots or plots_dir()) / name


def report_html(results: Path = RESULTS) -> Path:
    return results / "report" / "index.html"


def runs_dir(results: Path = RESULTS) -> Path:
    """Snapshots of this machine's rows, one per aggregation that changed them (`cellbench compare`)."""
    return results / "runs"


def archive_dir(results: Path = RESULTS) -> Path:
    """Archives this machine packed to share (`cellbench archive`)."""
    return results / "archive"


def imported_dir(results: Path = RESULTS) -> Path:
    return results / "imported"


def study_file(results: Path = RESULTS) -> Path:
    """The study the tables were made for (config.study_record), rewritten only when it changes:
    an input of the table rules, so switching studies rebuilds them without Snakemake's metadata."""
    return results / "study.json"


def study_round_files(study_file: Path, name: str = "metrics.parquet") -> list[Path]:
    """round_files of the cells a study record (study_file()) lists with their rounds."""
    cells = json.loads(Path(study_file).read_text())["cells"]
    return round_files({cell_id: {"sweep": {"rounds": rounds}} for cell_id, rounds in cells.items()}, name)


def imported_archive(machine_id: str, archive_id: str, results: Path = RESULTS) -> Path:
    """An imported archive, unpacked: the shapes of results/ (cells/..., images/..., models/...)."""
    return imported_dir(results) / machine_id / archive_id


def imported_metrics_patterns(results: Path = RESULTS) -> list[Path]:
    """Glob patterns of every imported metrics file: one per round; archives made before rounds
    hold one per cell (cells/<cell_id>/metrics.parquet)."""
    archives = imported_archive("*", "*", results)
    return [cell_metrics("*", "*", archives), cell_dir("*", archives) / "metrics.parquet"]


def imported_metrics(results: Path = RESULTS) -> list[str]:
    """Imported metrics files to aggregate: per machine and cell, only the newest archive's
    (archive ids are UTC stamps), so a machine that shared twice is not counted twice."""
    import glob

    files = [file for pattern in imported_metrics_patterns(results) for file in glob.glob(str(pattern))]
    return newest_per_machine_cell(sorted(files))


def newest_per_machine_cell(files: list[str]) -> list[str]:
    """.../imported/<machine>/<archive>/cells/<cell>/[round-<k>/]metrics.parquet: keep the files
    of the greatest archive per (machine, cell)."""
    newest: dict[tuple[str, str], str] = {}
    found = []
    for path in files:
        parts = Path(path).parts
        at = len(parts) - 1 - parts[::-1].index(CELLS_DIR)
        machine, archive, cell = parts[at - 2], parts[at - 1], parts[at + 1]
        found.append((machine, cell, archive, path))
        newest[(machine, cell)] = max(archive, newest.get((machine, cell), archive))
    return sorted(path for machine, cell, archive, path in found if archive == newest[(machine, cell)])


def image_log(image: str) -> Path:
    return LOGS / "images" / f"{image}.log"


def model_log(model: str) -> Path:
    return LOGS / "models" / f"{model}.log"


def round_log(cell_id: str, round: int | str) -> Path:
    """Snakemake's log of a round's job (the runner's messages; the engine's are cell_log)."""
    return LOGS / CELLS_DIR / cell_id / f"{ROUND_DIR.format(round=round)}.log"


def step_log(step: str) -> Path:
    """The log of a study-wide step: aggregate, explain, archive."""
    return LOGS / f"{step}.log"


def model_inputs(spec: dict, root: Path) -> dict:
    """What preparing a model depends on: an hf-cache model only on the hub cache (no image, no
    converter), so changing the converter never reruns the GPU cells."""
    if spec["source"] == "hf-cache":
        return {}
    return {"image": image_manifest(spec["prepare_image"]), "converter": root / "scripts" / "convert_gguf.py"}


def other_checkout(environ) -> str | None:
    """The checkout a Snakefile asked for (CHECKOUT_ENV) when this code is not from it, else None."""
    wanted = environ.get(CHECKOUT_ENV)
    if not wanted or Path(wanted).resolve() == PROJECT_ROOT:
        return None
    return wanted
