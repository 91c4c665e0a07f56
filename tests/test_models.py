"""Model checksum before each cell: one full pass, then a stat stamp; any change is still caught."""

import json
import os

import pytest
from cellbench import models


@pytest.fixture
def model(tmp_path, monkeypatch):
    """A prepared model folder: two weight files and their manifest."""
    monkeypatch.setenv("CELLBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "models" / "tiny"
    out.mkdir(parents=True)
    (out / "model.gguf").write_bytes(b"weights " * 1000)
    (out / "config.json").write_text('{"dtype": "bfloat16"}')
    manifest = {"name": "tiny", "files": models.file_hashes(out)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def hashed(monkeypatch):
    """Names of the files sha256_file read."""
    seen = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda path: seen.append(path.name) or real(path))
    return seen


def test_second_verify_trusts_the_stamp(model, hashed):
    models.check_checksums(model)
    assert sorted(hashed) == ["config.json", "model.gguf"]
    assert models.verified_stamp(model).is_file()
    hashed.clear()
    models.check_checksums(model)
    assert hashed == []
    # A cache outside the results folder, which only pipeline steps write.
    assert not models.verified_stamp(model).is_relative_to(model.parent)


def test_same_size_change_with_restored_mtime_is_caught(model, hashed):
    models.check_checksums(model)
    weights = model / "model.gguf"
    before = weights.stat()
    weights.write_bytes(b"WEIGHTS " * 1000)  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(models.ModelError, match="model.gguf does not match its manifest checksum"):
        models.check_checksums(model)


def test_a_new_manifest_makes_a_full_pass(model, hashed):
    models.check_checksums(model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    (model / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    with pytest.raises(models.ModelError, match="config.json does not match"):
        models.check_checksums(model)
    assert "config.json" in hashed


@pytest.mark.parametrize("stamp", ["not json", "[]", '{"manifest_sha256": 1}'])
def test_a_broken_stamp_means_a_full_pass(model, hashed, stamp):
    models.verified_stamp(model).parent.mkdir(parents=True)
    models.verified_stamp(model).write_text(stamp)
    models.check_checksums(model)
    assert sorted(hashed) == ["config.json", "model.gguf"]
    assert json.loads(models.verified_stamp(model).read_text())["manifest_sha256"]


def test_a_missing_file_is_caught_even_with_a_stamp(model):
    models.check_checksums(model)
    (model / "config.json").unlink()
    with pytest.raises(models.ModelError, match="config.json does not match"):
        models.check_checksums(model)
