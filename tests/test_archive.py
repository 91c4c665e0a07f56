"""Archive and import: a round trip, and a corpus of hostile archives each refused with a one-line
reason and nothing written. The archives are built here from a results dir of real Parquet
(rows from the same code a cell run uses), then tampered with member by member."""

import copy
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cellbench import archive, cli, config, measure, metrics, serving

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src-machine"
LOCAL = "local-machine"


@pytest.fixture(scope="module")
def study():
    study = config.load_study(ROOT / "config" / "config.yaml")
    return study, config.resolve(study)


def make_results(results: Path, study: dict, resolved: dict, machine: str = SOURCE) -> None:
    for cell_id, cell in resolved["cells"].items():
        context = {"study": resolved["study"], "machine_id": machine, "run_id": "r1", "config_hash": "h"}
        rows = measure.rows_for_cell(cell, None, context, status="failed", error="engine did not start")
        folder = results / "cells" / cell_id / "round-1"
        metrics.write_parquet(folder / "metrics.parquet", metrics.to_table(rows))
        (folder / "provenance.json").write_text(json.dumps({"cell": cell_id}))
        (folder / "engine.log").write_text(f"log of {cell_id}\n")
    (results / "images").mkdir()
    for image in study["images"]:
        (results / "images" / f"{image}.json").write_text(json.dumps({"name": image, "tag": "cellbench/base:bookworm"}))
    (results / "models" / "smollm2-135m").mkdir(parents=True)
    (results / "models" / "smollm2-135m" / "manifest.json").write_text(json.dumps({"name": "smollm2-135m"}))
    (results / "models" / "smollm2-135m" / "model.safetensors").write_bytes(b"weights stay home")


@pytest.fixture(scope="module")
def valid(tmp_path_factory, study):
    """A valid archive of machine SOURCE, made by `cellbench archive`."""
    home = tmp_path_factory.mktemp("source")
    make_results(home / "results", *study)
    cwd = os.getcwd()
    os.chdir(home)
    try:
        code = cli.main(["archive", "--configfile", str(ROOT / "config" / "config.yaml"), "--machine-id", SOURCE])
    finally:
        os.chdir(cwd)
    assert code == 0
    (path,) = (home / "results" / "archive").glob("*.tar.gz")
    return path


def read_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def write_members(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def entry(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, data


def manifest_of(members) -> dict:
    return json.loads(members[0][1])


def with_manifest(members, change, rehash: bool = False) -> list:
    """Members with MANIFEST.json changed by `change(manifest)`; `rehash` first makes the
    manifest's checksums match the (tampered) members, so a later check is what refuses."""
    manifest = manifest_of(members)
    if rehash:
        manifest["members"] = {
            info.name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for info, data in members[1:]
        }
    change(manifest)
    head = members[0][0]
    return [(head, json.dumps(manifest).encode()), *members[1:]]


def first(members, suffix: str) -> int:
    return next(i for i, (info, _) in enumerate(members) if info.name.endswith(suffix))


def replace(members, suffix: str, data: bytes) -> list:
    index = first(members, suffix)
    return [*members[:index], (members[index][0], data), *members[index + 1 :]]


def liar_metrics(members) -> bytes:
    """The first cell's metrics with rows claiming another machine (schema and metadata kept)."""
    table = pq.read_table(io.BytesIO(members[first(members, "metrics.parquet")][1]))
    index = table.schema.get_field_index("machine_id")
    table = table.set_column(index, table.schema.field(index), pa.array(["someone-else"] * len(table)))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _drop(members, suffix):
    index = first(members, suffix)
    return members[:index] + members[index + 1 :]


# name -> (tamper(members) -> members, limits or None, expected words in the message)
HOSTILE = {
    "absolute path": (lambda m: [*m, entry("/etc/cron.d/evil")], None, "absolute path"),
    "dot-dot": (lambda m: [*m, entry("cells/../../evil")], None, "leaves the archive"),
    "symlink": (lambda m: [*m, entry("cells/x/engine.log", b"", tarfile.SYMTYPE, "/etc/passwd")], None, "symbolic"),
    "hard link": (lambda m: [*m, entry("cells/x/engine.log", b"", tarfile.LNKTYPE, "/etc/passwd")], None, "hard link"),
    "char device": (lambda m: [*m, entry("cells/x/engine.log", b"", tarfile.CHRTYPE)], None, "device"),
    "block device": (lambda m: [*m, entry("cells/x/engine.log", b"", tarfile.BLKTYPE)], None, "device"),
    "fifo": (lambda m: [*m, entry("cells/x/engine.log", b"", tarfile.FIFOTYPE)], None, "fifo"),
    "directory": (lambda m: [*m, entry("cells/x", b"", tarfile.DIRTYPE)], None, "not a regular file"),
    "control character": (lambda m: [*m, entry("cells/x\n/engine.log")], None, "malformed path"),
    "unexpected path": (lambda m: [*m, entry("run.sh", b"rm -rf /")], None, "not a path a cellbench archive holds"),
    "oversize member": (lambda m: m, archive.Limits(member_bytes=100), "oversize member"),
    "oversize archive": (lambda m: m, archive.Limits(archive_bytes=1000), "oversize archive"),
    "decompression bomb": (lambda m: m, archive.Limits(total_bytes=5000), "unpacks to more than"),
    "checksum mismatch": (
        lambda m: replace(m, "engine.log", b"X" * len(m[first(m, "engine.log")][1])),
        None,
        "checksum mismatch",
    ),
    "size mismatch": (lambda m: replace(m, "engine.log", m[first(m, "engine.log")][1] + b"!"), None, "size mismatch"),
    "missing member": (lambda m: _drop(m, "provenance.json"), None, "missing member"),
    "extra member": (lambda m: [*m, entry("images/other.json", b"{}")], None, "extra member"),
    "duplicate member": (lambda m: [*m, m[first(m, "engine.log")]], None, "duplicate member"),
    "duplicate manifest": (lambda m: [*m, m[0]], None, "duplicate member"),
    "missing manifest": (lambda m: m[1:], None, "MANIFEST.json': missing"),
    "malformed manifest": (lambda m: [(m[0][0], b"{not json"), *m[1:]], None, "malformed JSON"),
    "manifest not an object": (lambda m: [(m[0][0], b"[1, 2]"), *m[1:]], None, "not a JSON object"),
    "manifest field of the wrong type": (
        lambda m: with_manifest(m, lambda x: x.update(members=[])),
        None,
        "members must be a dict",
    ),
    "manifest entry without checksum": (
        lambda m: with_manifest(m, lambda x: x["members"][next(iter(x["members"]))].pop("sha256")),
        None,
        "malformed MANIFEST.json entry",
    ),
    "manifest lists a hostile path": (
        lambda m: with_manifest(
            m, lambda x: x["members"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}})
        ),
        None,
        "not a path a cellbench archive holds",
    ),
    "unknown format version": (
        lambda m: with_manifest(m, lambda x: x.update(format_version=99)),
        None,
        "unknown format_version 99",
    ),
    "unknown schema version": (
        lambda m: with_manifest(m, lambda x: x.update(schema_version=metrics.SCHEMA_VERSION + 1)),
        None,
        f"unknown schema_version {metrics.SCHEMA_VERSION + 1}",
    ),
    "not a cellbench archive format": (lambda m: with_manifest(m, lambda x: x.update(format="zip")), None, "format"),
    "machine id that walks up": (lambda m: with_manifest(m, lambda x: x.update(machine_id="..")), None, "machine_id"),
    "machine id with a slash": (lambda m: with_manifest(m, lambda x: x.update(machine_id="a/b")), None, "machine_id"),
    "archive id with a slash": (lambda m: with_manifest(m, lambda x: x.update(archive_id="../x")), None, "archive_id"),
    "metrics that are not Parquet": (
        lambda m: with_manifest(replace(m, "metrics.parquet", b"PAR1 nope"), lambda x: None, rehash=True),
        None,
        "not readable Parquet",
    ),
    "metrics of another machine": (
        lambda m: with_manifest(replace(m, "metrics.parquet", liar_metrics(m)), lambda x: None, rehash=True),
        None,
        "rows have machine_id ['someone-else']",
    ),
}


def snapshot(workdir: Path) -> dict:
    """Every path under results/ with its size and mtime."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted((workdir / "results").rglob("*"))}


@pytest.fixture
def importer(tmp_path):
    """A machine's working dir that already has results; a refused import must not change them."""
    (tmp_path / "results" / "cells" / "kept").mkdir(parents=True)
    (tmp_path / "results" / "cells" / "kept" / "metrics.parquet").write_bytes(b"local")
    return tmp_path


def test_hostile_corpus_is_large_enough():
    assert len(HOSTILE) >= 15


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_written(case, valid, importer, tmp_path_factory):
    tamper, limits, expected = HOSTILE[case]
    hostile = write_members(tmp_path_factory.mktemp("hostile") / "hostile.tar.gz", tamper(read_members(valid)))
    assert expected in refuse(hostile, importer, limits)


def test_not_a_tar_gz_and_truncated_archives_are_refused(valid, importer, tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not gzip at all")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    before = snapshot(importer)
    for path in (garbage, truncated):
        with pytest.raises(archive.ArchiveError, match="not a readable .tar.gz"):
            archive.import_archive(path, importer / "results", LOCAL)
    assert snapshot(importer) == before


def test_archive_from_this_machine_is_refused(valid, importer):
    before = snapshot(importer)
    with pytest.raises(archive.ArchiveError, match="comes from this machine"):
        archive.import_archive(valid, importer / "results", SOURCE)
    assert snapshot(importer) == before


def test_cli_refusal_is_one_line_naming_member_and_reason(valid, importer, tmp_path, capsys, monkeypatch):
    hostile = write_members(tmp_path / "h.tar.gz", [*read_members(valid), entry("cells/../../evil")])
    monkeypatch.chdir(importer)
    assert cli.main(["import", str(hostile), "--machine-id", LOCAL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused: 'cells/../../evil': path leaves the archive" in err


def test_round_trip_then_no_op_then_clash(valid, importer, study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(importer)
    assert cli.main(["import", str(valid), "--machine-id", LOCAL]) == 0
    manifest = manifest_of(read_members(valid))
    target = importer / "results" / "imported" / SOURCE / manifest["archive_id"]
    for rel, expected in manifest["members"].items():
        if rel.endswith("metrics.parquet"):  # written again from its checked rows: the same rows
            source = dict((info.name, data) for info, data in read_members(valid))[rel]
            assert pq.read_table(target / rel).equals(pq.read_table(io.BytesIO(source)))
        else:
            assert hashlib.sha256((target / rel).read_bytes()).hexdigest() == expected["sha256"]
    assert json.loads((target / "MANIFEST.json").read_text()) == manifest
    assert not (target / "models" / "smollm2-135m" / "model.safetensors").exists()  # manifests, not weights
    assert set(manifest["members"]) >= {"study/config.json", "study/resolved.json", "images/cpu.json"}
    assert not [p for p in (importer / "results" / "imported").rglob(".*")]  # no temp dir left
    before = snapshot(importer)
    assert cli.main(["import", str(valid), "--machine-id", LOCAL]) == 0
    assert "already imported" in capsys.readouterr().out and snapshot(importer) == before
    # Same machine and archive id, different content: refused, the first import untouched.
    clash = write_members(
        tmp_path / "clash.tar.gz",
        with_manifest(replace(read_members(valid), "engine.log", b"other log"), lambda x: None, rehash=True),
    )
    with pytest.raises(archive.ArchiveError, match="clash"):
        archive.import_archive(clash, Path("results"), LOCAL)
    assert snapshot(importer) == before


def test_manifest_records_versions_and_every_member(valid, study):
    manifest = manifest_of(read_members(valid))
    assert manifest["format"] == archive.FORMAT and manifest["format_version"] == archive.FORMAT_VERSION
    assert manifest["schema_version"] == metrics.SCHEMA_VERSION
    assert manifest["method_version"] == metrics.METHOD_VERSION
    assert manifest["machine_id"] == SOURCE and valid.name == f"{SOURCE}-{manifest['archive_id']}.tar.gz"
    assert manifest["created_at"].startswith(manifest["archive_id"][:4]) and manifest["cellbench_version"]
    cells = {rel.split("/")[1] for rel in manifest["members"] if rel.startswith("cells/")}
    assert cells == set(study[1]["cells"])
    assert {name for info, _ in read_members(valid)[1:] for name in [info.name]} == set(manifest["members"])


def test_archive_refuses_a_bad_machine_id_and_empty_results(study, tmp_path):
    with pytest.raises(archive.ArchiveError, match="machine_id"):
        archive.create(*study, machine_id="../x", git_sha=None, results=tmp_path, out_dir=tmp_path, with_images=False,
                       log=None)  # fmt: skip
    with pytest.raises(archive.ArchiveError, match="no cell of study"):
        archive.create(*study, machine_id="m", git_sha=None, results=tmp_path, out_dir=tmp_path, with_images=False,
                       log=None)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Issue 15, classes 9-12: what import writes must aggregate, bounded resources, ids that full-match
# their format, rounds imported whole. Built from the class descriptions, member by member.


def metrics_table(members) -> pa.Table:
    return pq.ParquetFile(pa.BufferReader(members[first(members, "metrics.parquet")][1])).read()


def parquet_bytes(table: pa.Table, **options) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def set_column(table: pa.Table, name: str, array) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, pa.field(name, array.type), array)


def with_metrics(members, change) -> list:
    """The first round's metrics rewritten by change(table) (schema metadata kept), manifest rehashed."""
    data = parquet_bytes(change(metrics_table(members)))
    return with_manifest(replace(members, "metrics.parquet", data), lambda x: None, rehash=True)


def column_of(table, name, values, typ=None) -> pa.Table:
    return set_column(table, name, pa.array(values * len(table), typ))


def bad_utf8(table) -> pa.Table:
    offsets = pa.array([2 * i for i in range(len(table) + 1)], pa.int32()).buffers()[1]
    array = pa.Array.from_buffers(pa.string(), len(table), [None, offsets, pa.py_buffer(b"\xff\xfe" * len(table))])
    return set_column(table, "cell_name", array)


def cell_ids(members) -> list[str]:
    return sorted({info.name.split("/")[1] for info, _ in members if info.name.startswith("cells/")})


def add_members(members, *extra) -> list:
    """Members plus `extra` (name, bytes) pairs, all listed in a rehashed manifest."""
    return with_manifest([*members, *(entry(name, data) for name, data in extra)], lambda x: None, rehash=True)


def drop_listed(members, suffix) -> list:
    return with_manifest(_drop(members, suffix), lambda x: None, rehash=True)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def zeros_member(name: str, size: int) -> tuple:
    """A member of `size` zero bytes, streamed into the archive (never held in memory)."""

    class Zeros(io.RawIOBase):
        def readinto(self, buffer):
            buffer[:] = bytes(len(buffer))
            return len(buffer)

    info = tarfile.TarInfo(name)
    info.size = size
    return info, Zeros()


def write_streamed(path: Path, members, level: int = 1) -> Path:
    """Like write_members, but members may be (info, file object) of a size given in info."""
    with tarfile.open(path, "w:gz", compresslevel=level) as tar:
        for info, data in members:
            if isinstance(data, bytes):
                info.size = len(data)
                data = io.BytesIO(data)
            tar.addfile(info, data)
    return path


def listing(members, extra: dict) -> list:
    """Members with MANIFEST.json listing their bytes members and `extra` (name -> (sha256, size))."""
    manifest = manifest_of(members)
    manifest["members"] = {
        info.name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for info, data in members[1:]
        if isinstance(data, bytes)
    } | {name: {"sha256": sha, "bytes": size} for name, (sha, size) in extra.items()}
    return [(members[0][0], json.dumps(manifest).encode()), *members[1:]]


def zero_bomb(members, size: int) -> list:
    """The first engine.log replaced by `size` zero bytes, listed with their true checksum."""
    name = members[first(members, "engine.log")][0].name
    return listing([*_drop(members, "engine.log"), zeros_member(name, size)], {name: (zero_sha(size), size)})


def ghost_cell(members) -> list:
    """A complete round of a cell the archived study does not have (its rows say so too)."""
    table = metrics_table(members)
    data = parquet_bytes(column_of(table, "cell_id", ["ghost-0123456789"]))
    names = ("metrics.parquet", "provenance.json", "engine.log")
    return add_members(
        members, *zip([f"cells/ghost-0123456789/round-1/{n}" for n in names], [data, b"{}", b"x"], strict=True)
    )


def zero_sha(size: int) -> str:
    digest = hashlib.sha256()
    for _ in range(size // archive.MiB):
        digest.update(bytes(archive.MiB))
    return digest.hexdigest()


def repeated_rows(members, rows: int) -> list:
    table = metrics_table(members)
    return with_manifest(
        replace(members, "metrics.parquet", parquet_bytes(table.take([0] * rows))), lambda x: None, rehash=True
    )


def dictionary_bomb(members, rows: int = 16_000, size: int = 64 * 1024) -> list:
    """A 23 KB metrics file whose `error` column is one 64 KiB string repeated: 1 GiB decoded
    (built from string views over one buffer, so making it costs no GiB either)."""
    table = metrics_table(members).take([0] * rows)
    view = struct.pack("<i4sii", size, b"xxxx", 0, 0)
    array = pa.Array.from_buffers(pa.string_view(), rows, [None, pa.py_buffer(view * rows), pa.py_buffer(b"x" * size)])
    data = parquet_bytes(set_column(table, "error", array))
    return with_manifest(replace(members, "metrics.parquet", data), lambda x: None, rehash=True)


def big_pax(members) -> list:
    info, data = members[first(members, "engine.log")]
    info = tarfile.TarInfo(info.name)
    info.pax_headers = {"comment": "x" * (2 * archive.MiB)}
    return [*members[: first(members, "engine.log")], (info, data), *members[first(members, "engine.log") + 1 :]]


def manifest_bytes(members, data: bytes) -> list:
    return [(members[0][0], data), *members[1:]]


# class -> name -> (tamper(members) -> members, limits or None, expected words in the one-line refusal)
CLASSES = {
    9: {
        "JSON column that is not JSON": (
            lambda m: with_metrics(m, lambda t: column_of(t, "settings_json", ["{not json"])), None,
            "column 'settings_json' row 0: not JSON"),
        "JSON column nested 100k deep": (
            lambda m: with_metrics(m, lambda t: column_of(t, "effective_json", ['{"a": ' + nested(100_000) + "}"])),
            None, "column 'effective_json' row 0: JSON nested deeper than 32"),
        "JSON column nested just past the limit": (
            lambda m: with_metrics(m, lambda t: column_of(t, "versions_json", ['{"a": ' + nested(32) + "}"])),
            None, "JSON nested deeper than 32"),
        "JSON cell over 1 MiB": (
            lambda m: with_metrics(m, lambda t: column_of(t, "findings_json", ["[" + "1," * (1 << 19) + "1]"])),
            None, "more than 1048576"),
        "JSON column of the wrong JSON type": (
            lambda m: with_metrics(m, lambda t: column_of(t, "overrides_json", ['{"a": 1}'])), None,
            "expected a JSON list"),
        "number column stored as strings": (
            lambda m: with_metrics(m, lambda t: column_of(t, "output_tok_s", ["12.5"], pa.string())), None,
            "column 'output_tok_s' is string, the schema says double"),
        "integer column stored as floats": (
            lambda m: with_metrics(m, lambda t: column_of(t, "batch_size", [1.0], pa.float64())), None,
            "column 'batch_size' is double, the schema says int64"),
        "required column null": (
            lambda m: with_metrics(m, lambda t: column_of(t, "model", [None], pa.string())), None,
            "null in a required column"),
        "required column missing": (lambda m: with_metrics(m, lambda t: t.drop_columns(["status"])), None,
                                    "required column 'status' is missing"),
        "unknown status": (lambda m: with_metrics(m, lambda t: column_of(t, "status", ["great"])), None,
                           "'great' is not one of"),
        "unknown column": (lambda m: with_metrics(m, lambda t: t.append_column("colour", pa.array(["red"] * len(t)))),
                           None, "column 'colour' is not in schema version"),
        "metrics of a newer schema version": (
            lambda m: with_metrics(m, lambda t: t.replace_schema_metadata(
                {"cellbench.schema_version": str(metrics.SCHEMA_VERSION + 1)})), None,
            f"written by a newer cellbench (this one reads up to {metrics.SCHEMA_VERSION}); upgrade cellbench"),
        "rows of a newer schema version": (
            lambda m: with_metrics(m, lambda t: column_of(t, "schema_version", [7], pa.int64())), None,
            "upgrade cellbench"),
    },
    10: {
        "unlisted member that inflates to 64 MiB": (
            lambda m: [*m, zeros_member(f"cells/{cell_ids(m)[0]}/round-3/engine.log", 64 * archive.MiB)], None,
            "extra member, not listed"),
        "listed 1 GiB zero-filled member": (
            lambda m: with_manifest(m, lambda x: x["members"][m[first(m, "engine.log")][0].name].update(bytes=1 << 30)),
            None, "oversize member (1073741824 bytes, limit 268435456)"),
        "listed member under the cap that inflates 1000:1": (lambda m: zero_bomb(m, 32 * archive.MiB), None,
                                                             "compresses more than 100:1"),
        "member larger than its header said": (
            lambda m: with_manifest(m, lambda x: x["members"][m[first(m, "engine.log")][0].name].update(bytes=1)),
            None, "size mismatch"),
        "2 MiB pax header": (big_pax, None, "tar headers or data beyond"),
        "200k repeated rows": (lambda m: repeated_rows(m, 200_000), None, "200000 rows, more than 20000 in one round"),
        "more rows than the study's points x repeats": (lambda m: repeated_rows(m, 50), None,
                                                        "50 rows, more than the 4 points x repeats"),
        "1 GiB of rows in a 23 KB dictionary": (dictionary_bomb, None, "unpacks to more than 134217728 bytes of rows"),
        "metrics compressed with zstd": (
            lambda m: with_manifest(replace(m, "metrics.parquet", parquet_bytes(metrics_table(m), compression="zstd")),
                                    lambda x: None, rehash=True),
            None, "compressed with ZSTD; cellbench writes SNAPPY"),
        "more members than allowed": (lambda m: m, archive.Limits(members=10), "more than 10"),
        "100,000 tiny listed members": (
            lambda m: with_manifest(m, lambda x: x["members"].update(
                {f"cells/c-{i:010x}/round-1/engine.log": {"sha256": "0" * 64, "bytes": 1} for i in range(100_000)})),
            archive.Limits(manifest_bytes=64 * archive.MiB), "members, more than 30514"),
        "a round the study never ran": (
            lambda m: add_members(m, *[(f"cells/{cell_ids(m)[0]}/round-9/{n}", d) for n, d in
                                       [("metrics.parquet", m[first(m, "metrics.parquet")][1]),
                                        ("provenance.json", b"{}"), ("engine.log", b"x")]]),
            None, "round 9 of a cell the study runs 3 rounds of"),
        "a cell not in the study": (ghost_cell, None, "cell ghost-0123456789 is not a cell of study/resolved.json"),
    },
    11: {
        "machine id ending in a newline": (lambda m: with_manifest(m, lambda x: x.update(machine_id=SOURCE + "\n")),
                                           None, "machine_id 'src-machine\\n' is not a plain name"),
        "machine id starting with a dot": (lambda m: with_manifest(m, lambda x: x.update(machine_id=".hidden")),
                                           None, "machine_id '.hidden'"),
        "machine id too long": (lambda m: with_manifest(m, lambda x: x.update(machine_id="m" * 200)), None,
                                "is not a plain name"),
        "archive id ending in a newline": (
            lambda m: with_manifest(m, lambda x: x.update(archive_id=x["archive_id"] + "\n")), None,
            "is not a UTC stamp"),
        "archive id that is not a stamp": (lambda m: with_manifest(m, lambda x: x.update(archive_id="zzzz")), None,
                                           "archive_id 'zzzz' is not a UTC stamp"),
        "archive id in the future": (
            lambda m: with_manifest(m, lambda x: x.update(archive_id="99991231T235959Z",
                                                           created_at="9999-12-31T23:59:59+00:00")),
            None, "archive_id 99991231T235959Z is in the future"),
        "archive id that is not created_at": (
            lambda m: with_manifest(m, lambda x: x.update(archive_id="20200101T000000Z")), None,
            "is not the time archive_id 20200101T000000Z says"),
        "manifest nested 10,000 deep": (lambda m: manifest_bytes(m, ('{"a": ' + nested(10_000) + "}").encode()),
                                        None, "malformed JSON"),
        "manifest not UTF-8": (lambda m: manifest_bytes(m, m[0][1].replace(b'"format"', b'"\xff\xfeformat"')), None,
                               "malformed JSON"),
        "invalid UTF-8 in a metrics column": (lambda m: with_metrics(m, bad_utf8), None, "Invalid UTF8"),
        "study that is not a name": (lambda m: with_manifest(m, lambda x: x.update(study="../x")), None,
                                     "is not a study name"),
        "cell id that is not a cell id": (
            lambda m: add_members(m, ("cells/X/round-1/engine.log", b"x")), None, "not a path a cellbench archive"),
    },
    12: {
        "a cell with only an engine.log": (
            lambda m: add_members(m, ("cells/ghost-0123456789/round-1/engine.log", b"x")), None,
            "'cells/ghost-0123456789/round-1/': incomplete round, lacks metrics.parquet, provenance.json"),
        "a round without its metrics": (lambda m: drop_listed(m, "metrics.parquet"), None,
                                        "incomplete round, lacks metrics.parquet"),
        "a round without its provenance": (lambda m: drop_listed(m, "provenance.json"), None,
                                           "incomplete round, lacks provenance.json"),
        "a round without its log": (lambda m: drop_listed(m, "engine.log"), None, "incomplete round, lacks engine.log"),
        "a cell in both layouts": (
            lambda m: add_members(m, *[(f"cells/{cell_ids(m)[0]}/{n}", d) for n, d in
                                       [("metrics.parquet", m[first(m, "metrics.parquet")][1]),
                                        ("provenance.json", b"{}"), ("engine.log", b"x")]]),
            None, "both rounds and the layout from before rounds"),
        "a round whose provenance is not JSON": (
            lambda m: with_manifest(replace(m, "provenance.json", b"{nope"), lambda x: None, rehash=True), None,
            "provenance.json': malformed JSON"),
    },
}  # fmt: skip


def test_each_class_has_at_least_three_cases():
    assert {k: len(v) >= 3 for k, v in CLASSES.items()} == {9: True, 10: True, 11: True, 12: True}


def refuse(hostile: Path, importer: Path, limits=None) -> str:
    before = snapshot(importer)
    siblings = sorted(p.name for p in importer.iterdir())
    cwd = os.getcwd()
    os.chdir(importer)
    try:
        with pytest.raises(archive.ArchiveError) as refused:
            archive.import_archive(hostile, Path("results"), LOCAL, limits or archive.Limits())
    finally:
        os.chdir(cwd)
    assert snapshot(importer) == before and sorted(p.name for p in importer.iterdir()) == siblings
    message = str(refused.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", [(k, name) for k, cases in CLASSES.items() for name in cases], ids=str)
def test_hostile_class_is_refused_in_one_line_and_nothing_is_written(case, valid, importer, tmp_path_factory):
    tamper, limits, expected = CLASSES[case[0]][case[1]]
    hostile = write_streamed(tmp_path_factory.mktemp("hostile") / "hostile.tar.gz", tamper(read_members(valid)))
    message = refuse(hostile, importer, limits)
    assert expected in message, message


def test_cli_refusal_of_a_newer_schema_says_upgrade(valid, importer, tmp_path, capsys, monkeypatch):
    hostile = write_members(
        tmp_path / "h.tar.gz",
        with_manifest(read_members(valid), lambda x: x.update(schema_version=metrics.SCHEMA_VERSION + 1)),
    )
    monkeypatch.chdir(importer)
    assert cli.main(["import", str(hostile), "--machine-id", LOCAL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upgrade cellbench" in err


# ---------------------------------------------------------------------------------------------
# An archive written by an older cellbench (tests/fixtures/archive-v1.tar.gz, schema version 1,
# made once by tests/fixtures/make_archive_v1.py) keeps importing and aggregating.

FIXTURE = ROOT / "tests" / "fixtures" / "archive-v1.tar.gz"


def aggregate_imported(results: Path):
    from cellbench import aggregate, machines

    files = machines.imported_metrics(results)
    summary = results / "summary.parquet"
    metrics.combine_metrics(files, summary)
    (resolved,) = results.glob("imported/*/*/study/resolved.json")
    resolved = json.loads(resolved.read_text())
    points = aggregate.cell_points(metrics.scan_metrics([summary]), resolved["baseline"])
    return files, points


def test_archive_of_schema_version_1_imports_and_aggregates(tmp_path):
    outcome, target = archive.import_archive(FIXTURE, tmp_path / "results", LOCAL)
    assert outcome == "imported" and target.name == "20261201T100000Z"
    files, points = aggregate_imported(tmp_path / "results")
    assert len(files) == 8 and len(points) == 4
    assert (points["status"] == "ok").all() and points["output_tok_s"].notna().all()
    assert set(points["machine_id"]) == {"fixture-machine"}
    # Written before quality was measured: no figure, no verdict, never 0.
    assert points["quality_bits_per_byte"].isna().all() and points["quality_verdict"].isna().all()
    assert set(points["quality_reason"]) == {"not measured"}


def test_after_a_column_is_added_the_old_archive_imports_with_it_null(tmp_path, monkeypatch):
    """A later cellbench adds a nullable column (a new entry of the column history): the archive
    written before it imports, and the column reads as null ("not measured"), never 0."""
    before = metrics.SCHEMA_VERSION
    grown = {**metrics.COLUMN_HISTORY, before + 1: {"joules": (pa.float64(), True, "energy")}}
    monkeypatch.setattr(metrics, "COLUMN_HISTORY", grown)
    for name, value in zip(("SCHEMA_VERSION", "COLUMNS", "SCHEMA"), metrics.derive(grown), strict=True):
        monkeypatch.setattr(metrics, name, value)
    assert before + 1 == metrics.SCHEMA_VERSION
    assert archive.import_archive(FIXTURE, tmp_path / "results", LOCAL)[0] == "imported"
    files, points = aggregate_imported(tmp_path / "results")
    frame = metrics.scan_metrics(files).collect().to_pandas()
    assert "joules" in frame.columns and frame["joules"].isna().all() and len(frame) == 16
    assert frame["device_arch"].isna().all()  # version 2's column, which the version-1 fixture lacks too
    assert frame["quality_status"].isna().all() and frame["quality_bits_per_byte"].isna().all()  # version 3's
    assert set(frame["schema_version"]) == {1} and points["output_tok_s"].notna().all()


def as_schema_version_2(members) -> list:
    """The archive as cellbench wrote it at schema version 2: no quality columns, version 2 in
    its rows, its files' metadata and its manifest."""
    out = []
    for info, data in members:
        if info.name.endswith("metrics.parquet"):
            table = pq.ParquetFile(pa.BufferReader(data)).read().drop_columns(list(metrics.COLUMN_HISTORY[3]))
            table = column_of(table, "schema_version", [2], pa.int64())
            data = parquet_bytes(table.replace_schema_metadata({"cellbench.schema_version": "2"}))
        out.append((info, data))
    return with_manifest(out, lambda x: x.update(schema_version=2), rehash=True)


def test_an_archive_of_schema_version_2_imports_with_quality_not_measured(valid, importer, tmp_path):
    older = write_members(tmp_path / "v2.tar.gz", as_schema_version_2(read_members(valid)))
    outcome, target = archive.import_archive(older, importer / "results", LOCAL)
    assert outcome == "imported"
    frame = metrics.scan_metrics(sorted(target.glob("cells/*/round-*/metrics.parquet"))).collect().to_pandas()
    assert set(frame["schema_version"]) == {2} and len(frame) > 0
    assert frame[list(metrics.COLUMN_HISTORY[3])].isna().all().all()  # not measured, never 0


def flat_layout(members) -> list:
    """The archive as cellbench wrote it before rounds: cells/<id>/<file>, no rounds in the study."""
    out = []
    for info, data in members:
        info = tarfile.TarInfo(info.name.replace("/round-1/", "/"))
        if info.name == "study/resolved.json":
            resolved = json.loads(data)
            for cell in resolved["cells"].values():
                cell["sweep"].pop("rounds")
            data = json.dumps(resolved).encode()
        if info.name.endswith("metrics.parquet"):
            data = parquet_bytes(pq.ParquetFile(pa.BufferReader(data)).read().drop_columns(["round"]))
        out.append((info, data))
    return with_manifest(out, lambda x: None, rehash=True)


def test_an_archive_from_before_rounds_still_imports(valid, importer, tmp_path):
    older = write_members(tmp_path / "flat.tar.gz", flat_layout(read_members(valid)))
    outcome, target = archive.import_archive(older, importer / "results", LOCAL)
    assert outcome == "imported" and list(target.glob("cells/*/metrics.parquet"))


def test_a_valid_archive_still_imports_when_metrics_lack_nullable_columns(valid, importer, tmp_path):
    older = write_members(
        tmp_path / "older.tar.gz",
        with_metrics(read_members(valid), lambda t: t.drop_columns(["versions_json", "round", "itl_p99_s"])),
    )
    assert archive.import_archive(older, importer / "results", LOCAL)[0] == "imported"


# ---------------------------------------------------------------------------------------------
# Memory: the worst hostile archives, each imported in a fresh process, stay under a bound.

# The peak resident memory (VmHWM: ru_maxrss would carry pytest's own peak over the exec) of a
# process that imports them all: the interpreter with pyarrow is ~70 MiB; an import streams in
# 1 MiB chunks and reads metrics 1024 rows at a time, so it adds tens of MiB, whatever the archive.
PEAK_BOUND_MIB = 200


def test_hostile_archives_import_in_bounded_memory(valid, tmp_path):
    members = read_members(valid)
    unlisted = f"cells/{cell_ids(members)[0]}/round-3/engine.log"
    cases = {
        "unlisted-bomb": [*members, zeros_member(unlisted, 200 * archive.MiB)],
        "listed-bomb": zero_bomb(members, 200 * archive.MiB),
        "rows": repeated_rows(members, 19_000),
        "deep-json": with_metrics(members, lambda t: column_of(t, "settings_json", [nested(1_000_000)])),
        "dictionary-bomb": dictionary_bomb(members),
    }  # fmt: skip
    paths = [str(write_streamed(tmp_path / f"{name}.tar.gz", tamper)) for name, tamper in cases.items()]
    code = (
        "import re, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path\n"
        "from cellbench import archive\n"
        "for path in sys.argv[3:]:\n"
        "    try:\n"
        "        archive.import_archive(Path(path), Path(sys.argv[2]), 'local')\n"
        "    except archive.ArchiveError as exc:\n"
        "        print(Path(path).name, str(exc)[:100])\n"
        "print('peak', int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "workflow"), str(tmp_path / "results"), *paths],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases) + 1, done.stdout + done.stderr
    peak = int(lines[-1].split()[1])
    print(done.stdout)
    assert peak < PEAK_BOUND_MIB, done.stdout
    assert not (tmp_path / "results" / "imported").exists()


def test_mutated_metrics_are_refused_in_one_line_or_aggregate(tmp_path):
    """Class 9 at its root: random byte changes to the fixture's metrics (checksums made to
    match) are either refused in one line or imported as rows the aggregate reads."""
    import random

    from cellbench import aggregate, machines

    rng = random.Random(15)
    members = read_members(FIXTURE)
    parquet = [i for i, (info, _) in enumerate(members) if info.name.endswith(".parquet")]
    outcomes = {"refused": 0, "imported": 0}
    for n in range(16):
        index = rng.choice(parquet)
        data = bytearray(members[index][1])
        for _ in range(rng.choice([1, 2, 4])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        changed = [*members[:index], (members[index][0], bytes(data)), *members[index + 1 :]]
        path = write_members(tmp_path / f"{n}.tar.gz", with_manifest(changed, lambda x: None, rehash=True))
        results = tmp_path / f"r{n}"
        try:
            archive.import_archive(path, results, LOCAL)
        except archive.ArchiveError as exc:
            assert "\n" not in str(exc) and not results.exists()
            outcomes["refused"] += 1
            continue
        metrics.combine_metrics(machines.imported_metrics(results), results / "summary.parquet")
        aggregate.cell_points(
            metrics.scan_metrics([results / "summary.parquet"]), "vllm-bfloat16-enforce_eager-a9b61b6aea"
        )
        outcomes["imported"] += 1
    assert outcomes["refused"] and sum(outcomes.values()) == 16


def test_a_serve_cell_with_load_levels_may_hold_its_levels_and_probes(study):
    study = copy.deepcopy(study[0])
    study["defaults"]["sweep"]["batch_size"] = [1]
    serve = {"concurrency": [1, 4], "request_rate": [2], "slo": {"ttft_ms": 500},
             "search": {"metric": "request_rate", "low": 1, "high": 8, "resolution": 0.5}}  # fmt: skip
    study["cells"] = [{"name": "served", "mode": "serve", "serve": serve}]
    study["baseline"] = "served"
    resolved = config.resolve(study)
    (cell_id,) = resolved["cells"]
    member = f"cells/{cell_id}/round-1/metrics.parquet"
    manifest = {"study": resolved["study"], "members": [member]}
    # 1 shape x 2 repeats: 3 levels x 2 + probes (doubling 1 2 4 8: 4, halving 7 -> 0.5: 5) + 1
    limit = 3 * 2 + 4 + 5 + 1
    assert study["defaults"]["sweep"]["repeats"] == 2 and serving.rows_per_shape(serve, 2) == limit
    archive.check_study(resolved, manifest, {member: limit})
    with pytest.raises(archive.ArchiveError, match=f"{limit + 1} rows, more than the {limit} points x repeats"):
        archive.check_study(resolved, manifest, {member: limit + 1})
