"""The one Parquet schema of cellbench, and atomic writes.

One row per measured repeat of a point (or one row per point that could not be measured, with
`status` and `error`). `schema_version` grows by one with each set of columns added
(COLUMN_HISTORY; a column never changes meaning, older rows read new columns as null);
`method_version` changes when the way a figure is measured changes (prompt shape, warm-up,
timing boundaries), so rows of different methods are never compared as if they were alike.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from . import atomic

if TYPE_CHECKING:  # pandas and polars cost a third of a second to import; cells never need them
    import polars as pl

METHOD_VERSION = 1
# The columns that name a point of a cell's sweep (one definition for every module).
POINT = ("batch_size", "input_len", "output_len")
# The columns that name a serve cell's load level (null on other rows): with POINT, a point.
LOAD = ("load_kind", "concurrency", "request_rate", "burstiness", "load_phase")
STATUSES = ("ok", "failed", "timeout", "unsupported")

_STR, _INT, _F64, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()

# The column history: schema version -> the columns it added, name -> (type, nullable,
# description). It is the one source of truth of the schema: COLUMNS, SCHEMA and SCHEMA_VERSION
# are derived from it (pyperf keeps a history of its JSON format's versions the same way, beside
# the code that reads them). The one rule: a new column goes into a new entry
# SCHEMA_VERSION + 1, nullable, so files written before it read it as null ("not measured",
# never 0); a file of a version newer than the last entry is refused (upgrade cellbench).
# Version 1 grew before this history existed: its nullable columns may be absent from its files.
COLUMN_HISTORY: dict[int, dict[str, tuple[pa.DataType, bool, str]]] = {
    1: {
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
        "input_len": (_INT, False, "prompt tokens per request (0: each request its own, from a dataset)"),
        "output_len": (_INT, False, "output tokens per request (0: each request its own, from a dataset)"),
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
    },
    2: {"device_arch": (_STR, True, "GPU architecture the cell ran on (gfx942, sm_90); null on CPU")},
    # Quality next to speed (cellbench.quality_texts states the contract): on every row of the
    # round that measured it (round 1), null elsewhere. Quality has its own method version;
    # METHOD_VERSION stays, as speed is measured as before (bumping it would make every older
    # speed row incomparable).
    3: {
        "quality_status": (_STR, True, "ok | failed | unsupported | off; null: not measured in this round"),
        "quality_error": (_STR, True, "one-line reason when quality_status is not ok"),
        "quality_s": (_F64, True, "seconds of the quality step (after the speed points, untimed by them)"),
        "quality_nll": (_F64, True, "mean negative log-likelihood per scored token of the reference text, nats"),
        "quality_nll_tokens": (_INT, True, "tokens of the reference text scored (the engine's own tokenizer)"),
        "quality_bits_per_byte": (_F64, True, "NLL of the reference text in bits per UTF-8 byte (tokenizer-free)"),
        "quality_greedy_json": (_STR, True, "greedy continuations of the quality prompts, JSON list of texts"),
        "quality_method_version": (_INT, True, "version of the quality texts and method"),
    },
    # Serving under load (cellbench.serving defines every figure): a serve cell's load levels
    # are points of their own, swept or probed by the capacity search on one server start. Null
    # on rows that are not a load level (offline cells, older serve points).
    4: {
        "load_kind": (_STR, True, "concurrency (closed loop) | request_rate (open loop); null: not a load level"),
        "concurrency": (_INT, True, "closed-loop level: requests kept in flight"),
        "request_rate": (_F64, True, "open-loop level: requests sent per second (seeded gamma arrivals)"),
        "burstiness": (_F64, True, "open-loop level: gamma shape of the arrival gaps (1: Poisson)"),
        "load_phase": (_STR, True, "sweep (a level of the study) | search (a probe of the capacity search)"),
        "requests_measured": (_INT, True, "requests of the level's steady-state window (its figures)"),
        "requests_warmup": (_INT, True, "requests sent first at the level and left out of its figures"),
        "requests_failed": (_INT, True, "measured requests that failed (counted as missing the SLO)"),
        "slo_share": (_F64, True, "share of measured requests meeting every SLO budget; null: no SLO"),
        "goodput_rps": (_F64, True, "measured requests meeting the SLO per second of the window (vLLM's goodput)"),
        "ttft_p90_s": (_F64, True, "time to first token, 90th percentile"),
        "tpot_p90_s": (_F64, True, "time per output token after the first, 90th percentile"),
    },
    # The cell's prompts (cellbench.datasets states the contract), on every row of a file written
    # since: where they came from, and the lengths of the repeat's requests as the engine counted
    # them (a jsonl or shipped dataset's points have input_len and output_len 0: each request has
    # its own). Rows of older files: null ("not recorded"; their prompts were random tokens).
    5: {
        "dataset_kind": (_STR, True, "where the prompts came from: random | jsonl | shipped | shared_prefix"),
        "dataset_name": (_STR, True, "the shipped set's name or the prompt file's name; null for the others"),
        "dataset_sha256": (_STR, True, "sha256 of the prompt file (jsonl, shipped)"),
        "dataset_prefix_len": (_INT, True, "shared_prefix: tokens of the prefix the requests share"),
        "prompt_tokens_mean": (_F64, True, "prompt tokens of the repeat's requests, mean (the engine's count)"),
        "prompt_tokens_p50": (_F64, True, "prompt tokens of the repeat's requests, median"),
        "prompt_tokens_p90": (_F64, True, "prompt tokens of the repeat's requests, 90th percentile"),
        "output_tokens_mean": (_F64, True, "output tokens of the repeat's requests, mean"),
        "output_tokens_p50": (_F64, True, "output tokens of the repeat's requests, median"),
        "output_tokens_p90": (_F64, True, "output tokens of the repeat's requests, 90th percentile"),
    },
    # 6: {"new_metric_s": (_F64, True, "what it measures")},  <- how the next column comes in
}
# Columns holding JSON, and the JSON type of their value: import parses every cell of them.
JSON_COLUMNS = {"settings_json": dict, "effective_json": dict, "overrides_json": list, "findings_json": list,
                "versions_json": dict, "quality_greedy_json": list}  # fmt: skip


class SchemaError(ValueError):
    pass


def derive(history: dict) -> tuple[int, dict[str, tuple[pa.DataType, bool, str]], pa.Schema]:
    """(SCHEMA_VERSION, COLUMNS, SCHEMA) of a column history, checking its one rule."""
    if sorted(history) != list(range(1, len(history) + 1)):
        raise SchemaError(f"column history versions {sorted(history)} are not 1, 2, 3, ... in steps of one")
    columns: dict[str, tuple[pa.DataType, bool, str]] = {}
    for version, added in sorted(history.items()):
        for name, (typ, nullable, description) in added.items():
            if name in columns:
                raise SchemaError(f"column history: {name} added twice")
            if version > 1 and not nullable:
                raise SchemaError(f"column history: {name} (version {version}) must be nullable: older files lack it")
            columns[name] = (typ, nullable, description)
    version = max(history)
    schema = pa.schema(
        [pa.field(name, typ, nullable=nullable) for name, (typ, nullable, _) in columns.items()],
        metadata={"cellbench.schema_version": str(version)},
    )
    return version, columns, schema


SCHEMA_VERSION, COLUMNS, SCHEMA = derive(COLUMN_HISTORY)


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
    return rows_table(rows, SCHEMA)


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Python rows -> an Arrow table in `schema` (keys it lacks read as null, others are left
    out). Parsed as JSON lines by Arrow, not converted with pa.array, from_pylist or even
    Schema.empty_table: each of those makes pyarrow import pandas, a third of a second that every
    cell's run would pay for a few rows (metrics, telemetry, profile)."""
    lines = "".join(json.dumps({n: row.get(n) for n in schema.names}, default=_plain) + "\n" for row in rows).encode()
    if not lines:
        return pa.Table.from_batches([], schema=schema)
    table = pa_json.read_json(
        io.BytesIO(lines),
        read_options=pa_json.ReadOptions(block_size=len(lines)),  # a row must not straddle blocks
        parse_options=pa_json.ParseOptions(explicit_schema=schema),
    )
    # read_json gives the schema's names and types and refuses a null in a required field; the
    # fields' nullability and the schema's metadata are set here, not by a cast, which would
    # import pyarrow.compute (0.1 s that every cell would pay).
    return pa.Table.from_arrays(table.columns, schema=schema)


def _plain(value):
    """numpy scalars (from statistics over arrays) as the Python number they hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a metrics value")


def write_parquet(path: str | Path, table: pa.Table) -> None:
    atomic.write_with(path, lambda tmp: pq.write_table(table, tmp))


_POLARS_SCHEMA: list = [None, None]  # (SCHEMA, its polars schema): converting costs ms, scans ask often


def polars_schema() -> pl.Schema:
    """SCHEMA in polars' types."""
    import polars as pl

    if _POLARS_SCHEMA[0] is not SCHEMA:  # derived again if SCHEMA was replaced (tests grow the history)
        _POLARS_SCHEMA[:] = [SCHEMA, pl.from_arrow(SCHEMA.empty_table()).schema]
    return _POLARS_SCHEMA[1]


def stored_schema_version(file: pq.ParquetFile) -> str:
    """The schema version a Parquet file declares in its key-value metadata (where pyarrow and
    polars writers both keep ours), or "?"."""
    return (file.metadata.metadata or {}).get(b"cellbench.schema_version", b"?").decode(errors="replace")[:20]


def check_version(version) -> int:
    """A stored schema version this cellbench reads (1 .. SCHEMA_VERSION), as an int."""
    text = str(version)
    if not text.isascii() or not text.isdigit() or not 1 <= int(text[:6]) < 10**5:
        raise SchemaError(f"schema_version {text[:20]!r} is not a schema version")
    if int(text) > SCHEMA_VERSION:
        raise SchemaError(
            f"schema_version {int(text)} was written by a newer cellbench (this one reads up to "
            f"{SCHEMA_VERSION}); upgrade cellbench"
        )
    return int(text)


# Stored types a column may have besides its own: the three Arrow string layouts are one Parquet type.
_SAME_TYPE = {pa.string(): (pa.large_string(), pa.string_view())}


def check_file_schema(schema: pa.Schema, declared: str) -> int:
    """The columns of a stored file against the history: refuse a newer version, an unknown
    column, a required column missing, a column whose type is not the schema's (a number stored
    as a string would break every aggregate); missing nullable columns read as null."""
    version = check_version(declared)
    unknown = [name for name in schema.names if name not in COLUMNS]
    if unknown:
        raise SchemaError(f"column {unknown[0][:64]!r} is not in schema version {version} or any earlier one")
    if len(set(schema.names)) != len(schema.names):
        raise SchemaError("a column appears twice")
    missing = [name for name, (_, nullable, _) in COLUMNS.items() if not nullable and name not in schema.names]
    if missing:
        raise SchemaError(f"required column {missing[0]!r} is missing")
    for field in schema:
        want = COLUMNS[field.name][0]
        if field.type != want and field.type not in _SAME_TYPE.get(want, ()):
            raise SchemaError(f"column {field.name!r} is {field.type}, the schema says {want}")
    return version


MAX_JSON_DEPTH = 32  # the deepest JSON cellbench writes (a resolved cell) nests 4 levels
MAX_JSON_CELL = 1 << 20  # characters of one JSON cell; a resolved cell's settings are ~2 KB


def json_depth(value) -> int:
    """How many levels of containers a parsed JSON value nests (a scalar 0, [] 1), without recursion."""
    level, depth = [value], 0
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [v for item in containers for v in (item.values() if isinstance(item, dict) else item)]
    return depth


def parse_json_cell(text: str, kind: type) -> None:
    """Refuse a JSON cell that is not JSON, nests deeper than MAX_JSON_DEPTH or is not `kind`."""
    if len(text) > MAX_JSON_CELL:
        raise SchemaError(f"JSON of {len(text)} characters, more than {MAX_JSON_CELL}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise SchemaError(f"JSON nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as exc:
        raise SchemaError(f"not JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(value, kind):
        raise SchemaError(f"JSON {type(value).__name__}, expected a JSON {'object' if kind is dict else 'list'}")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise SchemaError(f"JSON nested deeper than {MAX_JSON_DEPTH}")


def decoded_bytes(batch: pa.RecordBatch) -> int:
    """Bytes the batch takes once its dictionary-encoded columns are decoded (counted from the
    dictionary's value lengths, without decoding: a 1 MiB string repeated 1,000 times is 1 GiB)."""
    import pyarrow.compute as pc  # here: a cell's run-cell never checks stored rows, and would pay 0.1 s

    total = 0
    for column in batch.columns:
        if pa.types.is_dictionary(column.type):
            lengths = pc.take(pc.binary_length(column.dictionary), column.indices)
            total += (pc.sum(lengths).as_py() or 0) + 8 * len(column)
        else:
            total += column.nbytes
    return total


def check_required(batch: pa.RecordBatch) -> None:
    for name in batch.schema.names:
        if not COLUMNS[name][1] and batch.column(name).null_count:
            raise SchemaError(f"column {name!r}: null in a required column")


def check_batch(batch: pa.RecordBatch) -> None:
    """The values of stored rows: valid UTF-8, required columns never null, a known status and
    schema version, every JSON cell parsed. What passes always aggregates."""
    import pyarrow.compute as pc

    try:
        batch.validate(full=True)  # invalid UTF-8 in a string column, offsets out of range
    except pa.ArrowException as exc:
        raise SchemaError(f"malformed column data ({str(exc).splitlines()[0][:120]})") from None
    check_required(batch)
    for name in batch.schema.names:
        column = batch.column(name)
        if name in JSON_COLUMNS:
            longest = pc.max(pc.binary_length(column)).as_py() or 0
            if longest > MAX_JSON_CELL:
                raise SchemaError(f"column {name!r}: JSON of {longest} bytes, more than {MAX_JSON_CELL}")
            for start in range(0, len(column), 16):  # a few cells at a time as Python strings
                for row, text in enumerate(column.slice(start, 16).to_pylist(), start):
                    if text is not None:
                        try:
                            parse_json_cell(text, JSON_COLUMNS[name])
                        except SchemaError as exc:
                            raise SchemaError(f"column {name!r} row {row}: {exc}") from None
    bad = set(batch.column("status").to_pylist()) - set(STATUSES)
    if bad:
        raise SchemaError(f"column 'status': {sorted(bad)[0][:40]!r} is not one of {', '.join(STATUSES)}")
    for version in set(batch.column("schema_version").to_pylist()):
        check_version(version)


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
    memory at once); rows of another schema version are refused, naming their file. A full
    aggregation: `cellbench aggregate` keeps a cache so that it reads only the files that changed
    (cellbench.rowcache, which this calls with no cache)."""
    from . import rowcache

    rowcache.combine(paths, out, None)


def _wrong_version(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Rows of a schema version this cellbench does not read (older ones it reads: their missing
    columns are null)."""
    import polars as pl

    version = pl.col("schema_version")
    return frame.filter(version.is_null() | (version < 1) | (version > SCHEMA_VERSION))


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
    try:
        check_version(version)
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from None


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
