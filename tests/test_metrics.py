from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from cellbench import metrics


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
    frame = metrics.read_metrics([path])
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


def test_other_schema_version_is_refused(tmp_path):
    import pyarrow as pa

    path = tmp_path / "old.parquet"
    table = metrics.to_table([_row()])
    pq.write_table(table.replace_schema_metadata({"cellbench.schema_version": "0"}), path)
    with pytest.raises(metrics.SchemaError, match="schema_version 0"):
        metrics.read_metrics([path])
    assert isinstance(table, pa.Table)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    metrics.write_json_atomic(path, {"a": 1})

    def explode(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        metrics.write_atomic(path, explode)
    assert path.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
