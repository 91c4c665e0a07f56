"""Results that explain themselves, end to end: a tiny study in real containers (real vLLM on
CPU), then the diagnostics, verdicts, plots and the HTML report opened in a real headless
Chromium. One module-scoped run serves every assertion.

The `fork` cell asks for VLLM_WORKER_MULTIPROC_METHOD=fork, which vLLM's CPU platform replaces
with spawn (CpuPlatform.check_and_update_config): a real override the tables must mark.
"""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import yaml
from test_e2e import ROOT, cell_dirs, snakemake, tiny_study

pytestmark = pytest.mark.e2e
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
# Records, once the page has loaded, how many tables it has and each image's natural width.
PROBE = """<script>window.addEventListener("load", () => document.body.setAttribute("data-probe", JSON.stringify({
  tables: document.querySelectorAll("table").length,
  images: [...document.images].map(i => [i.getAttribute("src"), i.naturalWidth])})));</script>"""


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("explain")
    study = tiny_study(
        ok={"dtype": "bfloat16"},
        fork={"dtype": "bfloat16", "env": {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}},
        awq={"dtype": "bfloat16", "quantization": "awq"},
    )
    study["expectations"] = [
        {"cells": "*", "batch_size": 1, "metric": "output_tok_s", "min": 0.001, "source": "any real figure"},
        {"cells": "ok", "batch_size": 2, "metric": "output_tok_s", "min": 1e9, "source": "impossible on purpose"},
    ]
    study["bandwidth_gb_s"] = {".": 20}  # any device name: exercises the roofline column
    study["defaults"]["timeout_s"] = 900  # engine loads take minutes on a busy 2-core machine
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    snakemake(workdir)
    return workdir


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    # The test installs what it needs, as the Slurm test sets up its Slurm: README command 2
    # must pass on a machine where nothing else was set up.
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure_chromium.sh")], check=True)
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run scripts/ensure_chromium.sh"
    argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def test_override_recorded_in_provenance_and_parquet(explained):
    fork = cell_dirs(explained)["fork"]
    provenance = json.loads((fork / "provenance.json").read_text())
    assert provenance["overrides"] == [
        {"setting": "env.VLLM_WORKER_MULTIPROC_METHOD", "requested": "fork", "effective": "spawn"}
    ]
    changed = provenance["engine_set_env"]
    assert changed["VLLM_WORKER_MULTIPROC_METHOD"] == {"before": "fork", "after": "spawn"}
    assert "libgomp" in changed["LD_PRELOAD"]["after"]  # the CPU platform preloads torch's OpenMP
    rows = pd.read_parquet(fork / "metrics.parquet")
    assert json.loads(rows["overrides_json"].iloc[0])[0]["effective"] == "spawn"
    assert rows["weight_bytes"].iloc[0] > 100e6  # bf16 SmolLM2-135M: about 270 MB of safetensors


def test_same_as_is_marked_in_every_table(explained):
    mark = "same as ok: VLLM_WORKER_MULTIPROC_METHOD forced to spawn by the engine"
    tables = explained / "results" / "tables"
    for name in ("summary.md", "summary.csv", "diagnostics.md"):
        assert mark in (tables / name).read_text(), name
    assert html.escape(mark) in (explained / "results" / "report" / "index.html").read_text()


def test_failed_awq_cell_has_its_finding_and_remediation(explained):
    provenance = json.loads((cell_dirs(explained)["awq"] / "provenance.json").read_text())
    # The bf16 model has no AWQ config: vLLM refuses it before any kernel runs (with a real AWQ
    # checkpoint the CPU build fails later, on cpu_gemm_wna16: another signature).
    assert "quantization-config-missing" in [f["id"] for f in provenance["findings"]]
    diagnostics = (explained / "results" / "tables" / "diagnostics.md").read_text()
    section = diagnostics.split("quantization-config-missing (awq)", 1)[1]
    assert "**Remediation:**" in section and "Cannot find the config file for awq" in section


def test_verdicts_ratios_and_roofline(explained):
    verdicts = (explained / "results" / "tables" / "verdicts.md").read_text()
    lines = [line for line in verdicts.splitlines() if line.startswith("| ✅") or line.startswith("| ❌")]
    assert any(line.startswith("| ❌") and "| ok |" in line and "impossible on purpose" in line for line in lines)
    assert any(line.startswith("| ✅") and "| fork |" in line for line in lines)
    assert re.search(
        r"- fork is [0-9.]+× ok at batch 1; [0-9.]+× at batch 2 \(no interval: .*\) "
        r"\(same as ok: .* run-to-run spread\)",
        verdicts,
    )
    roofline = verdicts.split("memory-bandwidth bound", 1)[1]
    assert re.search(r"\| ok \| 1 × 16→8 \| [0-9]+ \| [0-9.]+ \| 20 \| [0-9.]+% \|", roofline)


def test_report_renders_tables_and_images_in_chromium(explained, tmp_path):
    report = explained / "results" / "report" / "index.html"
    probe = report.with_name("probe.html")  # the page plus a load probe, beside it for relative links
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_data=tmp_path / "u1").stdout
    finally:
        probe.unlink()
    found = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert found["tables"] == 3  # verdicts, every cell and point, diagnostics
    # machines.png needs two machines and quality.png a cell that measured quality (off here)
    assert [src for src, _ in found["images"]] == [
        "../plots/throughput.png", "../plots/latency.png", "../plots/telemetry.png",
    ]  # fmt: skip
    assert all(width > 0 for _, width in found["images"]), found["images"]
    shot = tmp_path / "report.png"
    chromium("--window-size=1200,1600", f"--screenshot={shot}", report.as_uri(), user_data=tmp_path / "u2")
    pixels = matplotlib.image.imread(shot)
    assert pixels.std() > 0.05  # not a blank page


def test_snakemake_report_carries_the_plots(explained):
    snakemake(explained, "--report", "report.zip")
    members = subprocess.run(["python3", "-m", "zipfile", "-l", str(explained / "report.zip")], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    for plot in ("throughput.png", "latency.png", "machines.png"):
        assert plot in members
