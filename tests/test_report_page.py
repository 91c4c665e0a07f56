"""The explanation layer on synthetic rows (pure logic; the real run is in test_e2e_report)."""

import json
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from cellbench import aggregate, diagnose, diagnostics, plots, report_html, verdicts


def _cell(name, env):
    return {"id": f"{name}-h", "name": name, "engine": "vllm", "image": "rocm", "model": "m", "mode": "offline",
            "sweep": {}, "dtype": "float16", "quantization": "awq", "engine_args": {}, "env": env}  # fmt: skip


def _rows(name, env, machine, values, findings=(), status="ok"):
    cell = _cell(name, env)
    used = {"dtype": "float16", "quantization": "awq", "enforce_eager": False, "compilation_mode": "3",
            "env": {"VLLM_USE_TRITON_AWQ": "1"}}  # fmt: skip
    rows = []
    for batch, value in values:
        rows.append(
            {
                "machine_id": machine, "cell_id": cell["id"], "cell_name": name, "batch_size": batch,
                "input_len": 128, "output_len": 128, "repeat": 0, "status": status, "error": None,
                "output_tok_s": value, "latency_p50_s": 1.0, "latency_p90_s": 1.2, "latency_p99_s": 1.5,
                "ttft_p50_s": 0.1, "tpot_p50_s": 0.02, "study": "s", "engine": "vllm", "image": "rocm", "model": "m",
                "dtype": "float16", "quantization": "awq", "effective_json": json.dumps(used),
                "settings_json": json.dumps(cell), "device_name": "AMD Instinct MI300X", "load_s": 60.0,
                "findings_json": json.dumps(list(findings)), "weight_bytes": 5_000_000_000,
                "overrides_json": json.dumps([{"setting": f"env.{k}", "requested": v, "effective": "1"}
                                              for k, v in env.items() if v != "1"]),
            }
        )  # fmt: skip
    return rows


@pytest.fixture
def points():
    forced = diagnose.findings(
        "WARNING Using AWQ quantization with ROCm, but VLLM_USE_TRITON_AWQ is not set, enabling VLLM_USE_TRITON_AWQ."
    )
    rows = _rows("awq", {}, "amd-1", [(1, 20.0), (32, 400.0)], forced)
    rows += _rows("awq-triton_off", {"VLLM_USE_TRITON_AWQ": "0"}, "amd-1", [(1, 19.8), (32, 401.0)], forced)
    rows += _rows("awq", {}, "amd-2", [(1, 25.0), (32, 500.0)])
    table = aggregate.cell_points(pd.DataFrame(rows), "awq-h")
    return verdicts.with_roofline(table, {})


def test_cells_carry_findings_overrides_and_marks(points):
    entries = {(e["machine_id"], e["cell_name"]): e for e in diagnostics.cells(points)}
    off = entries[("amd-1", "awq-triton_off")]
    assert off["same_as"] == "same as awq: VLLM_USE_TRITON_AWQ forced to 1 by the engine"
    assert off["overrides"][0]["requested"] == "0" and off["findings"][0]["id"] == "triton-awq-forced"
    text = diagnostics.diagnostics_markdown(list(entries.values()), "s")
    assert "= same as awq: VLLM_USE_TRITON_AWQ forced to 1" in text and "### ⚠ triton-awq-forced" in text


def test_roofline_uses_the_device_table(points):
    row = points[(points["machine_id"] == "amd-1") & (points["batch_size"] == 1)].iloc[0]
    assert row["bandwidth_gb_s"] == 5300
    assert row["bound_fraction"] == pytest.approx(5e9 / (0.02 * 5300e9))


def test_plots_are_real_pngs_and_the_page_links_them(points, tmp_path: Path):
    drawn = plots.write_plots(points, tmp_path / "plots")
    for path in drawn:
        assert matplotlib.image.imread(path).std() > 0  # drawn, not blank
    page_path = tmp_path / "report" / "index.html"
    page = report_html.page(
        "s", "awq", points, [], ["x is 1.00× awq at batch 1"], diagnostics.cells(points), drawn, page_path
    )
    assert page.count("<table>") == 2 and "../plots/machines.png" in page  # two machines: machine bars shown
    assert "x is 1.00× awq at batch 1" in page and "same as awq" in page


def test_empty_study_still_writes_every_plot(tmp_path: Path):
    empty = pd.DataFrame(columns=["status", "output_tok_s", "machine_id"])
    assert all(p.exists() for p in plots.write_plots(empty, tmp_path))


def test_the_page_escapes_every_value(points, tmp_path: Path):
    """Cell names, errors, sentences and verdict sources reach the page as text, never as markup;
    the Markdown tables keep them as they are (Markdown is read as text, and `|` is escaped)."""
    hostile = "<script>alert(1)</script>"
    points = points.copy()
    points.loc[points["cell_name"] == "awq", "cell_name"] = hostile
    points.loc[points["cell_name"] == "awq-triton_off", "cell_name"] = "a&b"
    points.loc[points["machine_id"] == "amd-2", "status"] = "failed"
    points.loc[points["machine_id"] == "amd-2", "error"] = "<b>boom</b> & more"
    found = [{"verdict": "❌", "machine_id": "amd-1", "cell_name": hostile, "metric": "output_tok_s",
              "min": 1, "max": None, "source": '"><img src=x onerror=alert(2)>', "measured": 1.0}]  # fmt: skip
    cells = diagnostics.cells(points)
    page = report_html.page(hostile, "a&b", points, found, [f"{hostile} is 1.00× a&b"], cells, [], tmp_path / "i.html")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>boom</b>" not in page and "&lt;b&gt;boom&lt;/b&gt; &amp; more" in page
    assert ">a&amp;b<" in page and "a&b" not in page.replace("a&amp;b", "")
    assert "<img src=x" not in page and "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert "<span class=fail>✘ fail</span>" in page  # the template's own markup stays markup
    markdown = diagnostics.diagnostics_markdown(cells, "s")
    assert f"| {hostile} |" in markdown and "| a&b |" in markdown
