"""Incremental points: after one cell changed, `cellbench aggregate` computes that cell's points
again and keeps every other cell's.

aggregate.cell_points is two steps: cell_parts, what one cell's own rows (and which of its rounds
the host disturbed) give, and finish, what compares cells (the ratio to the baseline, quality,
"same as"), over the small per-point tables. This keeps each cell's parts in the row cache's
folder (cellbench.rowcache), under `points/`, keyed by the shards that hold the cell's rows: a
cell whose shards' bytes are the same (their sha256, in order) has the same rows, and so the same
parts, unless its flagged rounds changed. Which rounds are flagged depends on other cells (a
round's canary against the machine's median for the image), so every aggregation flags the
rounds again from every cell's kept round figures (one row per cell and round) and computes again
each cell whose flags moved. finish then runs over every cell's parts, so a rerun of the baseline
cell changes every ratio as it should.

What the cache cannot vouch for is computed again, never trusted: an index whose first line is
not the sha256 of the rest, a part whose bytes do not hash to what the index says, parts of
another format or other statistics settings. The folder sits inside the row cache's, whose name
already hashes the schema, the polars version and the row cache's format.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from . import aggregate, atomic, config, metrics, quality, rowcache

FORMAT = 2  # the layout of the index and parts; bump it when either, or what cell_parts computes, changes
# (2: the index lists its cells as [machine_id, cell_id, fingerprint])
FOLDER = "points"
INDEX = "index.json"
MARKS = "marks"  # the cells' "same as" marks and serve settings (kept_marks)
QUANTILES = "t-quantiles.json"  # in the row cache's folder: stats.load_quantiles
# The parts kept: each cell's round figures (round_table), the flags they gave (flags_of), and
# cell_parts' four.
PARTS = ("rounds", "flags", "points", "means", "cells", "measured")
CELL = ["machine_id", "cell_id"]
BATCH_SHARDS = 64  # cells computed together: those of about 64 shards (2,000 cells, 80,000 rows)


@dataclass
class Counts:
    cells: int = 0
    computed: int = 0  # cells whose parts were computed again
    flags_moved: int = 0  # of them, cells whose rows were the same but whose flagged rounds moved
    note: str = ""

    def line(self) -> str:
        moved = f" ({self.flags_moved} for their flagged rounds)" if self.flags_moved else ""
        note = f" ({self.note})" if self.note else ""
        return f"{self.computed:,} of {self.cells:,} cells' points computed{moved}{note}"


def cell_key(machine_id, cell_id) -> tuple:
    """A cell's key: (machine_id, cell_id) (a tuple, not JSON: 40,000 dumps were 0.4 s at 10,000 cells)."""
    return (machine_id, cell_id)


def fingerprints(entries: list[dict]) -> dict[tuple, str]:
    """{cell key: the sha256 of the shards that hold its rows, in order}: the same string, the same rows."""
    shards: dict[tuple, list[str]] = {}
    for entry in entries:
        for machine_id, cell_id in entry["cells"]:
            shards.setdefault((machine_id, cell_id), []).append(entry["sha256"])
    return {key: hashlib.sha256(" ".join(shas).encode()).hexdigest()[:32] for key, shas in shards.items()}


def batches(entries: list[dict], cells: set[tuple]) -> list[set[tuple]]:
    """These cells in batches of about BATCH_SHARDS shards, in the shards' order: each cell in the
    batch of the first shard that holds its rows."""
    found: list[set[tuple]] = []
    seen: set[tuple] = set()
    shards = BATCH_SHARDS
    for entry in entries:
        wanted = {key for key in (tuple(c) for c in entry["cells"]) if key in cells and key not in seen}
        if not wanted:
            continue
        if shards >= BATCH_SHARDS:
            found.append(set())
            shards = 0
        found[-1] |= wanted
        seen |= wanted
        shards += 1
    return found


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps([FORMAT, settings], sort_keys=True).encode()).hexdigest()[:16]


def _cells_frame(keys) -> pl.DataFrame:
    pairs = list(keys)
    return pl.DataFrame(
        {"machine_id": [p[0] for p in pairs], "cell_id": [p[1] for p in pairs]},
        schema={"machine_id": pl.String, "cell_id": pl.String},
    )


def _of(frame, cells, keep: bool = True):
    """The rows of `frame` of these cells (keep) or of the others."""
    return frame.join(cells, on=CELL, how="semi" if keep else "anti", nulls_equal=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read(folder: Path, key: str) -> tuple[dict[tuple, str], dict[str, pl.LazyFrame]]:
    """The kept fingerprints and parts (scans of their files, whose bytes were checked), or
    ({}, {}) where the index or a part does not verify."""
    try:
        index = atomic.read_checked_json(folder / INDEX) or {}
        if index.get("format") != FORMAT or index.get("settings") != key or set(index["files"]) != set(PARTS):
            return {}, {}
        parts = {}
        for part, sha in index["files"].items():
            path = folder / f"{part}.arrow"
            if _sha256(path) != sha:
                return {}, {}
            parts[part] = pl.scan_ipc(path, memory_map=False)
        if not all(isinstance(c, list) and len(c) == 3 and isinstance(c[2], str) for c in index["cells"]):
            return {}, {}
        return {(m, c): fp for m, c, fp in index["cells"]}, parts
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pl.exceptions.PolarsError):
        return {}, {}


def write(folder: Path, key: str, cells: dict[tuple, str], parts: dict[str, pl.LazyFrame]) -> None:
    """Each part one Arrow IPC file, streamed (the kept rows from the old file, the new ones
    from memory: never the whole table in memory), then the index with their sha256 (a part
    rewritten before an index that names it fails its check: computed again)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for part in PARTS:
        path = folder / f"{part}.arrow"
        atomic.write_with(path, lambda tmp, frame=parts[part]: frame.sink_ipc(tmp, compression="lz4"))
        files[part] = _sha256(path)
    listed = [[*cell, fp] for cell, fp in cells.items()]
    atomic.write_checked_json(folder / INDEX, {"format": FORMAT, "settings": key, "files": files, "cells": listed})


def cell_points(
    rows: rowcache.Counts,
    baseline_id: str,
    statistics: dict | None = None,
    tolerance: dict | None = None,
    as_polars: bool = False,
):
    """aggregate.cell_points of the rows rowcache.combine just stored (its Counts: the cache's
    folder and shards), through the parts kept beside them. Returns (the points, Counts); the
    points in polars with as_polars (aggregate.finish)."""
    settings = config.statistics({"statistics": statistics or {}})
    key, folder = settings_key(settings), rows.folder / FOLDER
    now = fingerprints(rows.entries)
    kept, stored = read(folder, key)
    counts = Counts(cells=len(now))
    if not stored and (folder / INDEX).exists():
        counts.note = "kept points not usable (another cache format or statistics settings, or damaged): computed again"
    if not stored:
        kept = {}
    changed = {cell for cell, fp in now.items() if kept.get(cell) != fp}
    unchanged = _cells_frame(now.keys() - changed)

    def scan(cells: set[tuple]) -> pl.LazyFrame:
        """The rows of these cells, from the shards that hold them, in the summary's order."""
        files = [str(rows.folder / e["file"]) for e in rows.entries if any(tuple(c) in cells for c in e["cells"])]
        if not files:
            return aggregate.prepared(pl.from_arrow(metrics.SCHEMA.empty_table()))
        frame = pl.scan_ipc(files, memory_map=False)
        if len(cells) < len(now):
            frame = frame.join(_cells_frame(cells).lazy(), on=CELL, how="semi", nulls_equal=True)
        return aggregate.prepared(frame)

    rounds = aggregate.round_table(scan(changed)).collect()
    if stored:
        rounds = pl.concat([_of(stored["rounds"].collect(), unchanged), rounds], how="vertical")
    flags = aggregate.flags_of(rounds.lazy(), settings).collect()
    if stored:  # cells whose rows are the same but whose flagged rounds are not
        before, after = _of(stored["flags"].collect(), unchanged), _of(flags, unchanged)
        moved = pl.concat([before.join(after, on=list(after.columns), how="anti", nulls_equal=True),
                           after.join(before, on=list(after.columns), how="anti", nulls_equal=True)])  # fmt: skip
        moved_cells = set(moved.select(CELL).unique().rows())
        counts.flags_moved = len(moved_cells)
        changed |= moved_cells
        unchanged = _cells_frame(now.keys() - changed)
    counts.computed = len(changed)
    # A batch of cells at a time (each cell's parts are its own): the memory of a full
    # aggregation stays that of a batch's rows.
    pieces = [
        pl.collect_all(aggregate.cell_parts(scan(batch), flags.lazy(), settings))
        for batch in batches(rows.entries, changed)
    ]
    computed = [pl.concat(part, how="vertical") for part in zip(*pieces, strict=True)] if pieces else []
    del pieces
    if not computed:
        computed = pl.collect_all(aggregate.cell_parts(scan(set()), flags.lazy(), settings))
    fresh = dict(zip(PARTS[2:], computed, strict=True))
    parts = {"rounds": rounds.lazy(), "flags": flags.lazy()}
    for part, frame in fresh.items():
        parts[part] = pl.concat([_of(stored[part], unchanged.lazy()), frame.lazy()]) if stored else frame.lazy()
    if not (stored and not changed and now == kept):  # nothing changed: the parts are those stored
        write(folder, key, now, parts)
    del parts, fresh, computed, stored
    # finish from the files just written, which it reads once (the points of 10,000 cells: 110 MB in polars).
    table, means, cells, measured = (pl.scan_ipc(folder / f"{part}.arrow", memory_map=False) for part in PARTS[2:])
    cells = aggregate.sorted_cells(cells.collect())
    marks = kept_marks(folder, cells, baseline_id)
    tolerance = quality.tolerance({"quality_tolerance": tolerance})
    return aggregate.finish(table, means.collect(), cells, measured.collect(), baseline_id, settings, tolerance,
                            marks, as_polars), counts  # fmt: skip


def kept_marks(folder: Path, cells: pl.DataFrame, baseline_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """aggregate.cell_marks of these cells (sorted_cells), kept in MARKS.json and its Arrow files
    under the sha256 of the cells' rows and the baseline: a rerun that leaves every cell's settings
    as they were (most do) parses none of them again (0.6 s at 10,000 cells). Computed again, and
    kept, where the index or a file does not verify."""
    key = hashlib.sha256(json.dumps([FORMAT, baseline_id, cells.columns, cells.rows()]).encode()).hexdigest()
    names = ("same_as", "serve")
    try:
        index = atomic.read_checked_json(folder / f"{MARKS}.json") or {}
        if index.get("key") == key and set(index.get("files", {})) == set(names):
            found = []
            for name in names:
                data = (folder / f"{MARKS}-{name}.arrow").read_bytes()
                if hashlib.sha256(data).hexdigest() != index["files"][name]:
                    break
                found.append(pl.read_ipc(io.BytesIO(data), memory_map=False))
            else:
                return found[0], found[1]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pl.exceptions.PolarsError):
        pass
    marks = aggregate.cell_marks(cells, baseline_id)
    files = {}
    for name, frame in zip(names, marks, strict=True):
        buffer = io.BytesIO()
        frame.write_ipc(buffer)
        data = buffer.getvalue()
        atomic.write_with(folder / f"{MARKS}-{name}.arrow", lambda tmp, data=data: Path(tmp).write_bytes(data))
        files[name] = hashlib.sha256(data).hexdigest()
    atomic.write_checked_json(folder / f"{MARKS}.json", {"key": key, "files": files})
    return marks
