"""Every output path is a pure function of ids (relative to the working directory)."""

from pathlib import Path

RESULTS = Path("results")


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


def cell_metrics(cell_id: str) -> Path:
    return cell_dir(cell_id) / "metrics.parquet"


def cell_provenance(cell_id: str) -> Path:
    return cell_dir(cell_id) / "provenance.json"


def cell_log(cell_id: str) -> Path:
    return cell_dir(cell_id) / "engine.log"


def imported_dir() -> Path:
    return RESULTS / "imported"


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
