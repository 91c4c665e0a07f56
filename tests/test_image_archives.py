"""Image archives on shared storage: the record beside an archive, checked before any load, and
the study setting that asks for them (outside the config hash)."""

import hashlib
import json
import re
from pathlib import Path

import pytest
from cellbench import config, paths, runtimes

ROOT = Path(__file__).resolve().parents[1]

IMAGE = "sha256:" + "ab" * 32


def archive_with_record(tmp_path, content=b"layers", **record):
    archive = tmp_path / "images" / "llamacpp.tar"
    archive.parent.mkdir()
    archive.write_bytes(content)
    full = {"image_id": IMAGE, "tag": "cellbench/llamacpp:1", "bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(), **record}  # fmt: skip
    paths.image_archive_record(archive).write_text(json.dumps(full))
    return archive


def test_record_sits_beside_the_archive():
    assert paths.image_archive_record(paths.image_archive("cpu")) == paths.RESULTS / "images" / "cpu.tar.json"


def test_an_intact_archive_of_the_image_passes(tmp_path):
    archive = archive_with_record(tmp_path)
    runtimes.check_archive(archive, IMAGE)
    assert runtimes.archive_is_current({"image_id": IMAGE}, archive)


def test_a_changed_or_partial_archive_is_refused_before_loading(tmp_path):
    archive = archive_with_record(tmp_path)
    archive.write_bytes(b"layerz")  # same size, other bytes: only the hash tells
    with pytest.raises(runtimes.RuntimeSetupError, match=r"llamacpp.tar: sha256 .* is not the recorded .*not loaded"):
        runtimes.check_archive(archive, IMAGE)


def test_an_archive_of_another_build_is_refused(tmp_path):
    archive = archive_with_record(tmp_path, image_id="sha256:" + "cd" * 32)
    with pytest.raises(runtimes.RuntimeSetupError, match="holds image sha256:cdcdcdcdcdcd, not sha256:abababababab"):
        runtimes.check_archive(archive, IMAGE)
    assert not runtimes.archive_is_current({"image_id": IMAGE}, archive)


def test_an_archive_without_its_record_is_refused_with_how_to_make_one(tmp_path):
    archive = archive_with_record(tmp_path)
    paths.image_archive_record(archive).unlink()
    with pytest.raises(runtimes.RuntimeSetupError, match=r"has no record llamacpp.tar.json .*cellbench save-image"):
        runtimes.check_archive(archive, IMAGE)
    assert not runtimes.archive_is_current({"image_id": IMAGE}, archive)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"image_id": "x"}'])
def test_a_broken_record_is_refused(tmp_path, text):
    archive = archive_with_record(tmp_path)
    paths.image_archive_record(archive).write_text(text)
    with pytest.raises(runtimes.RuntimeSetupError, match="not an image archive record"):
        runtimes.check_archive(archive, IMAGE)
    assert not runtimes.archive_is_current({"image_id": IMAGE}, archive)


def test_a_size_other_than_the_record_is_not_current(tmp_path):
    archive = archive_with_record(tmp_path)
    archive.write_bytes(b"cut")  # a copy cut short
    assert not runtimes.archive_is_current({"image_id": IMAGE}, archive)


def test_a_missing_manifest_is_one_line(tmp_path):
    with pytest.raises(runtimes.RuntimeSetupError, match=r"nothing.json: not an image manifest"):
        runtimes.save_manifest_archive(tmp_path / "nothing.json")


def test_image_archives_stay_out_of_the_config_hash_and_the_cell_ids():
    _, plain = config.read(ROOT / "config" / "config.yaml")
    _, archived = config.read(ROOT / "config" / "config.yaml", overrides={"image_archives": True})
    assert archived["config_hash"] == plain["config_hash"]
    assert set(archived["cells"]) == set(plain["cells"])


def test_image_archives_must_be_a_boolean():
    with pytest.raises(config.ConfigError, match="image_archives"):
        config.read(ROOT / "config" / "config.yaml", overrides={"image_archives": "yes"})


def test_a_damaged_archive_of_the_right_size_is_current_only_without_verifying(tmp_path):
    archive = archive_with_record(tmp_path)
    archive.write_bytes(b"layerz")
    assert runtimes.archive_is_current({"image_id": IMAGE}, archive)  # a run's start: size and id
    assert not runtimes.archive_is_current({"image_id": IMAGE}, archive, verify=True)  # save-image


@pytest.mark.parametrize(
    "manifest, error",
    [
        ({"name": "../../escape", "tag": "t", "image_id": IMAGE}, "the manifest of image '../../escape', not 'cpu'"),
        ({"name": "cpu", "tag": 3, "image_id": IMAGE}, "expected name, tag, image_id"),
        ([1, 2], "expected name, tag, image_id"),
    ],
)
def test_save_image_refuses_a_manifest_that_is_not_one(tmp_path, manifest, error):
    path = tmp_path / "images" / "cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(manifest))
    with pytest.raises(runtimes.RuntimeSetupError, match=re.escape(error)):
        runtimes.save_manifest_archive(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cpu.json"]  # nothing written
