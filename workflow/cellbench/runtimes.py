"""Container runtimes: docker (the default) or podman, chosen per machine, never per study.

The runtime is a property of the machine, like its machine id: `CELLBENCH_RUNTIME=podman`
switches it without touching the study, the cell ids or what Snakemake considers up to date.
Images are built by docker; a runtime or a node that lacks the manifest's image id gets the
very same image (same id) by loading it, from the local docker daemon (`docker save | podman
load`) or from an archive on shared storage (results/images/<name>.tar, `cellbench
save-image`, made once on the build node; every other node loads it on its first cell). The
archive's record beside it names the image and the archive's sha256, checked before a load: a
partial copy, a changed file or an archive of another build is refused, never loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from . import paths
from .atomic import write_json, write_with
from .digest import sha256_file

RUNTIMES = ("docker", "podman")
# Set by the Snakefile when the study (profiles/slurm) asks for image archives: the images whose
# build-image also saves them, comma-separated. An environment variable, not a rule parameter,
# so that switching profiles reruns no image and no cell.
ARCHIVES_ENV = "CELLBENCH_IMAGE_ARCHIVES"


class RuntimeSetupError(RuntimeError):
    pass


def runtime_from_env(environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    runtime = environ.get("CELLBENCH_RUNTIME") or "docker"
    if runtime not in RUNTIMES:
        raise RuntimeSetupError(f"CELLBENCH_RUNTIME={runtime!r}: not one of {', '.join(RUNTIMES)}")
    return runtime


def has_image(runtime: str, image_id: str) -> bool:
    try:
        done = subprocess.run([runtime, "image", "inspect", image_id], capture_output=True, check=False)
    except OSError:  # no such runtime on this node
        return False
    return done.returncode == 0


def archive_is_current(manifest: dict, archive: Path, verify: bool = False) -> bool:
    """The archive and its record hold the manifest's image: by the record and the file's size
    (every run's start: hashing GBs is left to the node that loads it), or also by its sha256
    when `verify` (`cellbench save-image`, which then replaces a damaged archive)."""
    try:
        record = json.loads(paths.image_archive_record(archive).read_text())
        if record["image_id"] != manifest["image_id"] or archive.stat().st_size != record["bytes"]:
            return False
        if verify:
            check_archive(archive, manifest["image_id"])  # the one sha256 check loads also pass
    except (OSError, ValueError, KeyError, TypeError, RuntimeSetupError):
        return False
    return True


def save_archive(manifest: dict, archive: Path, verify: bool = False) -> bool:
    """`docker save` the manifest's image to `archive` (atomically) and write its record; False
    when an archive of that image is already there."""
    if archive_is_current(manifest, archive, verify):
        return False
    # No record while the archive is replaced: a node loading meanwhile refuses, never loads it.
    paths.image_archive_record(archive).unlink(missing_ok=True)
    tagged = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", manifest["tag"]],
                            capture_output=True, text=True)  # fmt: skip
    if tagged.stdout.strip() != manifest["image_id"]:
        raise RuntimeSetupError(f"docker has no image {manifest['tag']} with id {manifest['image_id'][:19]} to save")

    def save(tmp: str) -> None:
        done = subprocess.run(["docker", "save", "--output", tmp, manifest["tag"]], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeSetupError(f"docker save {manifest['tag']} failed: {done.stderr.strip()[-300:]}")

    write_with(archive, save)
    record = {"image_id": manifest["image_id"], "tag": manifest["tag"], "sha256": sha256_file(archive),
              "bytes": archive.stat().st_size}  # fmt: skip
    write_json(paths.image_archive_record(archive), record)
    return True


def save_manifest_archive(manifest_path: Path, verify: bool = False) -> tuple[Path, bool]:
    """The image of a manifest (results/images/<name>.json), saved beside it as <name>.tar."""
    manifest_path = Path(manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeSetupError(f"{manifest_path}: not an image manifest ({exc})") from None
    # The archive's name comes from the manifest's own file name, never from its content.
    fields = ("name", "tag", "image_id")
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(key), str) for key in fields):
        raise RuntimeSetupError(f"{manifest_path}: not an image manifest (expected {', '.join(fields)})")
    if manifest["name"] != manifest_path.stem:
        raise RuntimeSetupError(
            f"{manifest_path}: the manifest of image {manifest['name']!r}, not {manifest_path.stem!r}"
        )
    archive = paths.image_archive(manifest_path.stem, manifest_path.parent.parent)
    return archive, save_archive(manifest, archive, verify)


def save_archives(manifests) -> None:
    """At a run's start: archive every image already built (a manifest that exists) whose
    archive is missing or of another build; images built later are saved by build-image."""
    for manifest in manifests:
        if Path(manifest).is_file():
            archive, saved = save_manifest_archive(manifest)
            if saved:
                print(f"cellbench: image {archive.stem}: saved {archive}")


def check_archive(archive: Path, image_id: str) -> None:
    """Refuse, with one line, an archive whose record is missing, names another image, or whose
    bytes do not hash to the recorded sha256."""
    record_path = paths.image_archive_record(archive)
    try:
        record = json.loads(record_path.read_text())
        recorded_id, recorded_sha = record["image_id"], record["sha256"]
    except OSError:
        raise RuntimeSetupError(
            f"{archive} has no record {record_path.name} (its image id and sha256); "
            f"make both with: cellbench save-image --manifest {archive.with_suffix('.json')}"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise RuntimeSetupError(f"{record_path}: not an image archive record; save the image again") from None
    if recorded_id != image_id:
        raise RuntimeSetupError(
            f"{archive} holds image {str(recorded_id)[:19]}, not {image_id[:19]}: an archive of another build; "
            f"save it again with cellbench save-image"
        )
    actual = sha256_file(archive)
    if actual != recorded_sha:
        raise RuntimeSetupError(
            f"{archive}: sha256 {actual[:16]}… is not the recorded {str(recorded_sha)[:16]}… "
            "(a partial copy or a changed file); not loaded"
        )


def ensure_image(runtime: str, image_id: str, archive: Path) -> str:
    """Make `image_id` runnable by `runtime` on this node; return where it came from. Cells
    starting together on a node load the image once: the second waits for the first."""
    if has_image(runtime, image_id):
        return "present"
    lock = Path(tempfile.gettempdir()) / f"cellbench-load-{socket.gethostname()}-{image_id.split(':')[-1][:16]}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if has_image(runtime, image_id):
            return "present"
        return _load_image(runtime, image_id, archive)


def _load_image(runtime: str, image_id: str, archive: Path) -> str:
    if archive.is_file():
        check_archive(archive, image_id)
        source, load = str(archive), subprocess.run([runtime, "load", "-i", str(archive)], capture_output=True)
    elif runtime != "docker" and has_image("docker", image_id):
        source = "docker"
        save = subprocess.Popen(["docker", "save", image_id], stdout=subprocess.PIPE)
        load = subprocess.run([runtime, "load"], stdin=save.stdout, capture_output=True)
        save.stdout.close()
        if save.wait():
            raise RuntimeSetupError(f"docker save {image_id} failed")
    else:
        raise RuntimeSetupError(
            f"{runtime} on this node has no image {image_id[:19]} and there is no {archive} to load it from "
            f"(make it once where the image was built: cellbench save-image --manifest {archive.with_suffix('.json')})"
        )
    if load.returncode or not has_image(runtime, image_id):
        raise RuntimeSetupError(f"{runtime} load from {source} failed: {load.stderr.decode(errors='replace')[-300:]}")
    return f"loaded from {source}"
