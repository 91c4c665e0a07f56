"""The fault-test helper: one tensor of a safetensors file zeroed, in a hub cache cellbench resolves."""

import json
import struct

import pytest
from cellbench import hfcache
from corrupt_model import COMMIT, REPO_ID, corrupted_hub, zero_tensor


def _safetensors(path, tensors: dict[str, bytes]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    content = struct.pack("<Q", len(text)) + text + b"".join(tensors.values())
    path.write_bytes(content)
    return content


def test_only_the_named_tensor_is_zeroed(tmp_path):
    source = tmp_path / "model.safetensors"
    before = _safetensors(source, {"a": b"\x01\x02\x03", "model.norm.weight": b"\x04\x05", "z": b"\x06"})
    first, end = zero_tensor(source, tmp_path / "out.safetensors")
    after = (tmp_path / "out.safetensors").read_bytes()
    assert end - first == 2 and after[first:end] == b"\x00\x00"
    assert after[:first] == before[:first] and after[end:] == before[end:] == b"\x06"
    with pytest.raises(KeyError, match="has no tensor 'lm_head.weight'"):
        zero_tensor(source, tmp_path / "x", "lm_head.weight")


def test_the_corrupted_model_is_a_hub_cache_model(tmp_path):
    model = tmp_path / "prepared"
    model.mkdir()
    _safetensors(model / "model.safetensors", {"model.norm.weight": b"\x07\x08"})
    (model / "config.json").write_text("{}")
    (model / "manifest.json").write_text("{}")
    (model / "m.Q4_1.gguf").write_bytes(b"GGUF")
    repo = corrupted_hub(model, tmp_path / "hub")
    assert hfcache.resolve(tmp_path / "hub", REPO_ID, None) == (repo, COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    assert all(p.is_symlink() for p in snapshot.iterdir())
    assert (snapshot / "model.safetensors").read_bytes().endswith(b"\x00\x00")
