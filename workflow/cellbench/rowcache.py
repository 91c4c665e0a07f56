"""Incremental aggregation: every row of the metrics files in one summary, where a rerun of one
cell reads that cell's file again and no other.

The metrics files, in the order given, are cut into shards of about SPAN consecutive files. A
shard ends after a file whose path hashes to 0 modulo SPAN, so the cut points depend on the
paths alone: adding or removing a cell changes the shard it falls in, not every shard after it.
Each shard's rows, in the schema, are one Arrow IPC file; the cache's index lists per shard its
files with what `stat` says of each (size, mtime, ctime, inode: the atomic write of a rerun
changes them all, and a file rewritten in place changes its mtime) and their row counts, and
the sha256 of the shard's bytes. An aggregation stats every file: a shard whose files all match
is used as stored; otherwise its unchanged files' rows are taken from the stored shard and the
changed files are read again. The summary is then streamed from the shards the same way
whether they were stored or just made, so a full aggregation (an empty cache) and an
incremental one write the same bytes.

What the cache cannot vouch for is rebuilt from the metrics files: an index that is missing,
unreadable or does not hash to its own check line; a cache of another schema, cache format or
polars version (each has its own folder, named by a hash of the three); a shard whose bytes do
not hash to the sha256 in the index. Nothing in the cache is ever trusted over a metrics file:
it only says "these are the rows of the file that had this stat".
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from . import atomic, metrics

FORMAT = 2  # the layout of the index and shards; bump it when either changes (2: each shard lists its cells)
SPAN = 32  # files per shard on average (10,000 cells: about 300 shards of about 1,300 rows)
MAX_SPAN = 4 * SPAN  # a run of paths without a cut point is cut here
READ_BATCH = 1024  # metrics files read in one polars scan (bounds the memory of a full aggregation)
INDEX = "index.json"
_SHARD_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{64}\.arrow")
_FINGERPRINT_NAME = re.compile(r"[0-9a-f]{16}")


@dataclass
class Counts:
    """What an aggregation read: metrics files read again, shards used as stored / made."""

    files: int = 0
    files_read: int = 0
    shards: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # The cache's folder and its index's entries, in order (each with the [machine_id, cell_id]
    # pairs its rows hold, "cells"): what cellbench.pointcache keys its cells by. None and []
    # when the aggregation was full (no cache, or one it could not write).
    folder: Path | None = None
    entries: list[dict] = field(default_factory=list)

    def line(self) -> str:
        reused = f", {self.shards_reused} of {self.shards} shards reused" if self.shards else ""
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.files_read:,} of {self.files:,} metrics files read{reused} in {self.seconds:.2f} s{notes}"


def fingerprint() -> str:
    """The cache folder's name: what the stored bytes depend on besides the metrics files (the
    schema, so a new column version starts a new cache; the format; polars, which writes them)."""
    digest = hashlib.sha256(f"{FORMAT}\0{pl.__version__}\0".encode())
    digest.update(metrics.SCHEMA.serialize().to_pybytes())
    return digest.hexdigest()[:16]


def stat_key(path: str) -> list:
    """[path, size, mtime_ns, ctime_ns, inode]: a file with the same key holds the same rows."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise metrics.SchemaError(f"{path}: no such metrics file") from None
    return [path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cut(paths: list[str]) -> list[range]:
    """Consecutive runs of `paths`, each ending after a path whose CRC-32 is 0 modulo SPAN (or
    after MAX_SPAN paths): where the cuts fall depends on the paths, not on their positions."""
    runs, start = [], 0
    for index, path in enumerate(paths):
        if zlib.crc32(path.encode()) % SPAN == 0 or index + 1 - start >= MAX_SPAN:
            runs.append(range(start, index + 1))
            start = index + 1
    if start < len(paths):
        runs.append(range(start, len(paths)))
    return runs


def shard_id(paths: list[str]) -> str:
    """A shard's name: the hash of its files' paths (the same shard before and after a rerun)."""
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:16]


def read_index(folder: Path) -> tuple[dict[str, list[dict]], dict[tuple, tuple[dict, int, int]]]:
    """The stored shards by shard id, and where each file's rows are stored by stat key: (shard's
    entry, first row, rows). Both empty when there is no index this can vouch for: the first
    line of the file is the sha256 of the rest, which names this folder."""
    try:
        index = atomic.read_checked_json(folder / INDEX)
        if index is None or index.get("format") != FORMAT or index.get("fingerprint") != folder.name:
            return {}, {}
        by_id: dict[str, list[dict]] = {}
        where: dict[tuple, tuple[dict, int, int]] = {}
        for entry in index["shards"]:
            by_id.setdefault(str(entry["id"]), []).append(entry)
            offset = 0
            for key in entry["files"]:
                rows = int(key[5])
                where.setdefault(tuple(key[:5]), (entry, offset, rows))
                offset += rows
            if not isinstance(entry["file"], str) or not isinstance(entry["sha256"], str):
                return {}, {}
            if not all(isinstance(cell, list) and len(cell) == 2 for cell in entry["cells"]):
                return {}, {}
        return by_id, where
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return {}, {}


def write_index(folder: Path, shards: list[dict]) -> None:
    atomic.write_checked_json(folder / INDEX, {"format": FORMAT, "fingerprint": folder.name, "shards": shards})


def _verified_bytes(folder: Path, entry: dict) -> bytes | None:
    try:
        data = (folder / entry["file"]).read_bytes()
    except (OSError, KeyError, TypeError):
        return None
    return data if hashlib.sha256(data).hexdigest() == entry.get("sha256") else None


def _stored_frame(folder: Path, entry: dict) -> pl.DataFrame | None:
    """A stored shard's rows, if its bytes are the ones the index vouches for and their shape fits."""
    data = _verified_bytes(folder, entry)
    if data is None:
        return None
    try:
        frame = pl.read_ipc(io.BytesIO(data), memory_map=False)
        rows = sum(int(key[5]) for key in entry["files"])
    except (pl.exceptions.PolarsError, OSError, ValueError, TypeError, IndexError, KeyError):
        return None
    if frame.schema != metrics.polars_schema() or frame.height != rows:
        return None
    return frame


def read_files(paths: list[str]) -> tuple[pl.DataFrame, list[int]]:
    """The metrics files' rows in the schema, in order, and each file's row count. Read by polars
    in one scan (~3x faster than file by file); a file polars cannot read, or rows of a schema
    version this cellbench does not read, are refused naming the file (metrics' slow path)."""
    if not paths:
        return pl.from_arrow(metrics.SCHEMA.empty_table()), []
    if len(set(paths)) == len(paths):
        try:
            frame = metrics._scan(paths, file_column="_file").collect()
        except (pl.exceptions.PolarsError, OSError):
            frame = None
        if frame is not None:
            if not metrics._wrong_version(frame.lazy()).head(1).collect().is_empty():
                metrics._refuse_wrong_version(paths)
            rows = dict(frame.group_by("_file", maintain_order=True).len().iter_rows())
            # One chunk: slices of it are then views, not walks over a chunk per file.
            return frame.drop("_file").rechunk(), [rows.get(path, 0) for path in paths]
    # The slow path: file by file (a path twice, or a file polars refused), naming the one at fault.
    frames = []
    for path in paths:
        frame = pl.from_arrow(metrics._read_each([path])).cast(metrics.polars_schema())
        if not metrics._wrong_version(frame.lazy()).head(1).collect().is_empty():
            metrics._refuse_wrong_version([path])
        frames.append(frame)
    return pl.concat(frames, how="vertical").rechunk(), [frame.height for frame in frames]


def _shard_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.rechunk().write_ipc(buffer, compression="lz4")
    return buffer.getvalue()


def combine(paths, out: str | Path, cache: str | Path | None) -> Counts:
    """Every row of the metrics files `paths`, in their order, into the Parquet file `out`
    (atomically), through the shard cache in the folder `cache` (None: a temporary one, i.e. a
    full aggregation). Rows of another schema version are refused, naming their file, and `out`
    is left as it was."""
    started = time.perf_counter()
    paths = [str(path) for path in paths]
    note = None
    if cache is not None:
        try:
            (Path(cache) / fingerprint()).mkdir(parents=True, exist_ok=True)
            writable = os.access(Path(cache) / fingerprint(), os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only results folder still aggregates, in full
            cache, note = None, f"cache folder {cache} not writable: full aggregation"
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="cellbench-rows-") as tmp:
            counts = _combine(paths, Path(out), Path(tmp))
    else:
        counts = _combine(paths, Path(out), Path(cache))
        counts.folder = Path(cache) / fingerprint()
    counts.notes += [note] if note else []
    counts.seconds = time.perf_counter() - started
    return counts


def _combine(paths: list[str], out: Path, root: Path) -> Counts:
    folder = root / fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    # A shard whose files changed takes the rows of its unchanged ones from wherever they are
    # stored (a cell added or removed moves files between shards).
    stored, where = read_index(folder)
    keys = [stat_key(path) for path in paths]
    counts = Counts(files=len(paths))
    shards: list[dict | None] = []  # the index's entries, in order (None: to be made)
    batch: list[tuple[int, list[list]]] = []  # (position, files) of shards to make
    for run in cut(paths):
        members = keys[run.start : run.stop]
        shards.append(_stored_shard(folder, members, stored.get(shard_id([key[0] for key in members]), [])))
        if shards[-1] is not None:
            counts.shards_reused += 1
            continue
        batch.append((len(shards) - 1, members))
        # Made READ_BATCH changed files at a time: one polars scan of many files reads them in
        # parallel (a scan per shard of 32 took twice as long), and the memory stays bounded.
        if sum(tuple(key) not in where for _, files in batch for key in files) >= READ_BATCH:
            _make_shards(folder, batch, shards, where, counts)
            batch = []
    _make_shards(folder, batch, shards, where, counts)
    counts.shards = len(shards)
    files = [str(folder / entry["file"]) for entry in shards]
    metadata = {k.decode(): v.decode() for k, v in metrics.SCHEMA.metadata.items()}

    def write(tmp: str) -> None:
        if not files:
            import pyarrow.parquet as pq

            pq.write_table(metrics.SCHEMA.empty_table(), tmp)
            return
        pl.scan_ipc(files, memory_map=False).sink_parquet(tmp, metadata=metadata)

    atomic.write_with(out, write)
    write_index(folder, shards)
    _prune(root, folder, {entry["file"] for entry in shards})
    counts.entries = shards
    return counts


def _stored_shard(folder: Path, members: list[list], candidates: list[dict]) -> dict | None:
    """The index entry of a stored shard of exactly these files, as they are now, that verifies."""
    for entry in candidates:
        if [key[:5] for key in entry.get("files", [])] == members and _verified_bytes(folder, entry) is not None:
            return entry
    return None


def _make_shards(folder: Path, batch: list, shards: list, where: dict, counts: Counts) -> None:
    """Make these shards: the unchanged files' rows from the stored shards that hold them, the
    others read again (in one scan)."""
    loaded: dict[str, pl.DataFrame | None] = {}
    known: dict[tuple, pl.DataFrame] = {}
    for _, members in batch:
        for key in members:
            found = where.get(tuple(key))
            if found is None:
                continue
            entry, offset, rows = found
            if entry["file"] not in loaded:
                loaded[entry["file"]] = _stored_frame(folder, entry)
                if loaded[entry["file"]] is None:
                    counts.notes.append(f"shard {str(entry.get('id'))[:16]} failed its check: its files read again")
            if loaded[entry["file"]] is not None:
                known[tuple(key)] = loaded[entry["file"]].slice(offset, rows)
    wanted = [key[0] for _, members in batch for key in members if tuple(key) not in known]
    fresh, rows = read_files(wanted)
    counts.files_read += len(wanted)
    offset, read = 0, 0  # into `fresh` and `rows`
    for position, members in batch:
        if not any(tuple(key) in known for key in members):  # every file read now: one slice
            sizes = rows[read : read + len(members)]
            frame = fresh.slice(offset, sum(sizes))
            read, offset = read + len(members), offset + sum(sizes)
        else:
            parts, sizes = [], []
            for key in members:
                if tuple(key) in known:
                    part = known[tuple(key)]
                else:
                    part = fresh.slice(offset, rows[read])
                    read, offset = read + 1, offset + rows[read]
                parts.append(part)
                sizes.append(part.height)
            frame = pl.concat(parts, how="vertical")
        data = _shard_bytes(frame)
        digest = hashlib.sha256(data).hexdigest()
        ident = shard_id([key[0] for key in members])
        name = f"{ident}-{digest}.arrow"
        atomic.write_with(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        files = [[*key, size] for key, size in zip(members, sizes, strict=True)]
        cells = [list(cell) for cell in frame.select("machine_id", "cell_id").unique(maintain_order=True).rows()]
        shards[position] = {"id": ident, "file": name, "sha256": digest, "files": files, "cells": cells}


def _prune(root: Path, folder: Path, used: set[str]) -> None:
    """Remove the shards no index entry uses any more, and caches of other schemas or formats."""
    for path in folder.iterdir():
        if _SHARD_NAME.fullmatch(path.name) and path.name not in used:
            path.unlink(missing_ok=True)
    for path in root.iterdir():
        if path != folder and path.is_dir() and _FINGERPRINT_NAME.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
