"""GPU slots: cells running at the same time get disjoint GPUs.

Snakemake's `--resources gpu=K` bounds how many GPUs the running cells ask for in total; this
module decides which ones each cell gets. One lock file per physical device under a lock
directory shared by every cellbench process on the machine; a held `fcntl.flock` is the claim.
The kernel drops a flock when its process dies, so a crashed or killed run never leaves a GPU
claimed, and no stale-lock clean-up exists to get wrong.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .images import cache_dir

LOCK_DIR_ENV = "CELLBENCH_LOCK_DIR"


class SlotError(RuntimeError):
    pass


def lock_dir(environ: dict[str, str]) -> Path:
    """Shared by all checkouts of the same user on this machine (not per working directory)."""
    return Path(environ.get(LOCK_DIR_ENV) or cache_dir() / "gpu-locks")


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def acquire(
    keys: list[str], count: int, directory: Path, *, timeout_s: float = 3600, poll_s: float = 1.0
) -> Iterator[list[str]]:
    """Claim `count` of the devices named by `keys` (in order of preference) for the duration of
    the with-block; wait while fewer are free; raise SlotError when they can never be enough or
    the wait exceeds `timeout_s`."""
    if count > len(keys):
        raise SlotError(f"a cell needs {count} GPUs, this machine offers {len(keys)}")
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    held: dict[str, int] = {}
    try:
        while True:
            for key in keys:
                if len(held) == count:
                    break
                if key not in held:
                    fd = _try_lock(directory / f"{key}.lock")
                    if fd is not None:
                        held[key] = fd
            if len(held) == count:
                break
            # Not enough free: let go of the partial claim so two waiting cells cannot each hold
            # half of what the other needs.
            for fd in held.values():
                os.close(fd)
            held.clear()
            if time.monotonic() >= deadline:
                raise SlotError(f"no {count} free GPUs of {len(keys)} within {timeout_s:.0f} s (locks in {directory})")
            time.sleep(poll_s)
        for fd in held.values():
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        yield [key for key in keys if key in held]
    finally:
        for fd in held.values():
            os.close(fd)
