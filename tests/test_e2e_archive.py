"""Two machines, one study: archive on one, import on the other, one machines table.

Two results dirs with different CELLBENCH_MACHINE_ID run the same one-cell tiny study in real
containers (real vLLM, real model). Machine B reuses A's image manifest and prepared model, as a
second machine with the same image would, so the test costs two engine loads.
"""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cellbench import archive, cli, metrics
from test_e2e import ROOT, tiny_study

pytestmark = pytest.mark.e2e


def run(workdir: Path, machine: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CELLBENCH_MACHINE_ID": machine}
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, env=env)
    if done.returncode:
        raise AssertionError(f"{argv[:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def snakemake(workdir: Path, machine: str, *args: str) -> subprocess.CompletedProcess:
    # Targets first: --configfile takes every word after it.
    return run(workdir, machine, "snakemake", *args, "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
               "--configfile", str(workdir / "study.yaml"))  # fmt: skip


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    study = tiny_study(ok={"dtype": "bfloat16"})
    study["defaults"]["sweep"].update(batch_size=[1], repeats=1)
    study["defaults"]["timeout_s"] = 900  # a busy shared machine must not turn the comparison into a timeout row
    a, b = tmp_path_factory.mktemp("machine-a"), tmp_path_factory.mktemp("machine-b")
    for workdir in (a, b):
        (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake(a, "machine-a")
    snakemake(a, "machine-a", "archive")
    (archive,) = (a / "results" / "archive").glob("*.tar.gz")
    for shared in ("images", "models"):
        shutil.copytree(a / "results" / shared, b / "results" / shared)
    snakemake(b, "machine-b")
    outcome = {
        "a": a,
        "b": b,
        "archive": archive,
        "before_import": snakemake(b, "machine-b", "--dry-run"),
        "import": run(b, "machine-b", "cellbench", "import", str(archive)),
        "after_import": snakemake(b, "machine-b", "--dry-run"),
        "again": run(b, "machine-b", "cellbench", "import", str(archive)),
    }
    snakemake(b, "machine-b")
    return outcome


def test_archive_holds_results_and_manifests_not_weights(machines):
    assert machines["archive"].name.startswith("machine-a-")
    with tarfile.open(machines["archive"]) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    assert names[0] == "MANIFEST.json" and sorted(names[1:]) == sorted(manifest["members"])
    (cell_dir,) = (machines["a"] / "results" / "cells").iterdir()
    for name in ("metrics.parquet", "provenance.json", "engine.log"):
        assert f"cells/{cell_dir.name}/round-1/{name}" in names
    assert {"images/cpu.json", "models/smollm2-135m/manifest.json", "study/config.json", "study/resolved.json"} <= set(
        names
    )
    assert not [n for n in names if n.endswith((".safetensors", ".gguf"))]
    assert manifest["machine_id"] == "machine-a" and manifest["format_version"] == 1
    assert manifest["schema_version"] == metrics.SCHEMA_VERSION
    assert manifest["git_sha"] and manifest["cellbench_version"]
    size = manifest["members"][f"cells/{cell_dir.name}/round-1/metrics.parquet"]["bytes"]
    assert size == (cell_dir / "round-1" / "metrics.parquet").stat().st_size


def test_import_is_noticed_by_snakemake_and_idempotent(machines):
    assert "Nothing to be done" in machines["before_import"].stdout + machines["before_import"].stderr
    assert "aggregate" in machines["after_import"].stdout + machines["after_import"].stderr
    assert "imported" in machines["import"].stdout
    assert "already imported" in machines["again"].stdout
    (imported,) = (machines["b"] / "results" / "imported" / "machine-a").iterdir()
    assert (imported / "MANIFEST.json").is_file()


def test_machines_table_has_both_machines_side_by_side(machines):
    results = machines["b"] / "results"
    summary = pd.read_parquet(results / "summary.parquet")
    assert set(summary["machine_id"]) == {"machine-a", "machine-b"}
    assert summary.groupby("machine_id")["cell_id"].first().nunique() == 1  # same cell id on both
    table = pd.read_csv(results / "tables" / "machines.csv").set_index("machine_id")
    assert set(table.index) == {"machine-a", "machine-b"} and table["compared"].all()
    assert set(table["reference_machine"]) == {"machine-b"}
    ratio = table.loc["machine-a", "output_tok_s"] / table.loc["machine-b", "output_tok_s"]
    assert table.loc["machine-a", "vs_reference"] == pytest.approx(ratio) and ratio > 0
    markdown = (results / "tables" / "machines.md").read_text()
    assert "machine-b tok/s" in markdown and "machine-a tok/s" in markdown and "machine-a ×" in markdown
    assert f"{table.loc['machine-a', 'vs_reference']:.2f}×" in markdown


def test_with_images_saves_a_loadable_image(machines, tmp_path):
    """--with-images is wired to `docker save`; checked on the small base image the CPU image
    was built from (saving the 4.6 GB CPU image would cost minutes)."""
    assert cli.build_parser().parse_args(["archive", "--with-images"]).with_images
    manifest = tmp_path / "base.json"
    manifest.write_text(json.dumps({"name": "base", "tag": "cellbench/base:bookworm"}))
    with open(tmp_path / "save.log", "w") as log:
        saved = archive.save_images({"images/base.json": manifest}, tmp_path, log)
    assert list(saved) == ["images/base.docker.tar"] and archive.MEMBER_RE.match("images/base.docker.tar")
    with tarfile.open(saved["images/base.docker.tar"]) as tar:
        (image,) = json.load(tar.extractfile("manifest.json"))
    assert image["RepoTags"] == ["cellbench/base:bookworm"]
