"""The one Parquet schema of cellbench, and atomic writes.

One row per measured repeat of a point (or one row per point that could not be measured, with
`status` and `error`). `schema_version` changes when columns change meaning; `method_version`
changes when the way a figure is measured changes (prompt shape, warm-up, timing boundaries),
so rows of different methods are never compared as if they were alike.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas costs a third of a second to import; cells never need it
    import pandas as pd

SCHEMA_VERSION = 1
METHOD_VERSION = 1
STATUSES = ("ok", "failed", "timeout", "unsupported")

_STR, _INT, _F64, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()

# name -> (type, nullable, description)
COLUMNS: dict[str, tuple[pa.DataType, bool, str]] = {
    "schema_version": (_INT, False, "version of this column set"),
    "method_version": (_INT, False, "version of the measurement method"),
    "study": (_STR, False, "study name"),
    "cell_id": (_STR, False, "readable name + hash of the resolved cell"),
    "cell_name": (_STR, False, "readable part of cell_id"),
    "machine_id": (_STR, False, "machine the row was measured on"),
    "run_id": (_STR, False, "one execution of the cell"),
    "status": (_STR, False, "ok | failed | timeout | unsupported"),
    "error": (_STR, True, "one-line reason when status is not ok"),
    "engine": (_STR, False, "inference engine"),
    "engine_version": (_STR, True, "engine package version inside the image"),
    "image": (_STR, False, "image name in the study"),
    "image_id": (_STR, True, "docker image id the cell ran on"),
    "device": (_STR, False, "cpu | rocm | cuda"),
    "device_name": (_STR, True, "CPU model or GPU name"),
    "model": (_STR, False, "model name in the study"),
    "mode": (_STR, False, "offline | serve"),
    "dtype": (_STR, False, "dtype requested"),
    "quantization": (_STR, True, "quantization requested"),
    "effective_dtype": (_STR, True, "dtype the engine used"),
    "effective_quantization": (_STR, True, "quantization the engine used"),
    "effective_eager": (_BOOL, True, "engine ran without graph capture / compile"),
    "batch_size": (_INT, False, "requests per point"),
    "input_len": (_INT, False, "prompt tokens per request"),
    "output_len": (_INT, False, "output tokens per request"),
    "repeat": (_INT, True, "repeat index; null on a row for a point never measured"),
    "output_tok_s": (_F64, True, "generated tokens / wall seconds"),
    "total_tok_s": (_F64, True, "(prompt + generated tokens) / wall seconds"),
    "requests_s": (_F64, True, "requests / wall seconds"),
    "duration_s": (_F64, True, "wall seconds of the point"),
    "latency_p50_s": (_F64, True, "end-to-end request latency, median"),
    "latency_p90_s": (_F64, True, "end-to-end request latency, 90th percentile"),
    "latency_p99_s": (_F64, True, "end-to-end request latency, 99th percentile"),
    "ttft_p50_s": (_F64, True, "time to first token, median"),
    "ttft_p99_s": (_F64, True, "time to first token, 99th percentile"),
    "tpot_p50_s": (_F64, True, "time per output token after the first, median"),
    "tpot_p99_s": (_F64, True, "time per output token after the first, 99th percentile"),
    "output_tokens": (_INT, True, "tokens generated in the point (checks fixed length)"),
    "load_s": (_F64, True, "engine construction seconds (cell-level)"),
    "peak_memory_mb": (_F64, True, "peak memory of the container (cell-level)"),
    "started_at": (_STR, True, "UTC start of the cell run"),
    "finished_at": (_STR, True, "UTC end of the cell run"),
    "config_hash": (_STR, False, "hash of the study config"),
    "git_sha": (_STR, True, "project commit"),
    "settings_json": (_STR, False, "the resolved cell as JSON (requested settings)"),
    "effective_json": (_STR, True, "engine settings as the engine resolved them, JSON"),
    "host_load_max": (_F64, True, "highest 1-min load average of the host seen around the cell"),
    "overrides_json": (_STR, True, "requested settings the engine did not use as asked, JSON list"),
    "findings_json": (_STR, True, "known log signatures found in the cell's engine log, JSON list"),
    "weight_bytes": (_INT, True, "model weight bytes as the engine holds them (roofline context)"),
    "ttft_mean_s": (_F64, True, "time to first token, mean"),
    "tpot_mean_s": (_F64, True, "time per output token after the first, mean"),
    "itl_mean_s": (_F64, True, "inter-token latency (gap between streamed chunks), mean; serve mode"),
    "itl_p50_s": (_F64, True, "inter-token latency, median; serve mode"),
    "itl_p90_s": (_F64, True, "inter-token latency, 90th percentile; serve mode"),
    "itl_p99_s": (_F64, True, "inter-token latency, 99th percentile; serve mode"),
}

SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=nullable) for name, (typ, nullable, _) in COLUMNS.items()],
    metadata={"cellbench.schema_version": str(SCHEMA_VERSION)},
)


class SchemaError(ValueError):
    pass


def to_table(rows: Iterable[dict]) -> pa.Table:
    """Rows -> Arrow table in the schema; unknown or missing required columns are errors."""
    rows = list(rows)
    for index, row in enumerate(rows):
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise SchemaError(f"row {index}: unknown column(s) {sorted(unknown)}")
        missing = [n for n, (_, nullable, _) in COLUMNS.items() if not nullable and row.get(n) is None]
        if missing:
            raise SchemaError(f"row {index}: missing required column(s) {missing}")
        if row["status"] not in STATUSES:
            raise SchemaError(f"row {index}: status {row['status']!r} not in {STATUSES}")
    # Parsed as JSON lines by Arrow, not converted with pa.array: converting Python objects makes
    # pyarrow import pandas, a third of a second that every cell's run would pay for a few rows.
    lines = "".join(json.dumps(row, default=_plain) + "\n" for row in rows).encode()
    if not lines:
        return SCHEMA.empty_table()
    table = pa_json.read_json(
        io.BytesIO(lines),
        read_options=pa_json.ReadOptions(block_size=len(lines)),  # a row must not straddle blocks
        parse_options=pa_json.ParseOptions(explicit_schema=SCHEMA),
    )
    return table.cast(SCHEMA)


def _plain(value):
    """numpy scalars (from statistics over arrays) as the Python number they hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a metrics value")


def atomic_path(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def write_atomic(path: str | Path, write) -> None:
    """Call write(tmp_path) then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    fd, tmp = atomic_path(path)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, table: pa.Table) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_metrics_table(paths: Iterable[str | Path]) -> pa.Table:
    """Concatenate metrics files as one Arrow table; refuse files of another schema version.
    Files are read by a few threads (10,000 small files are mostly open/read latency)."""
    paths = list(paths)

    def read(path) -> pa.Table:
        file = pq.ParquetFile(path)  # half the cost of pq.read_table per small file
        version = (file.schema_arrow.metadata or {}).get(b"cellbench.schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise SchemaError(f"{path}: schema_version {version}, this cellbench reads {SCHEMA_VERSION}")
        return file.read(use_threads=False)

    def conform(tables: list[pa.Table]) -> pa.Table:
        # Files written before a nullable column was added lack it: it reads as nulls.
        table = pa.concat_tables(tables, promote_options="default")
        for name in SCHEMA.names:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), SCHEMA.field(name).type))
        # One contiguous chunk per batch: thousands of tiny per-file buffers cost far more memory.
        return table.select(SCHEMA.names).cast(SCHEMA).combine_chunks()

    batches = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(paths), 500):
            batches.append(conform(list(pool.map(read, paths[start : start + 500]))))
    return pa.concat_tables(batches) if batches else SCHEMA.empty_table()


def read_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate metrics files; refuse files of another schema version."""
    return read_metrics_table(paths).to_pandas()
