"""Progress while a study runs: one plain line per finished point of a round, one per round of the study.

A round's container rewrites raw.json atomically after every repeat (scripts/bench_cell.py); the
host follows that file and prints a line for each repeat it has not printed yet, with what is
left estimated from the repeats done. After each round the study's line counts the rounds and
cells done of the study's total (results/study.json, config.study_record) and the failures, and
estimates what is left from the rounds' own container times. Plain lines, so a log file keeps them.

Everything here but Follower and the two readers is pure; Follower is the thin polling thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import atomic, measure, paths, serving


def duration(seconds: float | None) -> str:
    """42s, 3m05s, 1h02m; "?" when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def repeats_total(cell: dict) -> int:
    """Measured repeats of one round: every point of the sweep, `repeats` times."""
    return len(cell.get("points") or measure.planned_points(cell)) * cell["sweep"]["repeats"]


def time_left(spent_s: float, done: int, total: int) -> float | None:
    """What is left if the rest goes at the pace of what is done; None before anything is done."""
    if done <= 0:
        return None
    return spent_s / done * max(0, total - done)


def point_tok_s(point: dict) -> float | None:
    wall = point.get("wall_s")
    if not wall:
        return None
    return sum(r.get("output_tokens") or 0 for r in point.get("requests", [])) / wall


def measuring_since(raw: dict, container_start: float) -> float:
    """When the round began measuring (epoch s): bench_cell's mark, else the container's start
    plus the engine's load time (raw.json written before the mark existed)."""
    if raw.get("measuring_at_s") is not None:
        return raw["measuring_at_s"]
    return container_start + (raw.get("load_s") or 0.0)


def point_line(cell: dict, round: int, raw: dict, index: int, now: float, container_start: float) -> str:
    """The line of raw["points"][index] (done index + 1 of the round's repeats)."""
    point = raw["points"][index]
    total = repeats_total(cell)
    done = index + 1
    tok_s = point_tok_s(point)
    spent = max(0.0, point.get("finished_at_s", now) - measuring_since(raw, container_start))
    left = time_left(spent, done, total)
    load = serving.label(point) if point.get("load_kind") else f"batch {point['batch_size']}"
    lengths = "dataset lengths" if point["input_len"] == 0 else f"{point['input_len']}→{point['output_len']}"
    shape = f"{load}, {lengths}"
    repeat = f"repeat {point.get('repeat', 0) + 1}/{cell['sweep']['repeats']}"
    speed = f"{tok_s:.1f} tok/s" if tok_s is not None else "? tok/s"
    where = f"point {done}/{total}"
    if point.get("load_phase") == "search":  # the capacity search's probes come after the planned points
        where, left = f"search probe {done - total}", 0.0
    return (
        f"cellbench: {cell['name']} round {round}/{cell['sweep']['rounds']}: {where} "
        f"({shape}, {repeat}) {speed}, elapsed {duration(now - container_start)}, left ~{duration(left)}"
    )


def loaded_line(cell: dict, round: int, raw: dict) -> str:
    return (
        f"cellbench: {cell['name']} round {round}/{cell['sweep']['rounds']}: engine loaded in "
        f"{duration(raw.get('load_s'))}, measuring {repeats_total(cell)} repeats"
    )


def new_lines(cell: dict, round: int, raw: dict | None, printed: int, loaded: bool, now: float, start: float):
    """(lines for what raw.json holds beyond the `printed` points, points now printed, loaded now)."""
    if not raw:
        return [], printed, loaded
    lines = []
    if not loaded and raw.get("load_s") is not None:
        lines.append(loaded_line(cell, round, raw))
        loaded = True
    points = raw.get("points") or []
    for index in range(printed, len(points)):
        lines.append(point_line(cell, round, raw, index, now, start))
    return lines, max(printed, len(points)), loaded


def study_estimate(rounds: list[Round]) -> dict:
    """Rounds of a study as (cell id, status or None when not done yet, container seconds):
    counts, and the time left at one round at a time. A round not done costs the mean of its
    cell's done rounds, else the mean of every done round (None when no round is done)."""
    done = [(cell, status, wall) for cell, status, wall in rounds if status is not None]
    by_cell: dict[str, list[float]] = {}
    for cell, _, wall in done:
        if wall is not None:
            by_cell.setdefault(cell, []).append(wall)
    walls = [w for ws in by_cell.values() for w in ws]
    overall = sum(walls) / len(walls) if walls else None
    left: float | None = 0.0
    for cell, status, _ in rounds:
        if status is not None:
            continue
        own = by_cell.get(cell)
        cost = sum(own) / len(own) if own else overall
        left = None if cost is None or left is None else left + cost
    cells = {cell for cell, _, _ in rounds}
    open_cells = {cell for cell, status, _ in rounds if status is None}
    return {
        "rounds_done": len(done),
        "rounds": len(rounds),
        "cells_done": len(cells - open_cells),
        "cells": len(cells),
        "failed": sum(status != "ok" for _, status, _ in done),
        "left_s": left,
    }


def study_line(study: str, estimate: dict) -> str:
    e = estimate
    left = "nothing left" if e["rounds_done"] == e["rounds"] else f"left ~{duration(e['left_s'])}"
    return (
        f"cellbench: study {study}: {e['rounds_done']}/{e['rounds']} rounds, "
        f"{e['cells_done']}/{e['cells']} cells done, {e['failed']} failed; "
        + (left if e["rounds_done"] == e["rounds"] else f"{left} at one round at a time")
    )


# A round as study_estimate takes it: cell id, status (None: not done yet), container seconds.
Round = tuple[str, str | None, float | None]


CACHE_VERSION = 1


def read_rounds(study_file: Path, results: Path = paths.RESULTS, cache: Path | None = None) -> tuple[str, list[Round]]:
    """(study name, rounds as study_estimate takes them) from the study record and the rounds'
    provenance files. A round is done when its provenance exists (a round's files are published
    together, runner.record_round). With `cache`, a provenance file whose stat (size, mtime,
    ctime, inode) is the cached one is not read again: this runs after every round, and reading
    every round's provenance (17 KB each) made each round's cost grow with the study (30,000
    files, about 0.5 GB, after each round of a 10,000-cell study)."""
    record = json.loads(Path(study_file).read_text())
    known = _read_cache(cache) if cache else {}
    seen: dict[str, list] = {}
    rounds: list[Round] = []
    # One template from paths, filled per round: 30,000 pathlib joins would cost more than the stats.
    template = str(paths.cell_provenance(paths.CELL_ID, paths.ROUND, results))
    for cell_id, k in paths.cell_rounds({c: {"sweep": {"rounds": n}} for c, n in record["cells"].items()}):
        path = template.format(cell_id=cell_id, round=k)
        try:
            st = os.stat(path)
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            entry = known.get(path)
            if entry is None or entry[:4] != key:
                prov = json.loads(Path(path).read_text())
                entry = [*key, prov.get("status") or "failed", prov.get("container_wall_s")]
        except (OSError, ValueError):
            rounds.append((cell_id, None, None))
            continue
        seen[path] = entry
        rounds.append((cell_id, entry[4], entry[5]))
    if cache and seen != known:
        with contextlib.suppress(OSError):  # a cache that cannot be written costs time, never the round
            atomic.write_text(cache, json.dumps({"version": CACHE_VERSION, "rounds": seen}, separators=(",", ":")))
    return record["study"], rounds


def _read_cache(cache: Path) -> dict[str, list]:
    """{provenance path: [size, mtime_ns, ctime_ns, inode, status, container seconds]}, or {}
    for a cache that is missing, unreadable or not in this shape."""
    try:
        data = json.loads(Path(cache).read_text())
        if data.get("version") != CACHE_VERSION:
            return {}
        rounds = data["rounds"]
        valid = all(
            isinstance(entry, list) and len(entry) == 6 and all(isinstance(n, int) for n in entry[:4])
            and isinstance(entry[4], str) and (entry[5] is None or isinstance(entry[5], int | float))
            for entry in rounds.values()
        )  # fmt: skip
        return rounds if valid else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def study_progress(study_file: Path | None = None) -> str | None:
    """The study's line, or None where there is no study record (run-cell called by hand)."""
    try:
        study, rounds = read_rounds(study_file or paths.study_file(), cache=paths.progress_cache())
    except (OSError, ValueError, KeyError):
        return None
    return study_line(study, study_estimate(rounds))


def _same_file(a, b) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def emit(line: str, err=None, out=None) -> None:
    """To stderr (the rule sends it to the round's Snakemake log) and to stdout (Snakemake's
    terminal, or the Slurm job's output), once when both are the same file."""
    err, out = err or sys.stderr, out or sys.stdout
    for stream in (err,) if _same_file(err, out) else (err, out):
        with contextlib.suppress(OSError, ValueError):  # a closed terminal never fails the round
            print(line, file=stream, flush=True)


class Follower:
    """Polls a round's raw.json while its container runs and emits each new point's line."""

    def __init__(self, raw_path: Path, cell: dict, round: int, write: Callable[[str], None] = emit, poll_s=1.0):
        self.raw_path, self.cell, self.round, self.write, self.poll_s = Path(raw_path), cell, round, write, poll_s
        self.start = time.time()
        self.printed, self.loaded = 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cellbench-progress", daemon=True)

    def __enter__(self):
        self.start = time.time()
        rounds = self.cell["sweep"]["rounds"]
        self.write(f"cellbench: {self.cell['name']} round {self.round}/{rounds}: container started")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last repeats, written just before the container exited

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        try:
            raw = json.loads(self.raw_path.read_text())
        except (OSError, ValueError):
            return
        lines, self.printed, self.loaded = new_lines(
            self.cell, self.round, raw, self.printed, self.loaded, time.time(), self.start
        )
        for line in lines:
            self.write(line)
