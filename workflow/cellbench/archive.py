"""Archives that carry one machine's results to another, and an import that trusts nothing.

An archive is a .tar.gz of regular files at fixed relative paths (the same shapes as results/)
with MANIFEST.json first: the sha256 and size of every other member. Import reads it in one
streamed pass (see "Verifying and importing" below): the manifest is checked whole before any
payload, each member against it before its bytes, and the members go into a temp dir on the
same filesystem that is renamed into place only when all passed. It writes member bytes itself
(never tarfile's extract), so modes, owners, links and mtimes from the archive never reach the
disk, and a new import is newer than the tables built before it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, config, metrics, paths, serving
from .digest import sha256_file

FORMAT = "cellbench-archive"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STAMP = "%Y%m%dT%H%M%SZ"  # archive_id: the UTC second the archive was made (ids sort by time)


def _body(pattern: str) -> str:
    """A study schema pattern ("^...$") without its anchors, to compose (never a second copy)."""
    assert pattern.startswith("^") and pattern.endswith("$"), pattern
    return pattern[1:-1]


CELL_FILES = paths.ROUND_FILES  # a round is these three files, whole or not at all


@functools.cache
def ids() -> SimpleNamespace:
    """The patterns of names an archive holds, from the study schema (never a second copy); built
    on first use, as `archive.NAME`, `archive.MEMBER_RE`, ...: reading the schema costs every
    cellbench command (run-cell included) tens of ms, and only archive and import need them."""
    schema = config.load_schema()
    name = _body(schema["$defs"]["name"]["pattern"])  # images, models, the study
    # A machine id also names a folder: it may not start with "." ("." and ".." walk the tree).
    machine = rf"(?!\.){_body(schema['properties']['machine_id']['pattern'])}"
    cell = rf"{name}-[0-9a-f]{{10}}"  # config.expand_cells: the cell's name, "-", 10 hex of its hash
    return SimpleNamespace(
        NAME=name,
        ID=machine,
        ID_RE=re.compile(machine),  # used with fullmatch only: `$` alone also takes "name\n"
        CELL_ID=cell,
        # Every path an archive may hold besides MANIFEST.json; anything else is refused.
        MEMBER_RE=re.compile(
            rf"(study/(config|resolved)\.json"
            # cells/<id>/round-<k>/...; archives made before rounds hold cells/<id>/... (one round).
            rf"|cells/{cell}/(round-[1-9][0-9]{{0,2}}/)?(metrics\.parquet|provenance\.json|engine\.log)"
            rf"|images/{name}\.json|images/{name}\.docker\.tar"
            rf"|models/{name}/manifest\.json)"
        ),
        CELL_MEMBER=re.compile(rf"cells/({cell})/(?:round-([1-9][0-9]{{0,2}})/)?([a-z.]+)"),
    )


def __getattr__(attribute: str):
    if attribute in ("NAME", "ID", "ID_RE", "CELL_ID", "MEMBER_RE", "CELL_MEMBER"):
        return getattr(ids(), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


CHUNK = 1 << 20
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# Rounds an archive may hold: aggregation is built and benchmarked for 10,000 cells
# (benchmarks/aggregate_scale.py); an archive is one study of one machine.
MAX_ROUNDS = 10_000
MAX_IMAGES_AND_MODELS = 256
MAX_JSON_DEPTH = 16  # MANIFEST.json and the JSON members nest 5 levels at most (a resolved study)


@dataclass(frozen=True)
class Limits:
    """Upper bounds an import enforces before reading further (a hostile archive can be a bomb).
    Every size is checked against MANIFEST.json (the first member) before any payload is read,
    then against the bytes as they stream; nothing is buffered beyond one CHUNK, one member
    header and the manifest."""

    archive_bytes: int = 64 * GiB  # the .tar.gz on disk
    total_bytes: int = 128 * GiB  # all members uncompressed, images included
    data_bytes: int = 8 * GiB  # all members but images: 10,000 rounds of metrics and logs
    member_bytes: int = 256 * MiB  # one engine.log (a long cell's log is a few MB)
    metrics_bytes: int = 16 * MiB  # one metrics.parquet (a 10,000-row round is ~2 MB)
    json_bytes: int = 4 * MiB  # one provenance.json, image/model manifest or study file
    image_bytes: int = 64 * GiB  # one `docker save` member
    manifest_bytes: int = 8 * MiB  # 30,000 entries of ~200 bytes
    members: int = 3 * MAX_ROUNDS + 2 * MAX_IMAGES_AND_MODELS + 2  # three files a round, images, models, study
    # Compressed vs uncompressed: cellbench's archives compress ~15:1 (tar headers of small
    # files); 1000:1 is a zero-filled member. Checked once 16 MiB have been inflated.
    ratio: int = 100
    ratio_floor: int = 16 * MiB
    header_bytes: int = 64 * KiB  # one member's tar headers (pax/GNU long names included)
    # Rows: a round has one row per point and repeat (batch x input x output x repeats of the
    # study in the archive); these caps hold whatever the study says.
    rows_per_file: int = 20_000
    rows: int = 2_000_000
    decoded_bytes_per_file: int = 128 * MiB  # one metrics file as Arrow arrays (dictionary-decoded)
    decoded_bytes: int = 4 * GiB  # every metrics file, as the aggregate will hold them


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
    """A machine id: the study schema's machine_id pattern, full match, not starting with "."."""
    if not isinstance(value, str) or len(value) > config.MAX_ID or not ids().ID_RE.fullmatch(value):
        raise ArchiveError(
            MANIFEST, f"{kind} {str(value)[:80]!r} is not a plain name ([A-Za-z0-9_.-], not starting with '.')"
        )
    return value


def check_stamp(value, created_at) -> str:
    """An archive id: the UTC second the archive was made, as STAMP writes it and as created_at
    says, and not in the future (an id that sorts after every real one would win "latest")."""
    try:
        stamp = datetime.strptime(value, STAMP).replace(tzinfo=UTC) if isinstance(value, str) else None
        created = datetime.fromisoformat(created_at) if isinstance(created_at, str) else None
    except ValueError:
        stamp = created = None
    if stamp is None or stamp.strftime(STAMP) != value:
        raise ArchiveError(MANIFEST, f"archive_id {str(value)[:80]!r} is not a UTC stamp like 20261126T101500Z")
    if created is None or created.tzinfo is None or created.astimezone(UTC).strftime(STAMP) != value:
        raise ArchiveError(MANIFEST, f"created_at {str(created_at)[:80]!r} is not the time archive_id {value} says")
    if stamp > datetime.now(UTC) + timedelta(days=1):
        raise ArchiveError(MANIFEST, f"archive_id {value} is in the future")
    return value


def load_json(where: str, data: bytes, kind: type = dict, max_depth: int = MAX_JSON_DEPTH):
    """JSON bytes from an archive: UTF-8, parsed, of `kind`, nested at most max_depth levels."""
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ArchiveError(where, f"malformed JSON (nested deeper than {max_depth})") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise ArchiveError(where, f"malformed JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(value, kind):
        raise ArchiveError(where, f"malformed: not a JSON {'object' if kind is dict else 'list'}")
    if metrics.json_depth(value) > max_depth:
        raise ArchiveError(where, f"malformed JSON (nested deeper than {max_depth})")
    return value


def _blocks(handle):
    while block := handle.read(CHUNK):
        yield block


# ---------------------------------------------------------------------------------------------
# Creating an archive


def plan_members(study: dict, resolved: dict, results: Path) -> tuple[dict[str, Path], list[str]]:
    """Archive path -> file on disk for the study's cells that have results, their image and
    model manifests; and the ids of the study's cells that have none yet."""
    members: dict[str, Path] = {}
    missing = []
    images, models = set(), set()
    member = Path()  # an archive member's path: the results layout relative to its root
    for cell_id, cell in sorted(resolved["cells"].items()):
        # Every round of the cell that finished (a round is its three files or nothing).
        rounds = [paths.round_dir(cell_id, k, member) for k in range(1, cell["sweep"]["rounds"] + 1)]
        rounds = [rel for rel in rounds if all((results / rel / name).is_file() for name in CELL_FILES)]
        if not rounds:
            missing.append(cell_id)
            continue
        for rel in rounds:
            for name in CELL_FILES:
                members[(rel / name).as_posix()] = results / rel / name
        images.add(cell["image"])
        models.add(cell["model"])
    for model in sorted(models):
        members[paths.model_manifest(model, member).as_posix()] = paths.model_manifest(model, results)
        if study["models"][model].get("prepare_image"):
            images.add(study["models"][model]["prepare_image"])
    for image in sorted(images):
        members[paths.image_manifest(image, member).as_posix()] = paths.image_manifest(image, results)
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
            rel: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for rel, path in sorted(members.items())
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

    atomic.write_with(target, write)


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
#
# One pass, one validation for every import: MANIFEST.json must come first and is checked whole
# (ids, sizes against the Limits, every round complete) before any payload is read; then each
# member's tar header is checked against it before its bytes are read, and the bytes stream into
# a temp dir (hashed, JSON parsed, metrics checked batch by batch and written again by our own
# writer) that is renamed into place only when everything passed. Memory stays bounded by the
# manifest, one member header, one CHUNK, one JSON member and one metrics batch, whatever the
# archive holds.


def _cap(name: str, limits: Limits) -> int:
    if name == MANIFEST:
        return limits.manifest_bytes
    if name.endswith(".docker.tar"):
        return limits.image_bytes
    if name.endswith("/metrics.parquet"):
        return min(limits.metrics_bytes, limits.member_bytes)
    if name.endswith(".json"):
        return min(limits.json_bytes, limits.member_bytes)
    return limits.member_bytes


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
    if not info.isreg() or info.issparse():
        raise ArchiveError(
            name, "not a regular file (directory, sparse or special entry); archives hold regular files only"
        )
    if name != MANIFEST and not ids().MEMBER_RE.fullmatch(name):
        raise ArchiveError(name, "not a path a cellbench archive holds")
    if info.size > _cap(name, limits):
        raise ArchiveError(name, f"oversize member ({info.size} bytes, limit {_cap(name, limits)})")


def _version(manifest: dict, key: str, newest: int) -> int:
    value = manifest.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchiveError(MANIFEST, f"unknown {key} {str(value)[:40]!r}")
    if value > newest:
        raise ArchiveError(
            MANIFEST, f"unknown {key} {value}: written by a newer cellbench (this one reads up to {newest}); "
            "upgrade cellbench to import it",
        )  # fmt: skip
    return value


def _short_text(key: str, value, limit: int = 200) -> None:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise ArchiveError(MANIFEST, f"malformed: {key} must be a printable string of at most {limit} characters")


def check_manifest(data: bytes, limits: Limits = Limits()) -> dict:
    """Parse and check MANIFEST.json: format, versions, ids, sizes, one entry per member, every
    round whole. Everything after it is checked against it."""
    manifest = load_json(MANIFEST, data)
    if manifest.get("format") != FORMAT:
        raise ArchiveError(MANIFEST, f"format {str(manifest.get('format'))[:40]!r} is not {FORMAT!r}")
    _version(manifest, "format_version", FORMAT_VERSION)
    _version(manifest, "schema_version", metrics.SCHEMA_VERSION)
    for key in ("cellbench_version", "created_at", "study"):
        _short_text(key, manifest.get(key))
    if not isinstance(manifest.get("members"), dict):
        raise ArchiveError(MANIFEST, "malformed: members must be a dict")
    if not re.fullmatch(ids().NAME, manifest["study"]):
        raise ArchiveError(MANIFEST, f"study {manifest['study']!r} is not a study name")
    if not isinstance(manifest.get("method_version"), int) or isinstance(manifest.get("method_version"), bool):
        raise ArchiveError(MANIFEST, "malformed: method_version must be an integer")
    if manifest.get("git_sha") is not None:
        _short_text("git_sha", manifest.get("git_sha"), 80)
    check_id("machine_id", manifest.get("machine_id"))
    check_stamp(manifest.get("archive_id"), manifest.get("created_at"))
    listed = manifest["members"]
    if len(listed) > limits.members:
        raise ArchiveError(MANIFEST, f"lists {len(listed)} members, more than {limits.members}")
    total = data_total = 0
    for rel, entry in listed.items():
        if rel == MANIFEST or not ids().MEMBER_RE.fullmatch(rel):
            raise ArchiveError(rel, "listed in MANIFEST.json but not a path a cellbench archive holds")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"sha256", "bytes"}
            or not isinstance(entry["sha256"], str)
            or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            or not isinstance(entry["bytes"], int)
            or isinstance(entry["bytes"], bool)
            or entry["bytes"] < 0
        ):
            raise ArchiveError(rel, "malformed MANIFEST.json entry (needs sha256: 64 hex digits, bytes: integer >= 0)")
        if entry["bytes"] > _cap(rel, limits):
            raise ArchiveError(rel, f"oversize member ({entry['bytes']} bytes, limit {_cap(rel, limits)})")
        total += entry["bytes"]
        data_total += 0 if rel.endswith(".docker.tar") else entry["bytes"]
    if total > limits.total_bytes:
        raise ArchiveError(MANIFEST, f"archive unpacks to more than {limits.total_bytes} bytes ({total})")
    if data_total > limits.data_bytes:
        raise ArchiveError(
            MANIFEST, f"archive unpacks to more than {limits.data_bytes} bytes of results ({data_total})"
        )
    _check_rounds(listed, limits)
    return manifest


def _check_rounds(listed: dict, limits: Limits) -> None:
    """A round (cells/<id>/round-<k>/, or cells/<id>/ in archives made before rounds) is its
    three files or it is refused: a round with only its log would be a cell without results."""
    rounds: dict[tuple[str, str | None], set[str]] = {}
    for rel in listed:
        if found := ids().CELL_MEMBER.fullmatch(rel):
            rounds.setdefault((found[1], found[2]), set()).add(found[3])
    if not rounds:
        raise ArchiveError(MANIFEST, "lists no cells/<cell_id>/metrics.parquet")
    if len(rounds) > MAX_ROUNDS:
        raise ArchiveError(MANIFEST, f"lists {len(rounds)} rounds, more than {MAX_ROUNDS}")
    for (cell, k), files in sorted(rounds.items(), key=str):
        where = f"cells/{cell}/" + (f"round-{k}/" if k else "")
        if files != set(CELL_FILES):
            lacks = ", ".join(sorted(set(CELL_FILES) - files))
            raise ArchiveError(where, f"incomplete round, lacks {lacks}: a round is imported whole or not at all")
        if k and (cell, None) in rounds:
            raise ArchiveError(where, "the cell holds both rounds and the layout from before rounds")


def check_metrics(rel: str, path: Path, manifest: dict, limits: Limits, totals: dict) -> int:
    """A metrics member must be Parquet in the schema (its version, columns and types), every
    value valid (metrics.check_batch), of the cell its path names and the machine and study the
    manifest names; within the row and size bounds. Read batch by batch, and written again by
    cellbench's own writer in place of the archive's bytes: the aggregate (polars) then reads a
    file pyarrow wrote from checked rows, never the archive's Parquet metadata. Returns its rows."""
    cell_id, machine_id, study = ids().CELL_MEMBER.fullmatch(rel)[1], manifest["machine_id"], manifest["study"]
    rewritten = path.with_name(f".{path.name}.rewritten")
    try:
        # A file, not a buffer, and no threads: on a buffer, pyarrow 26's read_table goes through
        # its dataset threads, and about one process in three then aborts at exit (std::terminate).
        file = pq.ParquetFile(path)
        meta = file.metadata
        if meta.num_rows > limits.rows_per_file:
            raise ArchiveError(rel, f"{meta.num_rows} rows, more than {limits.rows_per_file} in one round")
        # Only the codecs cellbench writes with: snappy inflates at most ~21:1, so a page can
        # never be more than ~21 x metrics_bytes (zstd or gzip could make one of gigabytes).
        for i in range(meta.num_row_groups):
            for j in range(meta.num_columns):
                codec = meta.row_group(i).column(j).compression
                if codec not in ("SNAPPY", "UNCOMPRESSED"):
                    raise ArchiveError(rel, f"compressed with {codec}; cellbench writes SNAPPY")
        version = metrics.check_file_schema(file.schema_arrow, metrics.stored_schema_version(file))
        # The columns the file has, in the schema's types; the version it declares.
        schema = pa.schema(
            [metrics.SCHEMA.field(name) for name in file.schema_arrow.names],
            metadata={"cellbench.schema_version": str(version)},
        )
        # String columns read as dictionaries, so their decoded size is counted before it exists.
        strings = [field.name for field in schema if field.type == pa.string()]
        file = pq.ParquetFile(path, read_dictionary=strings)
        rows = decoded = 0
        with pq.ParquetWriter(rewritten, schema) as writer:
            for encoded in file.iter_batches(batch_size=256, use_threads=False):
                encoded.validate(full=True)  # indices within their dictionary, before they are followed
                rows, decoded = rows + encoded.num_rows, decoded + metrics.decoded_bytes(encoded)
                if rows > limits.rows_per_file:
                    raise ArchiveError(rel, f"more rows than its footer says ({rows})")
                if decoded > limits.decoded_bytes_per_file:
                    raise ArchiveError(rel, f"unpacks to more than {limits.decoded_bytes_per_file} bytes of rows")
                metrics.check_required(encoded)  # before the cast to the schema's non-nullable fields
                batch = encoded.cast(schema)
                metrics.check_batch(batch)
                for column, expected in (("machine_id", machine_id), ("cell_id", cell_id), ("study", study)):
                    found = set(batch.column(column).to_pylist())
                    if found != {expected}:
                        raise ArchiveError(
                            rel, f"rows have {column} {sorted(map(str, found))[:3]}, expected {expected!r}"
                        )
                writer.write_batch(batch)
    except metrics.SchemaError as exc:
        raise ArchiveError(rel, f"not in the metrics schema: {exc}") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(rel, f"not readable Parquet ({(str(exc).splitlines() or [''])[0][:120]})") from None
    if rows != meta.num_rows:
        raise ArchiveError(rel, f"{rows} rows, its footer says {meta.num_rows}")
    totals["rows"] += rows
    totals["decoded"] += decoded
    if totals["rows"] > limits.rows:
        raise ArchiveError(rel, f"the archive's metrics hold more than {limits.rows} rows")
    if totals["decoded"] > limits.decoded_bytes:
        raise ArchiveError(rel, f"the archive's metrics unpack to more than {limits.decoded_bytes} bytes")
    os.replace(rewritten, path)
    return rows


def check_study(resolved: dict, manifest: dict, rows: dict[str, int]) -> None:
    """Cells, rounds and rows against the study the archive carries: only its cells, at most its
    rounds, at most one row per point and repeat of a round."""
    cells = resolved.get("cells")
    if resolved.get("study") != manifest["study"] or not isinstance(cells, dict):
        raise ArchiveError("study/resolved.json", f"not the resolved study {manifest['study']!r}")
    for rel in manifest["members"]:
        if not (found := ids().CELL_MEMBER.fullmatch(rel)):
            continue
        cell, k = found[1], int(found[2] or 1)
        sweep = cells[cell].get("sweep") if isinstance(cells.get(cell), dict) else None
        per_round = rounds = None
        if isinstance(sweep, dict) and all(isinstance(sweep.get(axis), list) for axis in metrics.POINT):
            # measure.points(sweep) is their product: counted, never built (the lists are the archive's)
            per_round = math.prod(len(sweep[axis]) for axis in metrics.POINT) * max(1, _int(sweep.get("repeats")))
            rounds = _int(sweep.get("rounds", 1))  # studies resolved before rounds have one
            per_round = _level_rows(cells[cell], sweep, per_round)
        if per_round is None or rounds < 1:
            raise ArchiveError(rel, f"cell {cell} is not a cell of study/resolved.json (or its sweep is malformed)")
        if k > rounds:
            raise ArchiveError(rel, f"round {k} of a cell the study runs {rounds} rounds of")
        if rel in rows and rows[rel] > per_round:
            raise ArchiveError(rel, f"{rows[rel]} rows, more than the {per_round} points x repeats of its round")


def _level_rows(cell: dict, sweep: dict, per_round: int | None) -> int | None:
    """A serve cell with load levels: rows per round are its levels and search probes at each
    sweep shape (serving.rows_per_shape); None when its serve settings are malformed."""
    serve = cell.get("serve")
    try:
        if cell.get("mode") != "serve" or not serving.has_levels(serve):
            return per_round
        shapes = math.prod(len(sweep[axis]) for axis in metrics.POINT)
        return shapes * serving.rows_per_shape(serve, max(1, _int(sweep.get("repeats"))))
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError):
        return None


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _Compressed:
    """The archive file as it is read, counting compressed bytes (for the compression ratio)."""

    def __init__(self, handle):
        self.handle, self.bytes = handle, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size if size is not None and size >= 0 else CHUNK)
        self.bytes += len(data)
        return data


class _Inflated:
    """The inflated tar stream tarfile reads. Every byte is counted against a budget set before
    each member header and payload (so tarfile never buffers more than `header_bytes` beyond what
    MANIFEST.json announced) and against the compression ratio."""

    def __init__(self, compressed: _Compressed, limits: Limits):
        self.gz = gzip.GzipFile(fileobj=compressed, mode="rb")
        self.compressed, self.limits, self.pos = compressed, limits, 0
        self.allow(MANIFEST, limits.manifest_bytes)

    def allow(self, where: str, size: int) -> None:
        self.where, self.budget = where, self.pos + size + self.limits.header_bytes

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        data = self.gz.read(min(size, CHUNK, self.budget - self.pos + 1))
        self.pos += len(data)
        if self.pos > self.budget:
            raise ArchiveError(self.where, f"tar headers or data beyond what MANIFEST.json lists ({self.pos} bytes in)")
        if self.pos > self.limits.ratio_floor and self.pos > self.limits.ratio * self.compressed.bytes:
            raise ArchiveError(self.where, f"compresses more than {self.limits.ratio}:1 (a decompression bomb)")
        return data


def _stream(archive: Path, limits: Limits, use) -> object:
    """Open the archive as a checked tar stream, call use(tar, inflated); a stream that is not a
    readable .tar.gz becomes one ArchiveError naming the file."""
    size = archive.stat().st_size if archive.is_file() else None
    if size is None:
        raise ArchiveError(str(archive), "no such archive file")
    if size > limits.archive_bytes:
        raise ArchiveError(str(archive), f"oversize archive ({size} bytes, limit {limits.archive_bytes})")
    try:
        with open(archive, "rb") as handle:
            inflated = _Inflated(_Compressed(handle), limits)
            with tarfile.open(fileobj=inflated, mode="r|") as tar:
                return use(tar, inflated)
    except (tarfile.TarError, EOFError, OSError, zlib.error, UnicodeError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise ArchiveError(str(archive), f"not a readable .tar.gz ({reason})") from None


def _read_manifest(tar: tarfile.TarFile, inflated: _Inflated, limits: Limits) -> dict:
    info = tar.next()
    if info is None or info.name != MANIFEST:
        raise ArchiveError(MANIFEST, "missing (it is an archive's first member); not a cellbench archive")
    check_member(info, limits)
    inflated.allow(MANIFEST, info.size)
    data = tar.extractfile(info).read()
    inflated.allow(f"{MANIFEST} (the header after it)", 0)
    return check_manifest(data, limits)


def _create(name: str, target: Path):
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "wb")
    except OSError as exc:
        raise ArchiveError(name, f"cannot write {target} ({exc.strerror or exc})") from None


def _write(name: str, handle, block: bytes) -> None:
    try:
        handle.write(block)
    except OSError as exc:
        raise ArchiveError(name, f"cannot write {handle.name} ({exc.strerror or exc})") from None


def _members(tar: tarfile.TarFile, inflated: _Inflated, manifest: dict, limits: Limits, out: Path | None) -> dict:
    """Every member after MANIFEST.json, each checked against it by its header before its bytes
    are read; written under `out` (None: only checked). Returns rows per metrics member."""
    listed, seen, rows, totals = manifest["members"], set(), {}, {"rows": 0, "decoded": 0}
    while (info := tar.next()) is not None:
        check_member(info, limits)
        name = info.name
        if name == MANIFEST or name in seen:
            raise ArchiveError(name, "duplicate member")
        if name not in listed:
            raise ArchiveError(name, "extra member, not listed in MANIFEST.json")
        if info.size != listed[name]["bytes"]:
            raise ArchiveError(name, f"size mismatch ({info.size} bytes, MANIFEST.json says {listed[name]['bytes']})")
        inflated.allow(name, info.size)
        digest, keep = hashlib.sha256(), [] if name.endswith(".json") else None
        target = out / name if out else None
        handle = _create(name, target) if target else None
        try:
            for block in _blocks(tar.extractfile(info)):
                digest.update(block)
                if handle:
                    _write(name, handle, block)
                if keep is not None:
                    keep.append(block)
        finally:
            if handle:
                handle.close()
        if digest.hexdigest() != listed[name]["sha256"]:
            raise ArchiveError(name, "checksum mismatch (sha256 differs from MANIFEST.json)")
        if keep is not None:
            load_json(name, b"".join(keep))
        if target and name.endswith("/metrics.parquet"):
            rows[name] = check_metrics(name, target, manifest, limits, totals)
        seen.add(name)
        inflated.allow(f"{name} (the header after it)", 0)
    for rel in sorted(set(listed) - seen):
        raise ArchiveError(rel, "missing member, listed in MANIFEST.json but not in the archive")
    return rows


def verify(archive: Path, limits: Limits = Limits()) -> dict:
    """Read the whole archive and check it, but for the contents of its metrics (which are read
    from disk, see import_archive); return its manifest. Writes nothing."""

    def use(tar, inflated):
        manifest = _read_manifest(tar, inflated, limits)
        _members(tar, inflated, manifest, limits, None)
        return manifest

    return _stream(Path(archive), limits, use)


def destination(results: Path, manifest: dict) -> Path:
    return paths.imported_archive(manifest["machine_id"], manifest["archive_id"], results)


def _existing(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def import_archive(archive: Path, results: Path, local_machine: str, limits: Limits = Limits()) -> tuple[str, Path]:
    """Check and unpack into results/imported/<machine_id>/<archive_id>/ in one pass: into a temp
    dir on the same filesystem (the deepest existing folder of that path), renamed into place
    once every member passed; refused, the temp dir goes and nothing else was made.
    Returns ("imported" | "unchanged", destination)."""
    archive, results = Path(archive), Path(results)

    def use(tar, inflated):
        manifest = _read_manifest(tar, inflated, limits)
        if manifest["machine_id"] == local_machine:
            raise ArchiveError(
                str(archive),
                f"comes from this machine ({local_machine}); its cells are already in {results / paths.CELLS_DIR} "
                "(import on another machine, or set CELLBENCH_MACHINE_ID)",
            )
        target = destination(results, manifest)
        if target.exists():
            outcome = _same_or_clash(target, manifest)
            _members(tar, inflated, manifest, limits, None)  # the same bytes, checked when first imported
            return outcome, target
        parent = _existing(target.parent)
        need = sum(entry["bytes"] for entry in manifest["members"].values())
        if shutil.disk_usage(parent).free < need + 64 * MiB:
            raise ArchiveError(str(archive), f"needs {need // MiB + 1} MiB and {parent} has less free")
        tmp = Path(tempfile.mkdtemp(prefix=f".import-{manifest['archive_id']}.", suffix=".tmp", dir=parent))
        try:
            tmp.chmod(0o755)
            rows = _members(tar, inflated, manifest, limits, tmp)
            if "study/resolved.json" in manifest["members"]:
                check_study(json.loads((tmp / "study" / "resolved.json").read_text()), manifest, rows)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                return _same_or_clash(target, manifest), target  # another import of it won the race
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return "imported", target

    return _stream(archive, limits, use)


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
