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
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas and polars cost a third of a second to import; cells never need them
    import pandas as pd
    import polars as pl

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
    # Rounds and the host's fitness (null in files written before rounds: "not measured").
    "round": (_INT, True, "round of the cell (a fresh container and engine load), from 1"),
    "canary_matmul_1t_gflops": (_F64, True, "host canary before the engine loaded: float32 matmul, 1 thread"),
    "canary_matmul_all_gflops": (_F64, True, "host canary: float32 matmul, one process per CPU of the cell"),
    "canary_memcpy_gb_s": (_F64, True, "host canary: memory copy, bytes read + written per second"),
    "host_foreign_cpu": (_F64, True, "CPU cores used outside the cell's container during the repeat"),
    "host_steal_cpu": (_F64, True, "CPU cores the hypervisor stole during the repeat"),
    "versions_json": (_STR, True, "package versions inside the image (engine, torch, transformers, numpy), JSON"),
}
# Columns a file may lack: it was written before they existed, and they read as null. A missing
# required column makes a file unreadable.
OPTIONAL_COLUMNS = {name for name, (_, nullable, _) in COLUMNS.items() if nullable}

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


def polars_schema() -> pl.Schema:
    """SCHEMA in polars' types."""
    import polars as pl

    return pl.from_arrow(SCHEMA.empty_table()).schema


def stored_schema_version(file: pq.ParquetFile) -> str:
    """The schema version a Parquet file declares in its key-value metadata (where pyarrow and
    polars writers both keep ours), or "?"."""
    return (file.metadata.metadata or {}).get(b"cellbench.schema_version", b"?").decode(errors="replace")


def _scan(paths: list[str], file_column: str | None = None) -> pl.LazyFrame:
    """The metrics files as one lazy polars frame in the schema (polars reads 10,000 small files
    ~3x faster than pyarrow file by file)."""
    import polars as pl

    return pl.scan_parquet(
        paths,
        schema=polars_schema(),
        missing_columns="insert",  # files written before a nullable column was added: nulls
        extra_columns="ignore",
        include_file_paths=file_column,
    )


def combine_metrics(paths: Iterable[str | Path], out: str | Path) -> None:
    """Every row of the metrics files in one Parquet file, streamed (10,000 cells never sit in
    memory at once); rows of another schema version are refused, naming their file."""
    import polars as pl

    paths = [str(path) for path in paths]

    def write(tmp: str) -> None:
        if not paths:
            pq.write_table(SCHEMA.empty_table(), tmp)
            return
        try:
            _scan(paths).sink_parquet(tmp, metadata={k.decode(): v.decode() for k, v in SCHEMA.metadata.items()})
        except (pl.exceptions.PolarsError, OSError):
            pq.write_table(_read_each(paths), tmp)  # one file at a time, to name the file at fault
        if not _wrong_version(pl.scan_parquet(tmp)).head(1).collect().is_empty():
            _refuse_wrong_version(paths)

    write_atomic(out, write)


def _wrong_version(frame: pl.LazyFrame) -> pl.LazyFrame:
    import polars as pl

    return frame.filter(pl.col("schema_version").ne_missing(SCHEMA_VERSION))


def scan_metrics(paths: Iterable[str | Path]) -> pl.LazyFrame:
    """Metrics files (or the one summary) as a lazy polars frame: a step reads only the columns it
    uses. Rows of another schema version are refused, naming their file."""
    import polars as pl

    paths = [str(path) for path in paths]
    if not paths:
        return pl.from_arrow(SCHEMA.empty_table()).lazy()
    frame = _scan(paths)
    try:
        wrong = not _wrong_version(frame).head(1).collect().is_empty()
    except (pl.exceptions.PolarsError, OSError):
        return pl.from_arrow(_read_each(paths)).lazy()  # one file at a time, to name the file at fault
    if wrong:
        _refuse_wrong_version(paths)
    return frame


def _refuse_wrong_version(paths: list[str]) -> None:
    """Scan again, with file names this time (rare: a file path per row costs memory), to name one."""
    wrong = _wrong_version(_scan(paths, file_column="_file")).head(1).collect()
    _check_version(wrong["_file"][0], wrong["schema_version"][0])


def _check_version(path, version) -> None:
    if str(version) != str(SCHEMA_VERSION):
        raise SchemaError(f"{path}: schema_version {version}, this cellbench reads {SCHEMA_VERSION}")


def _read_each(paths: list[str]) -> pa.Table:
    """The slow path: each file on its own, so the error names the file at fault."""
    tables = []
    for path in paths:
        try:
            file = pq.ParquetFile(path)
            _check_version(path, stored_schema_version(file))
            table = file.read()
            for name in SCHEMA.names:
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(len(table), SCHEMA.field(name).type))
            tables.append(table.select(SCHEMA.names).cast(SCHEMA))
        except FileNotFoundError:
            raise SchemaError(f"{path}: no such metrics file") from None
        except (OSError, pa.ArrowException) as exc:
            raise SchemaError(f"{path}: not a cellbench metrics file ({exc})") from None
    return pa.concat_tables(tables)


def read_metrics(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate metrics files as pandas; refuse files of another schema version."""
    return scan_metrics(paths).collect().to_pandas()
