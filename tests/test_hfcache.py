"""Models from a Hugging Face hub cache, with a local directory laid out like one (no network)."""

import json
import os

import pytest
from cellbench import hfcache, models, paths, runner

COMMIT = "a" * 40
OLD = "b" * 40


def fake_hub(hub, repo_id="Qwen/Qwen3-8B"):
    """huggingface_hub's layout: blobs/ hold content, snapshots/<commit>/ link into them."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    for commit, weights in ((COMMIT, b"new weights"), (OLD, b"old weights")):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, content in (
            ("config.json", b'{"architectures": ["Qwen3ForCausalLM"]}'),
            ("model.safetensors", weights),
        ):
            blob = repo / "blobs" / f"{commit[:4]}-{name}"
            blob.write_bytes(content)
            os.symlink(os.path.relpath(blob, snap), snap / name)
    return repo


def test_hub_dir_follows_huggingface_hub_variables(tmp_path):
    assert hfcache.hub_dir({"HF_HUB_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
    assert hfcache.hub_dir({"HF_HOME": str(tmp_path / "h")}) == tmp_path / "h" / "hub"
    assert hfcache.hub_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "huggingface" / "hub"


def test_resolve_by_branch_and_by_commit(tmp_path):
    repo = fake_hub(tmp_path)
    assert hfcache.resolve(tmp_path, "Qwen/Qwen3-8B", None) == (repo, COMMIT)
    assert hfcache.resolve(tmp_path, "Qwen/Qwen3-8B", OLD) == (repo, OLD)
    with pytest.raises(models.ModelError, match="Qwen/Qwen3-8B-AWQ is not in the hub cache"):
        hfcache.resolve(tmp_path, "Qwen/Qwen3-8B-AWQ", None)
    with pytest.raises(models.ModelError, match="revision 'v2' is not in the hub cache"):
        hfcache.resolve(tmp_path, "Qwen/Qwen3-8B", "v2")
    with pytest.raises(models.ModelError, match=f"snapshot {'c' * 40} .* is missing"):
        hfcache.resolve(tmp_path, "Qwen/Qwen3-8B", "c" * 40)


def test_prepare_records_commit_and_hashes_and_cells_mount_the_repo(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = fake_hub(hub)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "models" / "qwen3-8b"
    spec = {"source": "hf-cache", "repo_id": "Qwen/Qwen3-8B"}
    environ = {"HF_HUB_CACHE": str(hub), "HF_TOKEN": "hf_secret_value"}
    manifest = hfcache.prepare("qwen3-8b", spec, out, tmp_path / "log", environ)
    assert manifest["commit"] == COMMIT and manifest["revision"] is None
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["bytes"] == len(b"new weights")
    written = (out / "manifest.json").read_text()
    assert json.loads(written) == manifest
    assert "hf_secret_value" not in written + (tmp_path / "log").read_text()
    models.check_checksums(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert runner.model_mount(out, manifest) == (repo.resolve(), f"/model/snapshots/{COMMIT}")
    # A changed file in the cache is caught before a cell runs on it.
    blob = (repo / "snapshots" / COMMIT / "model.safetensors").resolve()
    blob.write_bytes(b"NEW weights")
    with pytest.raises(models.ModelError, match="model.safetensors does not match"):
        models.check_checksums(out)


def test_a_file_the_engine_user_cannot_read_is_refused(tmp_path):
    repo = fake_hub(tmp_path)
    blob = (repo / "snapshots" / COMMIT / "model.safetensors").resolve()
    blob.chmod(0o600)
    spec = {"source": "hf-cache", "repo_id": "Qwen/Qwen3-8B"}
    with pytest.raises(models.ModelError, match=f"{blob} is not readable by other users.*chmod -R o\\+rX {repo}"):
        hfcache.prepare("m", spec, tmp_path / "out", tmp_path / "log", {"HF_HUB_CACHE": str(tmp_path)})


def test_missing_model_names_the_way_out_unless_download_is_allowed(tmp_path):
    spec = {"source": "hf-cache", "repo_id": "Qwen/Qwen3-8B-AWQ"}
    with pytest.raises(models.ModelError, match="set models.awq.allow_download: true"):
        hfcache.prepare("awq", spec, tmp_path / "out", tmp_path / "log", {"HF_HUB_CACHE": str(tmp_path)})
    assert not (tmp_path / "out").exists()


def test_hub_models_depend_on_no_image_or_converter(tmp_path):
    assert paths.model_inputs({"source": "hf-cache", "repo_id": "Qwen/Qwen3-8B"}, tmp_path) == {}
    gguf = paths.model_inputs({"source": "pypi-gguf", "prepare_image": "cpu"}, tmp_path)
    assert gguf == {"image": paths.image_manifest("cpu"), "converter": tmp_path / "scripts" / "convert_gguf.py"}
