"""The per-cell points kept between aggregations (cellbench.pointcache): an aggregation through
them writes the same summary and tables as a full one, whatever changed: one cell, the baseline
cell, a canary that moves the machine's median (and so other cells' flagged rounds), a cell
added, a cell removed; and it computes again only the cells it must."""

import re
import shutil
from pathlib import Path

import pytest
from cellbench import cli, metrics, paths, pointcache, rowcache, stats
from test_metrics import _row

ARGV = ["aggregate", "--study", "s", "--baseline-id", "c0-0123456789", "--baseline-name", "c0",
        "--machine-id", "m", "--summary", "results/summary.parquet", "--tables", "results/tables"]  # fmt: skip


def write_round(cell: int, round_: int, speed: float, canary: float, machine: str = "m") -> str:
    """One round of a cell: 2 points x 2 repeats; its canary (one thread and all threads) as given."""
    path = paths.cell_metrics(f"c{cell}-0123456789", round_)
    rows = [
        _row(cell_id=f"c{cell}-0123456789", cell_name=f"c{cell}", machine_id=machine, round=round_, repeat=r,
             batch_size=batch, output_tok_s=speed * batch + r, latency_p50_s=1.0 + r,
             status="failed" if cell == 5 else "ok", error="refused" if cell == 5 else None,
             canary_matmul_1t_gflops=canary, canary_matmul_all_gflops=2 * canary, host_foreign_cpu=0.1)
        for batch in (1, 2) for r in range(2)
    ]  # fmt: skip
    metrics.write_parquet(path, metrics.to_table(rows))
    return str(path)


@pytest.fixture
def study(tmp_path, monkeypatch):
    """Cells c0 (the baseline) to c5 on machine m, 2 rounds each (a file per round), c5 failed;
    c6 on machine m2. Canaries: c0-c2 at 100, c3-c5 at 150: the median 125, nothing flagged
    (tolerance 25 %). Shards of about 2 files, so a change touches few of them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rowcache, "SPAN", 2)
    monkeypatch.setattr(rowcache, "MAX_SPAN", 3)
    files = [write_round(c, k, 10.0 + c, 100.0 if c < 3 else 150.0) for c in range(6) for k in (1, 2)]
    files += [write_round(6, k, 30.0, 100.0, machine="m2") for k in (1, 2)]
    return files


def aggregate(capsys, files, *extra) -> tuple[tuple[int, int], str, dict[str, bytes]]:
    """((cells computed, cells), the points line, {file: bytes}) of `cellbench aggregate`."""
    assert cli.main([*ARGV, *extra, *files]) == 0
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if x.startswith("cellbench: points:")), "")
    found = re.search(r"([0-9,]+) of ([0-9,]+) cells' points computed", line)
    counts = (int(found[1]), int(found[2])) if found else (-1, -1)
    written = {p.name: p.read_bytes() for p in sorted(Path("results/tables").iterdir())}
    return counts, line, {"summary.parquet": Path("results/summary.parquet").read_bytes(), **written}


def same_as_full(capsys, files, written: dict[str, bytes]) -> None:
    """`written` is what a full aggregation writes: without the cache, and with an empty one."""
    assert aggregate(capsys, files, "--no-cache")[2] == written
    keep = Path("kept-cache")
    shutil.copytree(paths.aggregate_cache(Path("results")), keep)
    shutil.rmtree(paths.aggregate_cache(Path("results")))
    (computed, cells), _, empty = aggregate(capsys, files)
    assert computed == cells and empty == written
    shutil.rmtree(paths.aggregate_cache(Path("results")))
    shutil.copytree(keep, paths.aggregate_cache(Path("results")))
    shutil.rmtree(keep)


def csv(written: dict[str, bytes]) -> str:
    return written["summary.csv"].decode()


@pytest.mark.parametrize("batch", [pointcache.BATCH_SHARDS, 1])
def test_incremental_points_equal_a_full_aggregation(study, capsys, monkeypatch, batch):
    monkeypatch.setattr(pointcache, "BATCH_SHARDS", batch)  # 1: every shard's cells computed apart
    files = study
    (computed, cells), _, first = aggregate(capsys, files)
    assert (computed, cells) == (7, 7)
    assert (aggregate(capsys, files)[0]) == (0, 7)  # nothing changed: nothing computed

    write_round(4, 2, 40.0, 150.0)  # one cell's rerun
    (computed, _), _, one = aggregate(capsys, files)
    assert 1 <= computed < 7 and one != first
    same_as_full(capsys, files, one)

    write_round(0, 1, 20.0, 100.0)  # the baseline's rerun: every ratio on m moves
    (computed, _), _, base = aggregate(capsys, files)
    assert computed < 7 and base != one
    same_as_full(capsys, files, base)

    # c0's canary to 150 in both rounds: the median goes to 150, and c1's and c2's rounds at 100
    # are now flagged (0.67x) although their rows did not change.
    for k in (1, 2):
        write_round(0, k, 10.0, 150.0)
    (computed, _), line, moved = aggregate(capsys, files)
    # c1 shares a shard with c0 (its rows' shard changed); c2's rows did not change, its flags did.
    assert "(1 for their flagged rounds)" in line and computed < 7
    assert "canary matmul_1t_gflops at 0.67× the machine's median" in csv(moved)
    same_as_full(capsys, files, moved)

    added = files + [write_round(7, 1, 12.0, 150.0)]  # a cell added
    (computed, cells), _, more = aggregate(capsys, added)
    assert cells == 8 and computed < 8 and "c7" in csv(more)
    same_as_full(capsys, added, more)

    removed = [f for f in added if "c3-" not in f]  # a cell removed
    (computed, cells), _, fewer = aggregate(capsys, removed)
    assert cells == 7 and computed < 7 and ",c3," not in csv(fewer)
    same_as_full(capsys, removed, fewer)


def test_damaged_or_foreign_points_are_computed_again_never_trusted(study, capsys):
    files = study
    _, _, first = aggregate(capsys, files)
    folder = paths.aggregate_cache(Path("results")) / rowcache.fingerprint() / pointcache.FOLDER
    part = folder / "points.arrow"
    part.write_bytes(part.read_bytes()[:-8] + b"\0" * 8)  # damaged bytes: the sha256 no longer matches
    (computed, cells), line, again = aggregate(capsys, files)
    assert computed == cells and "kept points not usable" in line and again == first
    # Other statistics settings: none of the kept parts is used.
    (computed, cells), _, other = aggregate(capsys, files, "--statistics", '{"confidence": 0.9}')
    assert computed == cells
    assert aggregate(capsys, files, "--no-cache", "--statistics", '{"confidence": 0.9}')[2] == other


def test_fingerprints_follow_the_shards_that_hold_a_cell():
    entries = [
        {"sha256": "a", "cells": [["m", "x"], ["m", "y"]]},
        {"sha256": "b", "cells": [["m", "y"], ["m2", "x"]]},
    ]
    found = pointcache.fingerprints(entries)
    assert set(found) == {("m", "x"), ("m", "y"), ("m2", "x")}
    # y's rows lie in both shards, in order: a new shard b changes y's and m2's x's, not m's x's.
    entries[1]["sha256"] = "c"
    changed = pointcache.fingerprints(entries)
    assert [key for key in found if found[key] != changed[key]] == [("m", "y"), ("m2", "x")]


def test_batches_keep_each_cell_whole_in_the_batch_of_its_first_shard(monkeypatch):
    monkeypatch.setattr(pointcache, "BATCH_SHARDS", 2)
    x, y, z, w = (pointcache.cell_key("m", c) for c in "xyzw")
    entries = [
        {"cells": [["m", "x"], ["m", "y"]]},
        {"cells": [["m", "y"]]},  # y again: already in the first batch
        {"cells": [["m", "z"]]},
        {"cells": [["m", "w"]]},
    ]
    # Shards 1 and 2 hold a wanted cell that is not yet placed: batch 1; shard 3 starts batch 2.
    assert pointcache.batches(entries, {x, z, w}) == [{x, z}, {w}]
    # Shard 2 places no cell (y is placed): it does not count towards the batch.
    assert pointcache.batches(entries, {x, y, z, w}) == [{x, y, z}, {w}]
    assert pointcache.batches(entries, set()) == []


def test_damaged_marks_or_quantiles_are_computed_again_never_trusted(study, capsys):
    """The cells' "same as" marks and the t quantiles kept beside the parts: a damaged file is
    computed again and the tables are those of a full aggregation."""
    files = study
    _, _, first = aggregate(capsys, files)
    folder = paths.aggregate_cache(Path("results")) / rowcache.fingerprint()
    marks = folder / pointcache.FOLDER / f"{pointcache.MARKS}-same_as.arrow"
    quantiles = folder / pointcache.QUANTILES
    assert marks.exists() and quantiles.exists()
    marks.write_bytes(marks.read_bytes()[:-8] + b"\0" * 8)
    quantiles.write_bytes(quantiles.read_bytes().replace(b"]", b"0]", 1))  # a value changed: the check fails
    stats.KNOWN_QUANTILES.clear()
    assert aggregate(capsys, files)[2] == first
    assert marks.read_bytes() != b"" and stats.KNOWN_QUANTILES


def test_kept_quantiles_are_those_computed_and_a_changed_file_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "KNOWN_QUANTILES", {})
    monkeypatch.setattr(stats, "_quantiles_added", False)
    value = stats.t_quantile(0.95, 2)
    assert value == pytest.approx(4.302652729911275) and stats._quantiles_added
    path = tmp_path / "q.json"
    stats.save_quantiles(path)
    monkeypatch.setattr(stats, "KNOWN_QUANTILES", {})
    stats.load_quantiles(path)
    loaded = stats.KNOWN_QUANTILES
    assert loaded == {(0.95, 2.0): value}  # exactly: JSON keeps a float's every bit
    check, body = path.read_bytes().split(b"\n", 1)
    path.write_bytes(check + b"\n" + body.replace(b"4.3", b"9.3"))
    monkeypatch.setattr(stats, "KNOWN_QUANTILES", {})
    stats.load_quantiles(path)
    assert stats.KNOWN_QUANTILES == {}
    assert stats.t_quantile(0.95, float("nan")) != stats.t_quantile(0.95, float("nan"))  # NaN, as stdtrit
