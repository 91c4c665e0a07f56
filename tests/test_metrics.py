import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from cellbench import atomic, metrics


def _row(**overrides):
    row = {name: None for name in metrics.COLUMNS}
    row.update(
        schema_version=metrics.SCHEMA_VERSION, method_version=metrics.METHOD_VERSION, study="s",
        cell_id="c-0123456789", cell_name="c", machine_id="m", run_id="r", status="ok", engine="vllm",
        image="cpu", device="cpu", model="m", mode="offline", dtype="bfloat16", batch_size=1,
        input_len=8, output_len=8, repeat=0, output_tok_s=12.5, config_hash="h", settings_json="{}",
    )  # fmt: skip
    row.update(overrides)
    return row


def test_round_trip_keeps_types_and_version(tmp_path):
    path = tmp_path / "m.parquet"
    metrics.write_parquet(path, metrics.to_table([_row(), _row(repeat=1, output_tok_s=13.5)]))
    assert pq.read_schema(path).metadata[b"cellbench.schema_version"] == str(metrics.SCHEMA_VERSION).encode()
    frame = metrics.scan_metrics([path]).collect().to_pandas()
    assert list(frame.columns) == list(metrics.COLUMNS)
    assert frame["output_tok_s"].tolist() == [12.5, 13.5]
    assert frame["schema_version"].unique().tolist() == [metrics.SCHEMA_VERSION]
    assert pd.api.types.is_integer_dtype(frame["batch_size"])


def test_schema_refuses_bad_rows():
    with pytest.raises(metrics.SchemaError, match="unknown column"):
        metrics.to_table([_row(colour="red")])
    with pytest.raises(metrics.SchemaError, match=r"missing required column\(s\) \['cell_id'\]"):
        metrics.to_table([_row(cell_id=None)])
    with pytest.raises(metrics.SchemaError, match="status 'meh'"):
        metrics.to_table([_row(status="meh")])


@pytest.fixture
def good_and_old(tmp_path):
    good, old = tmp_path / "good.parquet", tmp_path / "old.parquet"
    metrics.write_parquet(good, metrics.to_table([_row()]))
    newer = metrics.SCHEMA_VERSION + 1  # written by a later cellbench
    table = metrics.to_table([_row(schema_version=newer)]).replace_schema_metadata(
        {"cellbench.schema_version": str(newer)}
    )
    pq.write_table(table, old)
    return good, old


@pytest.mark.parametrize(
    "read",
    [
        lambda paths: metrics.scan_metrics(paths).collect().to_pandas(),
        lambda paths: metrics._read_each([str(p) for p in paths]),
        lambda paths: metrics.combine_metrics(paths, paths[0].parent / "summary.parquet"),
    ],
    ids=["read", "file-by-file", "combine"],
)
def test_rows_of_another_schema_version_are_refused_naming_the_file(good_and_old, read):
    good, old = good_and_old
    newer = metrics.SCHEMA_VERSION + 1
    expected = f"{old}: schema_version {newer} was written by a newer cellbench .* upgrade cellbench$"
    with pytest.raises(metrics.SchemaError, match=expected):
        read([good, old])


def test_a_version_that_never_existed_is_refused(tmp_path):
    path = tmp_path / "zero.parquet"
    table = metrics.to_table([_row(schema_version=0)])
    pq.write_table(table.replace_schema_metadata({"cellbench.schema_version": "0"}), path)
    with pytest.raises(metrics.SchemaError, match="schema_version '0' is not a schema version"):
        metrics.scan_metrics([path]).collect().to_pandas()


def grown_history():
    """The history with one more version adding a nullable column, as a later cellbench has it."""
    return {**metrics.COLUMN_HISTORY, metrics.SCHEMA_VERSION + 1: {"joules": (metrics._F64, True, "energy")}}


def grow(monkeypatch, history) -> None:
    """Install a column history in metrics the way the module derives it at import."""
    monkeypatch.setattr(metrics, "COLUMN_HISTORY", history)
    for name, value in zip(("SCHEMA_VERSION", "COLUMNS", "SCHEMA"), metrics.derive(history), strict=True):
        monkeypatch.setattr(metrics, name, value)


def test_the_column_history_derives_the_schema_by_one_rule():
    version, columns, schema = metrics.derive(metrics.COLUMN_HISTORY)
    assert version == max(metrics.COLUMN_HISTORY) == metrics.SCHEMA_VERSION and columns == metrics.COLUMNS
    assert schema.metadata[b"cellbench.schema_version"] == str(version).encode()
    version, columns, _ = metrics.derive(grown_history())
    assert version == metrics.SCHEMA_VERSION + 1 and list(columns)[-1] == "joules"
    with pytest.raises(metrics.SchemaError, match="must be nullable"):
        metrics.derive(
            {**metrics.COLUMN_HISTORY, metrics.SCHEMA_VERSION + 1: {"joules": (metrics._F64, False, "energy")}}
        )
    with pytest.raises(metrics.SchemaError, match="steps of one"):
        metrics.derive(
            {**metrics.COLUMN_HISTORY, metrics.SCHEMA_VERSION + 2: {"joules": (metrics._F64, True, "energy")}}
        )
    with pytest.raises(metrics.SchemaError, match="added twice"):
        metrics.derive(
            {**metrics.COLUMN_HISTORY, metrics.SCHEMA_VERSION + 1: {"status": (metrics._STR, True, "again")}}
        )


def test_after_a_column_is_added_older_files_read_it_as_null_and_newer_rows_are_kept(tmp_path, monkeypatch):
    old = tmp_path / "old.parquet"
    metrics.write_parquet(old, metrics.to_table([_row()]))
    before = metrics.SCHEMA_VERSION
    grow(monkeypatch, grown_history())
    new = tmp_path / "new.parquet"
    metrics.write_parquet(new, metrics.to_table([_row(schema_version=metrics.SCHEMA_VERSION, joules=3.0)]))
    for read in (lambda paths: metrics.scan_metrics(paths).collect().to_pandas(),
                 lambda paths: metrics.combine_metrics(paths, tmp_path / "s.parquet")
                 or metrics.scan_metrics([tmp_path / "s.parquet"]).collect().to_pandas()):  # fmt: skip
        frame = read([old, new])
        assert frame["joules"].isna().tolist() == [True, False] and frame["schema_version"].tolist() == [
            before,
            before + 1,
        ]


def test_combine_streams_every_row_into_one_file_and_a_refusal_keeps_the_old_one(tmp_path, good_and_old):
    good, old = good_and_old
    other = tmp_path / "other.parquet"
    metrics.write_parquet(other, metrics.to_table([_row(cell_id="d-0123456789", output_tok_s=20.0)]))
    summary = tmp_path / "summary.parquet"
    metrics.combine_metrics([good, other], summary)
    assert (
        pq.ParquetFile(summary).metadata.metadata[b"cellbench.schema_version"] == str(metrics.SCHEMA_VERSION).encode()
    )
    frame = metrics.scan_metrics([summary]).collect().to_pandas()
    assert list(frame.columns) == list(metrics.COLUMNS) and frame["output_tok_s"].tolist() == [12.5, 20.0]
    before = summary.read_bytes()
    with pytest.raises(metrics.SchemaError):
        metrics.combine_metrics([good, old], summary)
    assert summary.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_a_file_from_before_a_column_was_added_reads_it_as_nulls(tmp_path):
    path = tmp_path / "older.parquet"
    pq.write_table(metrics.to_table([_row()]).drop_columns(["itl_p99_s", "host_load_max"]), path)
    frame = metrics.scan_metrics([path]).collect().to_pandas()
    assert list(frame.columns) == list(metrics.COLUMNS)
    assert frame["itl_p99_s"].isna().all() and frame["output_tok_s"].tolist() == [12.5]


def test_a_file_that_is_not_metrics_is_named(tmp_path):
    good, junk = tmp_path / "good.parquet", tmp_path / "junk.parquet"
    metrics.write_parquet(good, metrics.to_table([_row()]))
    junk.write_text("not parquet")
    with pytest.raises(metrics.SchemaError, match=f"{junk}: not a cellbench metrics file"):
        metrics.scan_metrics([good, junk]).collect().to_pandas()


def test_no_files_is_an_empty_table_in_the_schema(tmp_path):
    assert list(metrics.scan_metrics([]).collect().to_pandas().columns) == list(metrics.COLUMNS)
    metrics.combine_metrics([], tmp_path / "summary.parquet")
    assert pq.read_schema(tmp_path / "summary.parquet") == metrics.SCHEMA


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    atomic.write_json(path, {"a": 1})

    def explode(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_with(path, explode)
    assert path.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_cells_run_writes_its_parquet_files_without_importing_pandas_or_polars(tmp_path):
    """`cellbench run-cell` runs once per cell: pandas and polars cost it 0.3-0.5 s each to import,
    packaging, pyarrow.compute and the modules of other commands 0.02-0.1 s each. pyarrow's own
    conversion of Python rows (pa.array, from_pylist, Schema.empty_table) imports pandas;
    metrics.rows_table does not."""
    import subprocess
    import sys

    code = f"""
import sys
import cellbench.cli
from cellbench import metrics, profiles, telemetry
out = {str(tmp_path)!r}
metrics.write_parquet(out + "/m.parquet", metrics.to_table([]))
telemetry.write_parquet(out + "/t.parquet", [{{"t_s": 1.5, "source": "cgroup-v2", "cpu_cores": 0.25}}])
op = {{"op": "mm", "calls": 2.0, "self_us": 3.0, "total_us": 4.0, "share": 1.0}}
profiles.write_parquet(out + "/p.parquet", [op])
unneeded = ("pandas", "polars", "scipy", "packaging", "pyarrow.compute", "cellbench.archive", "cellbench.doctor")
print(sorted(m for m in unneeded if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(metrics.__file__).parents[1])}  # this checkout's cellbench
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"
    from cellbench import telemetry

    assert pq.read_table(tmp_path / "t.parquet").to_pylist()[0] | {"t_rel_s": 9} == {
        name: None for name in telemetry.COLUMNS
    } | {"t_s": 1.5, "source": "cgroup-v2", "cpu_cores": 0.25, "t_rel_s": 9}
    assert pq.read_schema(tmp_path / "t.parquet") == telemetry.SCHEMA
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == [
        {"op": "mm", "calls": 2.0, "self_us": 3.0, "total_us": 4.0, "share": 1.0, "phase": None}
    ]
    assert pq.read_schema(tmp_path / "m.parquet") == metrics.SCHEMA
