"""GPU image recipes are pinned, and a base image that cannot be had fails with a clear error."""

import io
import re
import shutil
from pathlib import Path

import pytest
from cellbench import images

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, repo", [("rocm", "vllm/vllm-openai-rocm"), ("cuda", "vllm/vllm-openai")])
def test_gpu_images_pin_the_official_vllm_image(name, repo):
    dockerfile = (ROOT / "containers" / name / "Dockerfile").read_text()
    base = images.declared_base(dockerfile)
    # A release tag, never latest; optionally pinned to its digest (tag@sha256:..., docs/gpu.md).
    assert re.fullmatch(re.escape(repo) + r":v\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", base), base
    # The official images start `vllm serve`; a cell must run bench_cell.py instead.
    assert re.search(r"^ENTRYPOINT \[\]$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)


def test_declared_base_of_the_cpu_image_is_the_local_one():
    assert images.declared_base((ROOT / "containers" / "cpu" / "Dockerfile").read_text()) == images.LOCAL_BASE
    assert images.declared_base("FROM debian:bookworm\n") is None


def test_the_llamacpp_image_compiles_for_a_fixed_instruction_set():
    # -march=native made one tag different code on every machine and crashed on AMX CPUs (exit 139).
    flags = dict(
        re.findall(r"-D(GGML_[A-Z0-9_]+)=(ON|OFF)", (ROOT / "containers" / "llamacpp" / "Dockerfile").read_text())
    )
    assert flags["GGML_NATIVE"] == "OFF"
    assert all(flags[name] == "ON" for name in ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2")), flags
    assert all(flags[name] == "OFF" for name in ("GGML_AVX512", "GGML_AMX_TILE", "GGML_AMX_INT8")), flags


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker client")
def test_a_base_image_that_cannot_be_had_names_its_tag():
    """A real `docker pull` of a tag that cannot exist (fails fast: no such repository, or no registry)."""
    tag = "cellbench-test/no-such-image:never-0000"
    log = io.StringIO()
    with pytest.raises(images.ImageError) as caught:
        images.ensure_base(tag, log)
    message = str(caught.value)
    assert f"base image {tag} is not in the local Docker daemon and 'docker pull {tag}' failed (" in message
    assert f"docker save {tag}" in message and "docker load" in message
    assert "\n" not in message
    assert f"$ docker pull {tag}" in log.getvalue()


class _Done:
    def __init__(self, code, out):
        self.returncode, self.stdout = code, out


def test_repo_digests_of_the_base_go_into_the_manifest():
    digest = "vllm/vllm-openai@sha256:" + "ab" * 32
    seen = []
    found = images.repo_digests(
        "vllm/vllm-openai:v0.31.0", lambda argv: seen.append(argv) or _Done(0, f'["{digest}"]\n')
    )
    assert found == [digest] and seen[0][-1] == "vllm/vllm-openai:v0.31.0" and "{{json .RepoDigests}}" in seen[0]
    assert images.repo_digests("cellbench/base:bookworm", lambda argv: _Done(0, "[]")) == []  # built here
    assert images.repo_digests("x", lambda argv: _Done(1, "")) == []


def test_a_dockerfile_may_pin_its_base_by_digest():
    pinned = "vllm/vllm-openai:v0.31.0@sha256:" + "0" * 64
    assert images.declared_base(f"ARG BASE_IMAGE={pinned}\nFROM ${{BASE_IMAGE}}\n") == pinned
    assert images.pinned_by_digest(pinned) and not images.pinned_by_digest("vllm/vllm-openai:v0.31.0")


def test_the_rocm_recipe_names_both_rocm_images_rightly():
    text = (ROOT / "containers" / "rocm" / "Dockerfile").read_text()
    assert "formerly rocm/vllm" not in text  # rocm/vllm is AMD's own image, still published
    assert "rocm/vllm" in text and "vllm/vllm-openai-rocm" in text
