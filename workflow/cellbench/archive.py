"""Archives that carry one machine's results to another, and an import that trusts nothing.

An archive is a .tar.gz of regular files at fixed relative paths (the same shapes as results/)
plus MANIFEST.json with the sha256 and size of every other member. Import reads the whole
archive and checks every member, the manifest and the metrics before it writes anything; then
it unpacks into a temp dir beside the destination and renames it into place. It writes member
bytes itself (never tarfile's extract), so modes, owners, links and mtimes from the archive
never reach the disk, and a new import is newer than the tables built before it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import metrics, paths

FORMAT = "cellbench-archive"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
ID = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
ID_RE = re.compile(rf"^{ID}$")  # used with fullmatch: `$` alone also takes "name\n"
CELL_FILES = ("metrics.parquet", "provenance.json", "engine.log")
# Every path an archive may hold besides MANIFEST.json; anything else is refused.
MEMBER_RE = re.compile(
    rf"^(study/(config|resolved)\.json"
    # cells/<id>/round-<k>/...; archives made before rounds hold cells/<id>/... (one round).
    rf"|cells/{ID}/(round-[1-9][0-9]{{0,2}}/)?(metrics\.parquet|provenance\.json|engine\.log)"
    rf"|images/{ID}\.json|images/{ID}\.docker\.tar"
    rf"|models/{ID}/manifest\.json)$"
)
CHUNK = 1 << 20
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds an import enforces before reading further (a hostile archive can be a bomb)."""

    archive_bytes: int = 64 * 1024 * MiB  # the .tar.gz on disk
    total_bytes: int = 128 * 1024 * MiB  # all members, uncompressed
    member_bytes: int = 512 * MiB  # one data member (metrics, logs, manifests)
    image_bytes: int = 64 * 1024 * MiB  # one `docker save` member
    manifest_bytes: int = 16 * MiB
    members: int = 100_000


class ArchiveError(ValueError):
    """A refused archive; the message is one line naming the member (or the file) and the reason."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where!r}: {reason}")


def cellbench_version() -> str:
    try:
        return importlib_metadata.version("cellbench")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def check_id(kind: str, value) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ArchiveError(MANIFEST, f"{kind} {value!r} is not a plain name ([A-Za-z0-9_.-], not starting with '.')")
    return value


def _blocks(handle):
    while block := handle.read(CHUNK):
        yield block


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in _blocks(handle):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Creating an archive


def plan_members(study: dict, resolved: dict, results: Path) -> tuple[dict[str, Path], list[str]]:
    """Archive path -> file on disk for the study's cells that have results, their image and
    model manifests; and the ids of the study's cells that have none yet."""
    members: dict[str, Path] = {}
    missing = []
    images, models = set(), set()
    for cell_id, cell in sorted(resolved["cells"].items()):
        # Every round of the cell that finished (a round is its three files or nothing).
        rounds = [f"cells/{cell_id}/{paths.ROUND_DIR.format(round=k)}" for k in range(1, cell["sweep"]["rounds"] + 1)]
        rounds = [rel for rel in rounds if all((results / rel / name).is_file() for name in CELL_FILES)]
        if not rounds:
            missing.append(cell_id)
            continue
        for rel in rounds:
            for name in CELL_FILES:
                members[f"{rel}/{name}"] = results / rel / name
        images.add(cell["image"])
        models.add(cell["model"])
    for model in sorted(models):
        members[f"models/{model}/manifest.json"] = results / "models" / model / "manifest.json"
        if study["models"][model].get("prepare_image"):
            images.add(study["models"][model]["prepare_image"])
    for image in sorted(images):
        members[f"images/{image}.json"] = results / "images" / f"{image}.json"
    absent = [rel for rel, path in members.items() if not path.is_file()]
    if absent:
        raise ArchiveError(absent[0], f"expected at {members[absent[0]]} but it is missing; run snakemake first")
    return members, missing


def save_images(members: dict[str, Path], workdir: Path, log) -> dict[str, Path]:
    """`docker save` of every image whose manifest is archived, as images/<name>.docker.tar."""
    saved = {}
    for rel, path in sorted(members.items()):
        if not (rel.startswith("images/") and rel.endswith(".json")):
            continue
        manifest = json.loads(path.read_text())
        target = workdir / f"{manifest['name']}.docker.tar"
        done = subprocess.run(["docker", "save", "--output", str(target), manifest["tag"]], stderr=log)
        if done.returncode:
            raise ArchiveError(rel, f"docker save {manifest['tag']} failed (exit {done.returncode})")
        saved[f"images/{manifest['name']}.docker.tar"] = target
    return saved


def build_manifest(members: dict[str, Path], *, machine_id: str, created: datetime, study: str, git_sha) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema_version": metrics.SCHEMA_VERSION,
        "method_version": metrics.METHOD_VERSION,
        "cellbench_version": cellbench_version(),
        "git_sha": git_sha,
        "machine_id": machine_id,
        "archive_id": created.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": created.isoformat(timespec="seconds"),
        "study": study,
        "members": {
            rel: {"sha256": _sha256_file(path), "bytes": path.stat().st_size} for rel, path in sorted(members.items())
        },
    }


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(target: Path, manifest: dict, members: dict[str, Path]) -> None:
    """MANIFEST.json first, then the members in manifest order; written to a temp name and renamed."""
    mtime = datetime.fromisoformat(manifest["created_at"]).timestamp()

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz", compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
            data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
            tar.addfile(_tarinfo(MANIFEST, len(data), mtime), io.BytesIO(data))
            for rel in manifest["members"]:
                with open(members[rel], "rb") as handle:
                    tar.addfile(_tarinfo(rel, manifest["members"][rel]["bytes"], mtime), handle)
        os.chmod(tmp, 0o644)  # meant to be shared; mkstemp makes it private

    metrics.write_atomic(target, write)


def create(
    study: dict, resolved: dict, *, machine_id: str, git_sha, results: Path, out_dir: Path, with_images: bool, log
) -> tuple[Path, dict, list[str]]:
    """Write results/archive/<machine_id>-<stamp>.tar.gz; return (path, manifest, cells not archived)."""
    check_id("machine_id", machine_id)
    members, missing = plan_members(study, resolved, results)
    if not any(rel.startswith("cells/") for rel in members):
        raise ArchiveError(str(results / "cells"), f"no cell of study {resolved['study']} has results; run snakemake")
    created = datetime.now(UTC).replace(microsecond=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(study, indent=1, sort_keys=True) + "\n")
        (tmp / "resolved.json").write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
        members |= {"study/config.json": tmp / "config.json", "study/resolved.json": tmp / "resolved.json"}
        if with_images:
            members |= save_images(members, tmp, log)
        manifest = build_manifest(
            members, machine_id=machine_id, created=created, study=resolved["study"], git_sha=git_sha
        )
        target = out_dir / f"{machine_id}-{manifest['archive_id']}.tar.gz"
        write_archive(target, manifest, members)
    return target, manifest, missing


# ---------------------------------------------------------------------------------------------
# Verifying and importing an archive


def check_member(info: tarfile.TarInfo, limits: Limits) -> None:
    """Refuse a member by its header alone: name, type and size."""
    name = info.name
    if not name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(name, "absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise ArchiveError(name, "path leaves the archive ('..')")
    if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in name) or "" in parts or "." in parts:
        raise ArchiveError(name, "malformed path (control characters, backslashes, empty or '.' parts)")
    if info.issym():
        raise ArchiveError(name, f"symbolic link (to {info.linkname!r}); archives hold regular files only")
    if info.islnk():
        raise ArchiveError(name, f"hard link (to {info.linkname!r}); archives hold regular files only")
    if info.ischr() or info.isblk():
        raise ArchiveError(name, "device file; archives hold regular files only")
    if info.isfifo():
        raise ArchiveError(name, "fifo; archives hold regular files only")
    if not info.isreg():
        raise ArchiveError(name, "not a regular file (directory or special entry); archives hold regular files only")
    if name != MANIFEST and not MEMBER_RE.fullmatch(name):
        raise ArchiveError(name, "not a path a cellbench archive holds")
    cap = (
        limits.manifest_bytes
        if name == MANIFEST
        else limits.image_bytes
        if name.endswith(".docker.tar")
        else limits.member_bytes
    )
    if info.size > cap:
        raise ArchiveError(name, f"oversize member ({info.size} bytes, limit {cap})")


def check_manifest(data: bytes) -> dict:
    """Parse and check MANIFEST.json: format, versions, ids, one entry per member."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(MANIFEST, f"malformed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(manifest, dict):
        raise ArchiveError(MANIFEST, "malformed: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ArchiveError(MANIFEST, f"format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(
            MANIFEST,
            f"unknown format_version {manifest.get('format_version')!r} (this cellbench reads {FORMAT_VERSION})",
        )
    if manifest.get("schema_version") != metrics.SCHEMA_VERSION:
        raise ArchiveError(
            MANIFEST,
            f"unknown schema_version {manifest.get('schema_version')!r} "
            f"(this cellbench reads {metrics.SCHEMA_VERSION})",
        )
    for key, kind in (("cellbench_version", str), ("created_at", str), ("study", str), ("members", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArchiveError(MANIFEST, f"malformed: {key} must be a {kind.__name__}")
    if not isinstance(manifest.get("method_version"), int) or isinstance(manifest.get("method_version"), bool):
        raise ArchiveError(MANIFEST, "malformed: method_version must be an integer")
    if not isinstance(manifest.get("git_sha"), str | None):
        raise ArchiveError(MANIFEST, "malformed: git_sha must be a string or null")
    check_id("machine_id", manifest.get("machine_id"))
    check_id("archive_id", manifest.get("archive_id"))
    for rel, entry in manifest["members"].items():
        if rel == MANIFEST or not MEMBER_RE.fullmatch(rel):
            raise ArchiveError(rel, "listed in MANIFEST.json but not a path a cellbench archive holds")
        if (
            not isinstance(entry, dict)
            or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry.get("bytes"), bool)
            or entry["bytes"] < 0
        ):
            raise ArchiveError(rel, "malformed MANIFEST.json entry (needs sha256: 64 hex digits, bytes: integer >= 0)")
    if not any(rel.endswith("/metrics.parquet") for rel in manifest["members"]):
        raise ArchiveError(MANIFEST, "lists no cells/<cell_id>/metrics.parquet")
    return manifest


def check_metrics(rel: str, data: bytes, machine_id: str) -> None:
    """A metrics member must be Parquet in this schema, of the cell its path names, from the
    machine the manifest names (else its rows would land under another machine's name)."""
    try:
        # ParquetFile, not pq.read_table: on a buffer, pyarrow 26's read_table goes through its
        # dataset threads, and about one process in three then aborts at exit (std::terminate).
        file = pq.ParquetFile(pa.BufferReader(data))
        table = file.read()
    except (pa.ArrowException, OSError) as exc:
        raise ArchiveError(rel, f"not readable Parquet ({str(exc).splitlines()[0]})") from None
    version = metrics.stored_schema_version(file)
    # Older cellbench versions wrote fewer (nullable) columns; they read as "not measured".
    names = table.schema.names
    missing = set(metrics.COLUMNS) - set(names) - metrics.OPTIONAL_COLUMNS
    if version != str(metrics.SCHEMA_VERSION) or missing or not set(names) <= set(metrics.COLUMNS):
        raise ArchiveError(rel, f"Parquet schema_version {version} or columns differ from this cellbench's")
    cell_id = rel.split("/")[1]
    for column, expected in (("machine_id", machine_id), ("cell_id", cell_id)):
        found = set(table.column(column).to_pylist())
        if found != {expected}:
            raise ArchiveError(rel, f"rows have {column} {sorted(map(str, found))}, expected {expected!r}")


def verify(archive: Path, limits: Limits = Limits()) -> dict:
    """Read the whole archive and check it; return its manifest. Writes nothing."""
    archive = Path(archive)
    if not archive.is_file():
        raise ArchiveError(str(archive), "no such archive file")
    size = archive.stat().st_size
    if size > limits.archive_bytes:
        raise ArchiveError(str(archive), f"oversize archive ({size} bytes, limit {limits.archive_bytes})")
    seen: dict[str, dict] = {}
    manifest_data = None
    parquet: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for info in tar:
                if len(seen) >= limits.members:
                    raise ArchiveError(info.name, f"more than {limits.members} members")
                check_member(info, limits)
                if info.name in seen or (info.name == MANIFEST and manifest_data is not None):
                    raise ArchiveError(info.name, "duplicate member")
                total += info.size
                if total > limits.total_bytes:
                    raise ArchiveError(info.name, f"archive unpacks to more than {limits.total_bytes} bytes")
                digest, length, keep = hashlib.sha256(), 0, []
                for block in _blocks(tar.extractfile(info)):
                    digest.update(block)
                    length += len(block)
                    if info.name == MANIFEST or info.name.endswith("/metrics.parquet"):
                        keep.append(block)
                if info.name == MANIFEST:
                    manifest_data = b"".join(keep)
                else:
                    seen[info.name] = {"sha256": digest.hexdigest(), "bytes": length}
                    if keep:
                        parquet[info.name] = b"".join(keep)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
        raise ArchiveError(
            str(archive), f"not a readable .tar.gz ({str(exc).splitlines()[0] or type(exc).__name__})"
        ) from None
    if manifest_data is None:
        raise ArchiveError(MANIFEST, "missing; not a cellbench archive")
    manifest = check_manifest(manifest_data)
    listed = manifest["members"]
    for rel in sorted(set(seen) - set(listed)):
        raise ArchiveError(rel, "extra member, not listed in MANIFEST.json")
    for rel in sorted(set(listed) - set(seen)):
        raise ArchiveError(rel, "missing member, listed in MANIFEST.json but not in the archive")
    for rel, found in sorted(seen.items()):
        if found["bytes"] != listed[rel]["bytes"]:
            raise ArchiveError(
                rel, f"size mismatch ({found['bytes']} bytes, MANIFEST.json says {listed[rel]['bytes']})"
            )
        if found["sha256"] != listed[rel]["sha256"]:
            raise ArchiveError(rel, "checksum mismatch (sha256 differs from MANIFEST.json)")
    for rel, data in sorted(parquet.items()):
        check_metrics(rel, data, manifest["machine_id"])
    return manifest


def destination(results: Path, manifest: dict) -> Path:
    return results / "imported" / manifest["machine_id"] / manifest["archive_id"]


def _unpack(archive: Path, manifest: dict, target: Path, limits: Limits) -> None:
    """Second read of a verified archive into `target`, checking every member again as it is
    written (the file could have changed since it was verified). MANIFEST.json is written from
    the verified manifest."""
    listed, written = manifest["members"], set()
    with tarfile.open(archive, "r|gz") as tar:
        for info in tar:
            check_member(info, limits)
            if info.name == MANIFEST:
                continue
            if info.name not in listed or info.name in written:
                raise ArchiveError(info.name, "changed while importing (member not in the verified manifest)")
            out = target / info.name
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(out, "wb") as handle:
                for block in _blocks(tar.extractfile(info)):
                    digest.update(block)
                    handle.write(block)
            if digest.hexdigest() != listed[info.name]["sha256"]:
                raise ArchiveError(info.name, "changed while importing (checksum mismatch)")
            written.add(info.name)
    if written != set(listed):
        raise ArchiveError(sorted(set(listed) - written)[0], "changed while importing (member gone)")
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def import_archive(archive: Path, results: Path, local_machine: str, limits: Limits = Limits()) -> tuple[str, Path]:
    """Verify, then unpack into results/imported/<machine_id>/<archive_id>/ atomically.
    Returns ("imported" | "unchanged", destination)."""
    archive = Path(archive)
    manifest = verify(archive, limits)
    if manifest["machine_id"] == local_machine:
        raise ArchiveError(
            str(archive),
            f"comes from this machine ({local_machine}); its cells are already in results/cells "
            "(import on another machine, or set CELLBENCH_MACHINE_ID)",
        )
    target = destination(results, manifest)
    if target.exists():
        return _same_or_clash(target, manifest), target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest['archive_id']}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o755)
        _unpack(archive, manifest, tmp, limits)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            return _same_or_clash(target, manifest), target  # another import of it won the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "imported", target


def _same_or_clash(target: Path, manifest: dict) -> str:
    try:
        existing = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        existing = None
    if existing != manifest:
        raise ArchiveError(
            str(target),
            f"clash: machine {manifest['machine_id']} archive {manifest['archive_id']} was already imported "
            "with different content; refusing to overwrite it",
        )
    return "unchanged"
