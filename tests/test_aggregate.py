import json

import pandas as pd
import pyarrow as pa
import pytest
from cellbench import aggregate, report, tables


def _rows(cell, machine, batch, values, status="ok", effective=None, rounds=1):
    rows = []
    for round_, (repeat, value) in ((r, v) for r in range(1, rounds + 1) for v in enumerate(values)):
        rows.append(
            {
                "machine_id": machine, "cell_id": f"{cell}-h", "cell_name": cell, "batch_size": batch,
                "input_len": 128, "output_len": 64, "repeat": repeat, "status": status, "error": None,
                "output_tok_s": value, "latency_p50_s": 1.0, "ttft_p50_s": 0.1, "tpot_p50_s": 0.01,
                "study": "s", "engine": "vllm", "image": "cpu", "model": "m", "dtype": "bfloat16",
                "quantization": None, "effective_dtype": "bfloat16", "effective_quantization": None,
                "effective_eager": True, "effective_json": json.dumps(effective or {"dtype": "bfloat16"}),
                "load_s": 30.0, "peak_memory_mb": 1000.0, "device_name": "cpu", "schema_version": 1,
                "method_version": 1, "host_load_max": 0.5, "round": round_,
            }
        )  # fmt: skip
    return rows


@pytest.fixture
def rows():
    data = (
        # Three rounds alike on m1: intervals of width 0, so every difference there is significant.
        _rows("base", "m1", 1, [10.0, 10.0], rounds=3)
        + _rows("fast", "m1", 1, [19.0, 21.0], rounds=3)
        + _rows("base", "m1", 8, [80.0, 80.0], rounds=3)
        + _rows("fast", "m1", 8, [40.0, 40.0], rounds=3)
        + _rows("base", "m2", 1, [5.0])
        + _rows("fast", "m2", 1, [None], status="failed")
    )
    return pd.DataFrame(data)


def test_spread_and_ratio_to_baseline_on_the_same_machine(rows):
    points = aggregate.cell_points(rows, "base-h").set_index(["machine_id", "cell_name", "batch_size"])
    fast = points.loc[("m1", "fast", 1)]
    assert fast["output_tok_s"] == 20.0
    assert (fast["output_tok_s_min"], fast["output_tok_s_max"]) == (19.0, 21.0)
    assert fast["output_tok_s_cv"] == pytest.approx(0.05)  # population std 1 / mean 20
    assert fast["vs_baseline"] == pytest.approx(2.0)
    assert points.loc[("m1", "fast", 8)]["vs_baseline"] == pytest.approx(0.5)
    assert points.loc[("m2", "base", 1)]["vs_baseline"] == 1.0  # m2's own baseline, not m1's
    failed = points.loc[("m2", "fast", 1)]
    assert failed["status"] == "failed" and failed["repeats"] == 0 and pd.isna(failed["vs_baseline"])


def test_cv_flag_marks_noisy_points(rows):
    rows.loc[(rows["cell_name"] == "fast") & (rows["batch_size"] == 1) & (rows["repeat"] == 1), "output_tok_s"] = 30.0
    points = aggregate.cell_points(rows, "base-h").set_index(["machine_id", "cell_name", "batch_size"])
    assert bool(points.loc[("m1", "fast", 1)]["cv_flag"])
    assert not bool(points.loc[("m1", "base", 1)]["cv_flag"])


def test_fastest_per_point_names_winner_and_margin(rows):
    fastest = aggregate.fastest_per_point(aggregate.cell_points(rows, "base-h")).set_index(["machine_id", "batch_size"])
    assert fastest.loc[("m1", 1), "fastest"] == "fast"
    assert fastest.loc[("m1", 1), "margin"] == pytest.approx(2.0)
    assert fastest.loc[("m1", 8), "fastest"] == "base"
    assert pd.isna(fastest.loc[("m2", 1), "runner_up"])  # the other cell failed


def test_markdown_answers_which_is_fastest(rows, tmp_path):
    points = aggregate.cell_points(rows, "base-h")
    written = report.write_tables(points, "s", "base", tmp_path)
    text = written[0].read_text()
    assert "| m1 | 1 × 128→64 | **fast** | 20.0 | 2.00× | 2.00× [2.00, 2.00] base |" in text
    # m2 measured one round of one ok cell: no comparison there, so nothing to withhold.
    assert "withheld" not in text and "| m2 | 1 × 128→64 | **base** | 5.0 | 1.00× | only cell |" in text
    assert "## Cells that did not finish" in text
    assert pd.read_csv(written[1]).shape[0] == len(points)


def test_a_long_table_lists_the_first_rows_and_says_where_the_rest_are(rows, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "LISTED_ROWS", 3)
    points = aggregate.cell_points(rows, "base-h")
    assert len(points) > 3
    text = report.write_tables(points, "s", "base", tmp_path)[0].read_text()
    every = text.split("## Every cell and point")[1].split("\n\n")[1]
    assert len(every.splitlines()) == 2 + 3  # header, rule, three rows
    assert f"The first 3 of {len(points)} cell points; all are in `summary.csv`." in text
    assert pd.read_csv(tmp_path / "summary.csv").shape[0] == len(points)


def test_describe_effective():
    text = aggregate.describe_effective(json.dumps({"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}))
    assert text == "float32, eager, max_num_seqs=8"
    compiled = {"dtype": "bfloat16", "enforce_eager": False, "compilation_mode": "DYNAMO_TRACE_ONCE"}
    assert aggregate.describe_effective(json.dumps(compiled)) == "bfloat16, compile=DYNAMO_TRACE_ONCE"
    assert aggregate.describe_effective(None) == "engine did not start"


def test_busy_host_is_called_out(rows):
    rows.loc[rows["cell_name"] == "fast", "host_load_max"] = 9.0
    cells = aggregate.cell_points(rows, "base-h").drop_duplicates(["machine_id", "cell_id"])
    assert report.busy_cells(cells, cores=2) == ["fast"]
    assert report.busy_cells(cells, cores=16) == []


def test_arrow_rows_as_the_cli_reads_them_give_the_same_points(rows):
    """cli aggregate hands cell_points the Arrow table it read; tests hand it pandas rows."""
    for column in ("itl_p50_s", "itl_p99_s", "ttft_p99_s", "tpot_p99_s"):
        rows[column] = 0.01
    rows["settings_json"] = "{}"
    from_arrow = aggregate.cell_points(pa.Table.from_pandas(rows, preserve_index=False), "base-h")
    pd.testing.assert_frame_equal(from_arrow, aggregate.cell_points(rows, "base-h"))
    assert report.serving_markdown(from_arrow)[1].startswith("## Serving latency")


def test_round_dicts_of_the_columns_as_cell_points_holds_them():
    import numpy as np

    numbers = [np.array([1, 2]), np.array([3]), np.array([], dtype=np.int64)]
    means = [np.array([10.0, 11.0]), np.array([5.5]), np.array([], dtype=np.float64)]
    assert aggregate._round_dicts(numbers, means) == [{1: 10.0, 2: 11.0}, {3: 5.5}, {}]
    # Anything else (a missing value): row by row, as round_dict reads it.
    assert aggregate._round_dicts([np.array([1]), None], [np.array([2.0]), None]) == [{1: 2.0}, {}]
    assert aggregate._round_dicts([], []) == []


def _polars_points(rows):
    """cell_points' table in polars (finish's as_polars), and the pandas one it gives."""
    import polars as pl
    from cellbench import config, quality

    settings = config.statistics({"statistics": {}})
    frame = aggregate.prepared(rows)
    flags = aggregate.flags_of(aggregate.round_table(frame), settings)
    parts = pl.collect_all(aggregate.cell_parts(frame, flags, settings))
    table = aggregate.finish(*parts, "base-h", settings, quality.tolerance({}), as_polars=True)
    return table, aggregate.to_pandas(table)


def test_fastest_from_the_polars_points_is_the_pandas_one(rows):
    """A capacity probe, an integer column with nulls (pandas: floats), a failed point and
    several rounds: the groups and values taken from polars give the same frame."""
    rows = pd.concat([rows, pd.DataFrame(_rows("slow", "m1", 1, [9.0, 9.5], rounds=3))])
    rows["load_phase"] = None
    rows.loc[(rows["cell_name"] == "slow") & (rows["round"] == 3), "load_phase"] = "search"
    table, points = _polars_points(rows)
    assert points["rounds"].isna().any() and points["rounds"].dtype == float
    expected = aggregate.fastest_per_point(points)
    pd.testing.assert_frame_equal(aggregate.fastest_per_point(points, table=table), expected)
    assert len(expected) == 3 and set(expected["cells"]) == {1, 2}


def test_csv_from_the_polars_points_is_the_pandas_ones(rows):
    import polars as pl

    rows = pd.concat([rows, pd.DataFrame(_rows("odd", "m1", None, [float("nan")]))])
    table, points = _polars_points(rows)
    dropped = ["effective_json", *aggregate.LIST_COLUMNS]
    assert report.csv_text(table.drop(dropped)) == report.csv_text(points.drop(columns=dropped))
    frame = pl.DataFrame({"n": [1, None], "u": pl.Series([1, 2], dtype=pl.UInt32), "f": [float("nan"), 1.5]})
    assert report.csv_text(frame) == report.csv_text(frame.to_pandas()) == "n,u,f\n1.0,1,\n,2,1.5\n"
