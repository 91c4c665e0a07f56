"""Every output path is a pure function of ids (relative to the working directory)."""

import json
from pathlib import Path

RESULTS = Path("results")
LOGS = RESULTS / "logs"


def image_manifest(image: str) -> Path:
    return RESULTS / "images" / f"{image}.json"


def image_archive(image: str) -> Path:
    """`docker save` of an image on shared storage, for nodes (or runtimes) that lack it."""
    return RESULTS / "images" / f"{image}.tar"


def model_dir(model: str) -> Path:
    return RESULTS / "models" / model


def model_manifest(model: str) -> Path:
    return model_dir(model) / "manifest.json"


def cell_dir(cell_id: str) -> Path:
    return RESULTS / "cells" / cell_id


# A round is one container and engine load of a cell; its files live in their own folder.
ROUND_DIR = "round-{round}"
ROUND_FILES = ("metrics.parquet", "provenance.json", "engine.log")


def round_dir(cell_id: str, round: int | str) -> Path:
    return cell_dir(cell_id) / ROUND_DIR.format(round=round)


def cell_metrics(cell_id: str, round: int | str) -> Path:
    return round_dir(cell_id, round) / "metrics.parquet"


def cell_provenance(cell_id: str, round: int | str) -> Path:
    return round_dir(cell_id, round) / "provenance.json"


def cell_log(cell_id: str, round: int | str) -> Path:
    return round_dir(cell_id, round) / "engine.log"


def cell_rounds(cells: dict) -> list[tuple[str, int]]:
    """(cell id, round) of every round of a study's cells, round numbers from 1."""
    return [(cell_id, k) for cell_id in sorted(cells) for k in range(1, cells[cell_id]["sweep"]["rounds"] + 1)]


def round_files(cells: dict, name: str = "metrics.parquet") -> list[Path]:
    return [round_dir(cell_id, k) / name for cell_id, k in cell_rounds(cells)]


def runs_dir() -> Path:
    """Snapshots of this machine's rows, one per aggregation that changed them (`cellbench compare`)."""
    return RESULTS / "runs"


def imported_dir() -> Path:
    return RESULTS / "imported"


def study_file() -> Path:
    """The study the tables were made for (config.study_record), rewritten only when it changes:
    an input of the table rules, so switching studies rebuilds them without Snakemake's metadata."""
    return RESULTS / "study.json"


def study_round_files(study_file: Path, name: str = "metrics.parquet") -> list[Path]:
    """round_files of the cells a study record (study_file()) lists with their rounds."""
    cells = json.loads(Path(study_file).read_text())["cells"]
    return round_files({cell_id: {"sweep": {"rounds": rounds}} for cell_id, rounds in cells.items()}, name)


def summary() -> Path:
    return RESULTS / "summary.parquet"


def tables_dir() -> Path:
    return RESULTS / "tables"


def model_inputs(spec: dict, root: Path) -> dict:
    """What preparing a model depends on: an hf-cache model only on the hub cache (no image, no
    converter), so changing the converter never reruns the GPU cells."""
    if spec["source"] == "hf-cache":
        return {}
    return {"image": image_manifest(spec["prepare_image"]), "converter": root / "scripts" / "convert_gguf.py"}
