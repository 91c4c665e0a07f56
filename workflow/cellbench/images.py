"""Engine images: registry-free base, host-downloaded wheelhouse, recipe-hash tags, manifests.

An image is tagged with the hash of its recipe (context files, build args, base image id), so
a rebuild happens exactly when the recipe changes, and an existing image with the same recipe
is reused (a fresh clone on a machine that built it before costs seconds, not minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from . import paths
from .atomic import write_json
from .digest import sha256_file

LOCAL_BASE = "cellbench/base:bookworm"


class ImageError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("CELLBENCH_CACHE", Path.home() / ".cache" / "cellbench"))


def context_files(context: Path) -> list[Path]:
    return sorted(p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def recipe_hash(context: Path, build_args: dict, base_id: str) -> str:
    digest = hashlib.sha256()
    for path in context_files(context):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps({"build_args": build_args, "base": base_id}, sort_keys=True).encode())
    return digest.hexdigest()


def _run(argv: list[str], log, **kwargs) -> subprocess.CompletedProcess:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def image_id(ref: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def repo_digests(ref: str, inspect=None) -> list[str]:
    """The registry digests of a local image (`RepoDigests`: repo@sha256:...), which name its
    content wherever it is pulled, unlike a tag, which can move; [] for an image built here or
    loaded from an archive (docker load keeps no digest). `inspect` stands in for docker in tests."""
    argv = ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", ref]
    done = (inspect or (lambda a: subprocess.run(a, capture_output=True, text=True)))(argv)
    try:
        found = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        found = None
    return sorted(found) if isinstance(found, list) else []


def pinned_by_digest(base: str | None) -> bool:
    """`FROM image@sha256:...` (or tag@sha256:...): the base cannot change under the same name."""
    return bool(base and re.search(r"@sha256:[0-9a-f]{64}$", base))


def declared_base(dockerfile: str) -> str | None:
    """The default of `ARG BASE_IMAGE=...` in a Dockerfile: the image's pinned base."""
    match = re.search(r"^ARG\s+BASE_IMAGE=(\S+)\s*$", dockerfile, re.MULTILINE)
    return match.group(1) if match else None


def ensure_base(base: str, log) -> str:
    """Return the base image id, building the local base or pulling a named one if missing."""
    if base == LOCAL_BASE:
        if _run(["bash", str(paths.PROJECT_ROOT / "containers" / "base" / "build.sh"), base], log).returncode:
            raise ImageError(f"building the local base image {base} failed; see the image log")
    elif image_id(base) is None:
        log.write(f"$ docker pull {base}\n")
        pulled = subprocess.run(["docker", "pull", base], capture_output=True, text=True)
        log.write(pulled.stdout + pulled.stderr)
        if pulled.returncode:
            lines = (pulled.stderr or pulled.stdout).strip().splitlines()
            raise ImageError(
                f"base image {base} is not in the local Docker daemon and 'docker pull {base}' failed "
                f"({lines[-1] if lines else f'exit {pulled.returncode}'}); pull it where a registry is "
                f"reachable and bring it here: docker save {base} | gzip > base.tar.gz, then docker load -i base.tar.gz"
            )
    found = image_id(base)
    if found is None:
        raise ImageError(f"base image {base} is still missing after building or pulling it")
    return found


def ensure_wheelhouse(lock: Path, log) -> Path:
    """Exactly the files a lock pins, downloaded on the host once per lock content.

    --require-hashes refuses any file whose sha256 the lock does not name; --no-deps keeps pip
    from reaching past the lock (it is the whole closure already).
    """
    key = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "wheelhouse" / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        argv = ["pip", "download", "--quiet", "--require-hashes", "--no-deps", "--dest", str(tmp), "--requirement"]
        if _run([*argv, str(lock)], log).returncode:
            raise ImageError(f"pip download of {lock.name} failed; see the image log")
        if not target.is_dir():  # another process may have filled the same cache key meanwhile
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_image(name: str, spec: dict, manifest_path: Path, log_path: Path) -> dict:
    context = paths.PROJECT_ROOT / spec["context"]
    if not (context / "Dockerfile").is_file():
        raise ImageError(f"images.{name}.context: no Dockerfile in {context}")
    lock = context / spec["wheelhouse"] if spec.get("wheelhouse") else None
    if lock is not None:
        from . import locks  # packaging loads where an image is built, not in every cell's run-cell

        try:  # a stale lock is refused before minutes of downloads and builds
            locks.check_lock_file(lock, f"{spec['context']}/{spec['wheelhouse']}")
        except locks.LockError as err:
            raise ImageError(f"images.{name}.wheelhouse: {err}") from None
    build_args = dict(spec.get("build_args") or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        base = spec.get("base") or declared_base((context / "Dockerfile").read_text())
        base_id = ensure_base(base, log) if base else ""
        if base:
            build_args["BASE_IMAGE"] = base
        digest = recipe_hash(context, build_args, base_id)
        tag = f"cellbench/{name}:{digest[:12]}"
        reused = image_id(tag) is not None
        if not reused:
            with tempfile.TemporaryDirectory(prefix="cellbench-ctx-", dir=cache_dir()) as tmp:
                build_context = Path(tmp)
                shutil.copytree(context, build_context, dirs_exist_ok=True)
                if lock is not None:
                    wheels = ensure_wheelhouse(lock, log)
                    shutil.copytree(wheels, build_context / "wheelhouse", copy_function=os.link)
                argv = ["docker", "build", "--tag", tag]
                for key, value in sorted(build_args.items()):
                    argv += ["--build-arg", f"{key}={value}"]
                if _run([*argv, str(build_context)], log).returncode:
                    raise ImageError(f"docker build of image {name} failed; see {log_path}")
        manifest = {
            "name": name,
            "tag": tag,
            "image_id": image_id(tag),
            "device": spec["device"],
            "recipe_sha256": digest,
            "dockerfile_sha256": sha256_file(context / "Dockerfile"),
            "base": base,
            "base_image_id": base_id or None,
            # What the base tag pointed at when built: pin it with BASE_IMAGE=repo@sha256:... .
            "base_repo_digests": repo_digests(base) if base and base != LOCAL_BASE else [],
            "base_pinned_by_digest": pinned_by_digest(base),
            "build_args": build_args,
            "lock_sha256": sha256_file(lock) if lock else None,
            "packages": installed_packages(tag),
            "reused_existing_image": reused,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "build_log": str(log_path),
        }
    write_json(manifest_path, manifest)
    return manifest


def installed_packages(tag: str) -> dict:
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", tag, "python3", "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return {}
    return {p["name"]: p["version"] for p in json.loads(done.stdout)}
