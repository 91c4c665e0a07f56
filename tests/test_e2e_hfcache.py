"""A model from a Hugging Face hub cache, end to end in a real container: the real SmolLM2 model
laid out as a hub cache (blobs + snapshot symlinks + refs/main), resolved on the host, mounted
read-only, loaded by real vLLM with HF_HUB_OFFLINE=1 and --network none."""

import json
import os
import shutil

import pandas as pd
import pytest
import yaml
from test_e2e import cell_dirs, labelled_containers, snakemake, tiny_study

pytestmark = pytest.mark.e2e
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_from(model_dir, hub):
    repo = hub / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for path in model_dir.iterdir():
        if path.is_file() and path.name != "manifest.json":
            blob = repo / "blobs" / f"blob-{path.name}"
            shutil.copyfile(path, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    return repo


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    prep = tmp_path_factory.mktemp("prep")
    (prep / "study.yaml").write_text(yaml.safe_dump(tiny_study(ok={"dtype": "bfloat16"})))
    snakemake(prep, "--until", "prepare_model")
    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub_from(prep / "results" / "models" / "smollm2-135m", hub)

    workdir = tmp_path_factory.mktemp("hubstudy")
    study = tiny_study(hub={"dtype": "bfloat16"})
    study["models"] = {"smollm2-hub": {"source": "hf-cache", "repo_id": REPO_ID}}
    study["defaults"]["model"] = "smollm2-hub"
    study["defaults"]["sweep"].update(batch_size=[1], repeats=1)
    study["defaults"]["timeout_s"] = 900  # the engine start alone can take minutes on a busy 2-core machine
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    os.environ["HF_HUB_CACHE"] = str(hub)
    try:
        snakemake(workdir)
    finally:
        del os.environ["HF_HUB_CACHE"]
    return workdir, repo


def test_hub_cache_model_runs_in_a_cell(hub_run):
    workdir, repo = hub_run
    manifest = json.loads((workdir / "results" / "models" / "smollm2-hub" / "manifest.json").read_text())
    assert manifest["commit"] == COMMIT and manifest["repo_id"] == REPO_ID
    assert "model.safetensors" in manifest["files"]
    cell = cell_dirs(workdir)["hub"]
    rows = pd.read_parquet(cell / "metrics.parquet")  # cell_dirs gives the round-1 folder
    assert set(rows["status"]) == {"ok"} and (rows["output_tok_s"] > 0).all()
    argv = json.loads((cell / "provenance.json").read_text())["docker_run"]
    assert f"{repo.resolve()}:/model:ro" in argv
    assert "HF_HUB_OFFLINE=1" in argv and argv[argv.index("--network") + 1] == "none"
    assert labelled_containers(workdir) == []
