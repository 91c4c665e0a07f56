"""Container runtimes: docker (the default) or podman, chosen per machine, never per study.

The runtime is a property of the machine, like its machine id: `CELLBENCH_RUNTIME=podman`
switches it without touching the study, the cell ids or what Snakemake considers up to date.
Images are built by docker; a runtime or a node that lacks the manifest's image id gets the
very same image (same id) by loading it, from the local docker daemon (`docker save | podman
load`) or from an archive on shared storage (`docker save -o results/images/<name>.tar TAG`,
made once on the build node; every other node loads it on its first cell).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

RUNTIMES = ("docker", "podman")


class RuntimeSetupError(RuntimeError):
    pass


def runtime_from_env(environ: dict[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    runtime = environ.get("CELLBENCH_RUNTIME") or "docker"
    if runtime not in RUNTIMES:
        raise RuntimeSetupError(f"CELLBENCH_RUNTIME={runtime!r}: not one of {', '.join(RUNTIMES)}")
    return runtime


def has_image(runtime: str, image_id: str) -> bool:
    done = subprocess.run([runtime, "image", "inspect", image_id], capture_output=True, check=False)
    return done.returncode == 0


def ensure_image(runtime: str, image_id: str, archive: Path) -> str:
    """Make `image_id` runnable by `runtime` on this node; return where it came from."""
    if has_image(runtime, image_id):
        return "present"
    if archive.is_file():
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
            f"(make it once with: docker save -o {archive} {image_id})"
        )
    if load.returncode or not has_image(runtime, image_id):
        raise RuntimeSetupError(f"{runtime} load from {source} failed: {load.stderr.decode(errors='replace')[-300:]}")
    return f"loaded from {source}"
