"""Image lock files: requirements.lock pins the whole package closure of requirements.txt.

The lock (made by scripts/lock_images.sh) is what the host downloads and the image installs with
--require-hashes --no-deps, so one tag means the same packages on every machine. This module only
checks that a lock still answers its requirements, before anything is downloaded or built.
"""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

LOCK_SUFFIX = ".lock"

# Markers of a requirement are judged for the image's interpreter, not the host's.
TARGET_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


class LockError(ValueError):
    pass


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined and comments dropped."""
    lines, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def _split_hashes(line: str) -> tuple[str, list[str]]:
    """The requirement part of a line and its --hash values (both `--hash=x` and `--hash x`)."""
    words = line.split()
    requirement, hashes, index = [], [], 0
    while index < len(words):
        word = words[index]
        if word.startswith("--hash="):
            hashes.append(word.removeprefix("--hash="))
        elif word == "--hash" and index + 1 < len(words):
            index += 1
            hashes.append(words[index])
        else:
            requirement.append(word)
        index += 1
    return " ".join(requirement), hashes


def parse_requirements(text: str) -> list[Requirement]:
    """The requirements of a requirements.txt; pip options (lines starting with -) are skipped."""
    found = []
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            continue
        spec, _ = _split_hashes(line)
        try:
            found.append(Requirement(spec))
        except InvalidRequirement as err:
            raise LockError(f"line {number}: {spec!r} is not a requirement ({err})") from None
    return found


def parse_lock(text: str) -> dict[str, list[tuple[str, Version, list[str]]]]:
    """{canonical name: [(name as written, pinned version, hashes), ...]} of a lock's entries."""
    entries: dict[str, list[tuple[str, Version, list[str]]]] = {}
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            continue
        spec, hashes = _split_hashes(line)
        try:
            requirement = Requirement(spec)
        except InvalidRequirement as err:
            raise LockError(f"line {number}: {spec!r} is not a requirement ({err})") from None
        pins = [s for s in requirement.specifier if s.operator in ("==", "===")]
        if len(requirement.specifier) != 1 or not pins or "*" in pins[0].version:
            raise LockError(f"{requirement.name}: not pinned to one version (line {number}: {spec!r})")
        try:
            version = Version(pins[0].version)
        except InvalidVersion:
            pinned = pins[0].version
            raise LockError(f"{requirement.name}: pinned version {pinned!r} is not a PEP 440 version") from None
        entries.setdefault(canonicalize_name(requirement.name), []).append((requirement.name, version, hashes))
    return entries


def check_lock(requirements_text: str, lock_text: str) -> None:
    """Raise LockError("<package>: <reason>") unless every requirement is met by one hashed pin."""
    entries = parse_lock(lock_text)
    for name, pins in sorted(entries.items()):
        if len(pins) > 1:
            raise LockError(f"{name}: pinned {len(pins)} times in the lock; expected once")
        if not any(h.startswith("sha256:") for h in pins[0][2]):
            raise LockError(f"{name}: pinned to {pins[0][1]} without a --hash=sha256:...; regenerate the lock")
    for requirement in parse_requirements(requirements_text):
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET_ENV):
            continue  # does not apply to the image's interpreter
        name = canonicalize_name(requirement.name)
        if name not in entries:
            raise LockError(f"{requirement.name}: required but not in the lock; regenerate the lock")
        version = entries[name][0][1]
        if not requirement.specifier.contains(version, prereleases=True):
            raise LockError(
                f"{requirement.name}: the lock pins {version}, outside the required "
                f"{requirement.specifier}; regenerate the lock"
            )


def requirements_of(lock: Path) -> Path:
    """The requirements file a lock was made from: requirements.lock <- requirements.txt."""
    return lock.with_suffix(".txt")


def check_lock_file(lock: Path, shown: str | None = None) -> None:
    """check_lock on a lock file and the requirements beside it; LockError names the lock as `shown`."""
    shown = shown or str(lock)
    if lock.suffix != LOCK_SUFFIX:
        raise LockError(
            f"{shown}: not a lock file; expected a {LOCK_SUFFIX} made from {lock.stem}.txt by scripts/lock_images.sh"
        )
    requirements = requirements_of(lock)
    if not requirements.is_file():
        raise LockError(f"{shown}: no {requirements.name} beside it to check the lock against")
    try:
        check_lock(requirements.read_text(), lock.read_text())
    except LockError as err:
        raise LockError(f"{shown}: {err}") from None
