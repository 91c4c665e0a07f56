"""Models from the user's Hugging Face hub cache (`source: hf-cache`), resolved on the host.

The hub cache layout (huggingface_hub): <hub>/models--ORG--NAME/{refs/<branch>, snapshots/<commit>/,
blobs/}; snapshot files are symlinks into blobs/. A cell mounts the whole repo folder read-only
(the symlinks stay valid) and loads the snapshot path with HF_HUB_OFFLINE=1, so what it runs is
exactly the commit recorded in the manifest. Downloading happens only when the study allows it;
a token is read by huggingface_hub from HF_TOKEN in the environment and never written anywhere.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from .atomic import write_json
from .models import ModelError, file_hashes, replace_dir
from .paths import MODEL_MANIFEST

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_dir(environ: dict[str, str]) -> Path:
    """Where huggingface_hub keeps its cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    home = environ.get("HF_HOME") or Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def repo_folder(hub: Path, repo_id: str) -> Path:
    return hub / ("models--" + repo_id.replace("/", "--"))


def resolve(hub: Path, repo_id: str, revision: str | None) -> tuple[Path, str]:
    """(repo folder, commit) of a cached snapshot; ModelError naming what is missing."""
    repo = repo_folder(hub, repo_id)
    if not repo.is_dir():
        raise ModelError(f"model {repo_id} is not in the hub cache {hub} (no {repo.name}/)")
    revision = revision or "main"
    if COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            raise ModelError(f"model {repo_id}: revision {revision!r} is not in the hub cache ({ref} missing)")
        commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not (snapshot / "config.json").exists():
        raise ModelError(f"model {repo_id}: snapshot {commit} in {hub} is missing or has no config.json")
    return repo, commit


def download(hub: Path, repo_id: str, revision: str | None, log) -> None:
    """Fill the hub cache (needs network and huggingface_hub on the host; HF_TOKEN from the env)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"model {repo_id}: downloading needs huggingface_hub on the host (pip install it)") from None
    log.write(f"downloading {repo_id}@{revision or 'main'} into {hub}\n")
    log.flush()
    try:
        snapshot_download(repo_id, revision=revision, cache_dir=str(hub))
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors all mean the same here
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ModelError(f"model {repo_id}: download failed: {first}") from None


def check_readable(snapshot: Path) -> None:
    """The engine runs as an unprivileged user: every file and folder it reads must be world-readable."""
    for path in [snapshot, *snapshot.rglob("*")]:
        mode = path.stat().st_mode  # through the symlink: the blob's own mode
        need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
        if mode & need != need:
            raise ModelError(
                f"{path.resolve()} is not readable by other users, as the engine runs; "
                f"chmod -R o+rX {snapshot.parent.parent}"
            )


def prepare(name: str, spec: dict, out_dir: Path, log_path: Path, environ: dict[str, str]) -> dict:
    """Resolve the model in the hub cache (downloading only if allowed), hash its files and write
    results/models/<name>/manifest.json pointing at the snapshot."""
    hub = hub_dir(environ)
    revision = spec.get("revision")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        try:
            repo, commit = resolve(hub, spec["repo_id"], revision)
        except ModelError as missing:
            if not spec.get("allow_download"):
                raise ModelError(f"{missing}; download it there, or set models.{name}.allow_download: true") from None
            download(hub, spec["repo_id"], revision, log)
            repo, commit = resolve(hub, spec["repo_id"], revision)
        snapshot = repo / "snapshots" / commit
        check_readable(snapshot)
        log.write(f"{spec['repo_id']}: revision {revision or 'main'} -> {commit}; hashing {snapshot}\n")
        manifest = {
            "name": name,
            "source": spec["source"],
            "repo_id": spec["repo_id"],
            "revision": revision,
            "commit": commit,
            "repo_dir": str(repo.resolve()),
            "snapshot_dir": str(snapshot.resolve()),
            "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": file_hashes(snapshot),
        }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir.parent))
    try:
        write_json(tmp / MODEL_MANIFEST, manifest)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
