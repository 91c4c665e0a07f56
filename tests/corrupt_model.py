"""A deliberately corrupted copy of a prepared model, for quality fault tests: one tensor of its
safetensors zeroed, served from a Hugging Face hub cache (`source: hf-cache`).

safetensors is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and `data_offsets` (begin, end: bytes after the header), then the raw bytes; zeroing a
tensor is writing zeros over its range, no torch needed. Zeroing `model.norm.weight` (the final
RMSNorm's scale) makes every hidden state zero before the LM head: the model still loads and runs
at full speed, and its every next-token distribution is uniform.

    repo = corrupted_hub(prepared_model_dir, hub)           # hub/models--cellbench-test--...
    study["models"]["broken"] = hub_model()                  # with HF_HUB_CACHE=hub for the run
"""

import json
import os
import shutil
import struct
from pathlib import Path

REPO_ID = "cellbench-test/SmolLM2-135M-corrupted"
COMMIT = "c0ffee0000000000000000000000000000000000"
TENSOR = "model.norm.weight"


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    """(first byte, end byte) of a tensor's data in a safetensors file."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    if name not in header:
        tensors = sorted(key for key in header if key != "__metadata__")
        raise KeyError(f"{path.name} has no tensor {name!r} ({len(tensors)} tensors, e.g. {tensors[:3]})")
    begin, end = header[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def zero_tensor(source: Path, dest: Path, name: str = TENSOR) -> tuple[int, int]:
    """Copy a safetensors file with one tensor's bytes zeroed; return the zeroed byte range."""
    first, end = tensor_range(source, name)
    shutil.copyfile(source, dest)
    with open(dest, "r+b") as file:
        file.seek(first)
        file.write(bytes(end - first))
    return first, end


def corrupted_hub(model_dir: Path, hub: Path, name: str = TENSOR, repo_id: str = REPO_ID) -> Path:
    """A hub cache under `hub` holding the prepared model of `model_dir` (its safetensors, config
    and tokenizer; not its GGUF or manifest) with tensor `name` zeroed, laid out as huggingface_hub
    does (blobs/, snapshots/<commit>/ symlinks, refs/main); returns the repo folder."""
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file() or path.name == "manifest.json" or path.suffix == ".gguf":
            continue
        blob = repo / "blobs" / f"blob-{path.name}"
        if path.suffix == ".safetensors":
            zero_tensor(path, blob, name)
        else:
            shutil.copyfile(path, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    return repo


def hub_model(repo_id: str = REPO_ID) -> dict:
    """The study's `models` entry of the corrupted model (run with HF_HUB_CACHE set to the hub)."""
    return {"source": "hf-cache", "repo_id": repo_id}
