"""The incremental aggregation's cache (cellbench.rowcache): an aggregation through it writes the
same bytes as a full one, reads again only the files that changed, and rebuilds whatever part
of the cache it cannot vouch for."""

import json
import os
import zlib
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from cellbench import metrics, rowcache
from test_metrics import _row, grow, grown_history


def write_cell(folder: Path, index: int, speed: float = 10.0, rows: int = 2) -> str:
    path = folder / "cells" / f"c{index:04d}" / "metrics.parquet"
    metrics.write_parquet(
        path,
        metrics.to_table(
            [
                _row(
                    cell_id=f"c{index:04d}-0123456789",
                    cell_name=f"c{index:04d}",
                    repeat=r,
                    output_tok_s=speed + index + r,
                )
                for r in range(rows)
            ]
        ),
    )
    return str(path.relative_to(folder))


@pytest.fixture
def study(tmp_path, monkeypatch):
    """100 cells of 2 rows each (speed 10 + index + repeat) and a cache folder. Paths relative to
    the study's folder, as the rule gives them: their shards are cells 0-15, 16-34, 35-47, 48-66,
    67-90 and 91-99 (cut where the CRC-32 of a path is 0 modulo 32)."""
    monkeypatch.chdir(tmp_path)
    files = [write_cell(tmp_path, i) for i in range(100)]
    assert [(run.start, run.stop) for run in rowcache.cut(files)] == [
        (0, 16), (16, 35), (35, 48), (48, 67), (67, 91), (91, 100)
    ]  # fmt: skip
    return tmp_path, files, tmp_path / "cache"


def full(files, out: Path) -> bytes:
    rowcache.combine(files, out, None)
    return out.read_bytes()


def speeds(summary: Path) -> list[float]:
    return pl.read_parquet(summary)["output_tok_s"].to_list()


def test_cut_points_depend_on_the_paths_not_their_positions():
    paths = [f"results/cells/c{i}/round-1/metrics.parquet" for i in range(500)]
    runs = rowcache.cut(paths)
    assert [p for run in runs for p in (paths[i] for i in run)] == paths  # every path once, in order
    for run in runs[:-1]:  # each run ends on a cut point (or at the longest run)
        last = paths[run.stop - 1]
        assert zlib.crc32(last.encode()) % rowcache.SPAN == 0 or len(run) == rowcache.MAX_SPAN
    # Removing a path changes only the run it was in: the runs before and after stay the same.
    shorter = paths[:250] + paths[251:]
    before = [tuple(paths[i] for i in run) for run in runs]
    after = [tuple(shorter[i] for i in run) for run in rowcache.cut(shorter)]
    changed = set(before) ^ set(after)
    assert len(changed) == 2 and any(paths[250] in run for run in changed)


def test_cut_by_hand():
    # CRC-32 (zlib): "a" 0xe8b7be43, "b" 0x71beeff9, "f" 0x76d32be0; modulo 32: 3, 25, 0.
    assert [zlib.crc32(n.encode()) for n in "abf"] == [0xE8B7BE43, 0x71BEEFF9, 0x76D32BE0]
    assert rowcache.cut(["a", "f", "b"]) == [range(0, 2), range(2, 3)]  # a cut after "f" only
    assert rowcache.cut(["f"]) == [range(0, 1)]
    assert rowcache.cut([]) == []
    assert rowcache.cut(["a"] * 130) == [range(0, 128), range(128, 130)]  # MAX_SPAN = 128


def test_cached_and_full_aggregation_write_the_same_bytes_and_read_only_what_changed(study):
    tmp, files, cache = study
    first = rowcache.combine(files, tmp / "s1.parquet", cache)
    assert (first.files_read, first.shards_reused) == (100, 0)
    assert (tmp / "s1.parquet").read_bytes() == full(files, tmp / "full.parquet")
    again = rowcache.combine(files, tmp / "s2.parquet", cache)
    assert (again.files_read, again.shards_reused) == (0, again.shards)
    assert (tmp / "s2.parquet").read_bytes() == (tmp / "full.parquet").read_bytes()
    # One cell rerun (an atomic rewrite with a new figure): that file alone is read again.
    write_cell(tmp, 42, speed=1000.0)
    one = rowcache.combine(files, tmp / "s3.parquet", cache)
    assert (one.files_read, one.shards_reused) == (1, one.shards - 1)
    assert (tmp / "s3.parquet").read_bytes() == full(files, tmp / "full.parquet")
    assert speeds(tmp / "s3.parquet")[84:86] == [1042.0, 1043.0]  # cell 42's rows, in place
    assert (
        pq.ParquetFile(tmp / "s3.parquet").metadata.metadata[b"cellbench.schema_version"]
        == str(metrics.SCHEMA_VERSION).encode()
    )


def test_a_cell_with_more_rows_and_a_deleted_cell(study):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    write_cell(tmp, 7, rows=5)  # a rerun with more repeats: the shard's row counts change
    assert rowcache.combine(files, tmp / "s.parquet", cache).files_read == 1
    assert (tmp / "s.parquet").read_bytes() == full(files, tmp / "full.parquet")
    assert speeds(tmp / "s.parquet")[14:19] == [17.0, 18.0, 19.0, 20.0, 21.0]
    kept = files[:30] + files[31:]  # a cell left the study: its shard is made again from its other files
    counts = rowcache.combine(kept, tmp / "s.parquet", cache)
    assert counts.files_read == 0 and counts.shards_reused == counts.shards - 1
    assert (tmp / "s.parquet").read_bytes() == full(kept, tmp / "full.parquet")
    assert len(speeds(tmp / "s.parquet")) == 99 * 2 + 3


def test_a_file_deleted_on_disk_is_named(study):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    before = (tmp / "s.parquet").read_bytes()
    os.unlink(files[3])
    with pytest.raises(metrics.SchemaError, match=f"{files[3]}: no such metrics file"):
        rowcache.combine(files, tmp / "s.parquet", cache)
    assert (tmp / "s.parquet").read_bytes() == before


def test_a_file_rewritten_in_place_with_the_same_size_is_read_again(study):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    data = Path(files[5]).read_bytes()
    with open(files[5], "r+b") as handle:  # same inode, same size: only the times move
        handle.write(data)
    assert rowcache.combine(files, tmp / "s.parquet", cache).files_read == 1


@pytest.mark.parametrize(
    "damage",
    [
        "flip a byte of a shard",
        "truncate a shard",
        "delete a shard",
        "garbage index",
        "index whose check line does not match",
        "index of another fingerprint",
    ],
)
def test_a_damaged_cache_is_rebuilt_never_trusted(study, damage):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    folder = cache / rowcache.fingerprint()
    shard = sorted(folder.glob("*.arrow"))[1]
    index = folder / rowcache.INDEX
    if damage == "flip a byte of a shard":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate a shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "delete a shard":
        shard.unlink()
    elif damage == "garbage index":
        index.write_bytes(b"\x00garbage")
    elif damage == "index whose check line does not match":
        check, _, body = index.read_bytes().partition(b"\n")
        index.write_bytes(check + b"\n" + body.replace(b'"files":[["', b'"files":[[" ', 1))
    else:
        check, _, body = index.read_bytes().partition(b"\n")
        body = body.replace(folder.name.encode(), b"0" * 16)
        index.write_bytes(rowcache.hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    write_cell(tmp, 50, speed=500.0)  # and a real change beside the damage
    counts = rowcache.combine(files, tmp / "s.parquet", cache)
    assert (tmp / "s.parquet").read_bytes() == full(files, tmp / "full.parquet")
    if "index" in damage:
        assert counts.files_read == 100  # nothing vouched for: everything read again
    else:
        assert 1 < counts.files_read < 100  # that shard's files and cell 50
    # The cache is whole again: the next aggregation reads nothing.
    assert rowcache.combine(files, tmp / "s.parquet", cache).files_read == 0


def test_a_cache_of_an_older_schema_is_left_and_removed(study, monkeypatch):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    old = cache / rowcache.fingerprint()
    grow(monkeypatch, grown_history())  # a new column version (another helper adds one)
    assert rowcache.fingerprint() != old.name
    counts = rowcache.combine(files, tmp / "s.parquet", cache)
    assert counts.files_read == 100 and not old.exists()
    summary = pl.read_parquet(tmp / "s.parquet")
    assert summary.columns[-1] == "joules" and summary["joules"].null_count() == 200
    assert (tmp / "s.parquet").read_bytes() == full(files, tmp / "full.parquet")


def test_an_index_entry_with_the_same_stat_but_other_rows_is_caught_by_the_count(study):
    """The index says how many rows each file had; a shard whose rows do not add up is rebuilt."""
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    folder = cache / rowcache.fingerprint()
    check, _, body = (folder / rowcache.INDEX).read_bytes().partition(b"\n")
    index = json.loads(body)
    entry = index["shards"][0]
    entry["files"][0][5] += 1
    entry["files"][0][2] -= 1  # and its stat no longer matches: the stored rows must be sliced, and they do not fit
    body = json.dumps(index, separators=(",", ":")).encode()
    (folder / rowcache.INDEX).write_bytes(rowcache.hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    counts = rowcache.combine(files, tmp / "s.parquet", cache)
    assert (tmp / "s.parquet").read_bytes() == full(files, tmp / "full.parquet")
    assert counts.files_read == len(entry["files"]) and any("failed its check" in n for n in counts.notes)


def test_no_files_and_stale_shards_are_pruned(study):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    folder = cache / rowcache.fingerprint()
    shards = set(folder.glob("*.arrow"))
    write_cell(tmp, 0, speed=99.0)
    rowcache.combine(files, tmp / "s.parquet", cache)
    after = set(folder.glob("*.arrow"))
    assert len(after) == len(shards) and len(after - shards) == 1  # the old version of the shard is gone
    assert rowcache.combine([], tmp / "empty.parquet", cache).files == 0
    assert pq.read_schema(tmp / "empty.parquet") == metrics.SCHEMA
    assert list(folder.glob("*.arrow")) == []


def test_rows_of_a_newer_schema_are_refused_naming_the_file_and_the_summary_stays(study):
    tmp, files, cache = study
    rowcache.combine(files, tmp / "s.parquet", cache)
    before = (tmp / "s.parquet").read_bytes()
    newer = metrics.SCHEMA_VERSION + 1
    table = metrics.to_table([_row(schema_version=newer)]).replace_schema_metadata(
        {"cellbench.schema_version": str(newer)}
    )
    pq.write_table(table, files[60])
    with pytest.raises(metrics.SchemaError, match=f"{files[60]}: schema_version {newer} was written by a newer"):
        rowcache.combine(files, tmp / "s.parquet", cache)
    assert (tmp / "s.parquet").read_bytes() == before


def test_the_same_file_twice_reads_as_twice_its_rows(study):
    tmp, files, cache = study
    twice = files[:3] + files[:3]
    rowcache.combine(twice, tmp / "s.parquet", cache)
    assert speeds(tmp / "s.parquet") == [10.0, 11.0, 11.0, 12.0, 12.0, 13.0] * 2
    assert (tmp / "s.parquet").read_bytes() == full(twice, tmp / "full.parquet")


def test_cellbench_aggregate_keeps_its_cache_beside_the_summary_and_writes_the_same_tables(study, capsys):
    from cellbench import cli, paths

    tmp, files, _ = study
    argv = ["aggregate", "--study", "s", "--baseline-id", "c0000-0123456789", "--baseline-name", "c0000",
            "--machine-id", "m", "--summary", "results/summary.parquet", "--tables", "results/tables"]  # fmt: skip

    def run(*extra) -> tuple[str, dict[str, bytes]]:
        assert cli.main([*argv, *extra, *files]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cellbench: aggregate:"))
        tables = {p.name: p.read_bytes() for p in sorted(Path("results/tables").iterdir())}
        return line, {"summary.parquet": Path("results/summary.parquet").read_bytes(), **tables}

    line, first = run()
    assert "100 of 100 metrics files read" in line
    assert (paths.aggregate_cache(Path("results")) / rowcache.fingerprint() / rowcache.INDEX).is_file()
    write_cell(tmp, 3, speed=70.0)
    line, incremental = run()
    assert "1 of 100 metrics files read, 5 of 6 shards reused" in line
    line, whole = run("--no-cache")
    assert "100 of 100 metrics files read" in line
    assert incremental == whole and incremental != first


def test_a_cache_folder_that_cannot_be_written_gives_a_full_aggregation(study):
    tmp, files, _ = study
    blocked = tmp / "blocked"
    blocked.write_text("a file where the cache folder would be")
    counts = rowcache.combine(files, tmp / "s.parquet", blocked / "cache")
    assert counts.files_read == 100 and "not writable" in counts.line()
    assert (tmp / "s.parquet").read_bytes() == full(files, tmp / "full.parquet")
