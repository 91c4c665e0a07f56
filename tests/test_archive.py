"""Archive and import: a round trip, and a corpus of hostile archives each refused with a one-line
reason and nothing written. The archives are built here from a results dir of real Parquet
(rows from the same code a cell run uses), then tampered with member by member."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cellbench import archive, cli, config, measure, metrics

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
        lambda m: with_manifest(m, lambda x: x.update(schema_version=2)),
        None,
        "unknown schema_version 2",
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
    before = snapshot(importer)
    cwd = os.getcwd()
    os.chdir(importer)
    try:
        with pytest.raises(archive.ArchiveError) as refused:
            archive.import_archive(hostile, Path("results"), LOCAL, limits or archive.Limits())
    finally:
        os.chdir(cwd)
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert snapshot(importer) == before


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
