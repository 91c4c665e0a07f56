"""Atomic writes: a file appears whole or not at all (a temp file beside it, then a rename on
the same file system), so a reader, a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_with(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_with(path, lambda tmp: Path(tmp).write_text(text))


def write_checked_json(path: str | Path, value) -> None:
    """`value` as compact JSON behind a first line holding the JSON's sha256 (a cache's index:
    read_checked_json gives it back only while it is intact)."""
    data = json.dumps(value, separators=(",", ":")).encode()
    write_with(path, lambda tmp: Path(tmp).write_bytes(hashlib.sha256(data).hexdigest().encode() + b"\n" + data))


def read_checked_json(path: str | Path):
    """What write_checked_json wrote, or None where the rest of the file does not hash to its first
    line. Raises what reading and parsing raise (OSError, ValueError)."""
    check, _, body = Path(path).read_bytes().partition(b"\n")
    return json.loads(body) if hashlib.sha256(body).hexdigest().encode() == check else None


def write_json(path: str | Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
