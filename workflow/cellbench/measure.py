"""From what a container recorded (raw.json) to Parquet rows: pure functions.

Metric definitions follow vLLM's benchmarks: throughput = tokens / wall seconds of the point,
TPOT = (latency - TTFT) / (output tokens - 1), percentiles with linear interpolation.
"""

from __future__ import annotations

import itertools
import json
import math
import re

from . import config, contract, devices, metrics, quality_texts, serving

# (pattern in the engine log or error, status): a cell asked for what the engine cannot do.
UNSUPPORTED = [
    re.compile(r"cpu_gemm_wna16"),
    re.compile(r"Unknown quantization method", re.IGNORECASE),
    re.compile(r"quantization method .* is not supported", re.IGNORECASE),
    re.compile(r"not supported (on|for) (the )?(current platform|CPU|this device)", re.IGNORECASE),
]
_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception)|AssertionError)\b.*", re.MULTILINE)


def points(sweep: dict) -> list[dict]:
    """The sweep's points in a fixed order: batch size x input len x output len."""
    return [
        dict(zip(metrics.POINT, point, strict=True)) for point in itertools.product(*(sweep[k] for k in metrics.POINT))
    ]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100] (cellbench.serving's)."""
    return serving.percentile(values, q)


def tpot(request: dict) -> float | None:
    return serving.tpot(request.get("latency_s"), request.get("ttft_s"), request["output_tokens"])


def streamed_timings(request: dict) -> dict:
    """TTFT, E2E latency and inter-token latencies of a streamed request, vLLM's way
    (cellbench.serving.request_timings): `send_s` is when the client sent it and `chunk_s` when
    each streamed chunk that carried output arrived, relative to the start of the point."""
    timed = serving.request_timings(request)
    return {**request, "ttft_s": timed["ttft_s"], "latency_s": timed["e2e_s"], "itl_s": timed["itl_s"]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def point_metrics(point: dict) -> dict:
    """Throughput and latency figures of one measured repeat."""
    requests, wall = point["requests"], point["wall_s"]
    requests = [streamed_timings(r) if "chunk_s" in r else r for r in requests]
    prompt_tokens = sum(r["prompt_tokens"] for r in requests)
    output_tokens = sum(r["output_tokens"] for r in requests)
    latencies = [r["latency_s"] for r in requests]
    ttfts = [r["ttft_s"] for r in requests]
    tpots = [tpot(r) for r in requests]
    # Inter-token latencies of all requests of the point together (only streamed requests have them).
    itls = [gap for r in requests for gap in r.get("itl_s", [])]
    return {
        "duration_s": wall,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall,
        "total_tok_s": (prompt_tokens + output_tokens) / wall,
        "requests_s": len(requests) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "ttft_mean_s": _mean(ttfts),
        "tpot_mean_s": _mean(tpots),
        "itl_mean_s": _mean(itls),
        "itl_p50_s": percentile(itls, 50),
        "itl_p90_s": percentile(itls, 90),
        "itl_p99_s": percentile(itls, 99),
    }


def error_from_log(log_text: str) -> str | None:
    """The most telling error line of an engine log: a known signature, else the last exception."""
    for pattern in UNSUPPORTED:
        match = pattern.search(log_text)
        if match:
            line_start = log_text.rfind("\n", 0, match.start()) + 1
            line_end = log_text.find("\n", match.end())
            return log_text[line_start : line_end if line_end >= 0 else None].strip()[:500]
    lines = [m.group(0).strip() for m in _ERROR_LINE.finditer(log_text)]
    return lines[-1][:500] if lines else None


def classify(status: str, error: str | None) -> str:
    if status == "failed" and error and any(p.search(error) for p in UNSUPPORTED):
        return "unsupported"
    return status


def _device_name(device: str, container: dict) -> str | None:
    if device == "cpu":
        return container.get("cpu", {}).get("cpu_model")
    return devices.gpu_summary(container.get("gpu", {})).get("device_name")


def rows_for_cell(cell: dict, raw: dict | None, context: dict, *, status: str, error: str | None) -> list[dict]:
    """One row per measured repeat; every point short of its repeats gets one more row with the
    cell's failure status, so a failed or timed-out cell is rows, never a missing file."""
    raw = raw or {}
    effective = raw.get("effective") or {}
    status = classify(status, error)
    base = {
        "schema_version": metrics.SCHEMA_VERSION,
        "method_version": metrics.METHOD_VERSION,
        "study": context["study"],
        "cell_id": cell["id"],
        "cell_name": cell["name"],
        "machine_id": context["machine_id"],
        "run_id": context["run_id"],
        "engine": cell["engine"],
        "engine_version": _engine_version(cell["engine"], raw),
        "image": cell["image"],
        "image_id": context.get("image_id"),
        "device": cell["device"],
        "device_name": _device_name(cell["device"], raw.get("provenance", {})),
        "device_arch": None
        if cell["device"] == "cpu"
        else devices.gpu_summary(raw.get("provenance", {}).get("gpu", {})).get("arch"),
        "model": cell["model"],
        "mode": cell["mode"],
        "dtype": cell["dtype"],
        "quantization": cell["quantization"],
        "effective_dtype": effective.get("dtype"),
        "effective_quantization": effective.get("quantization"),
        "effective_eager": _effective_eager(effective),
        "load_s": raw.get("load_s"),
        "peak_memory_mb": raw.get("peak_memory_mb"),
        "started_at": raw.get("started_at"),
        "finished_at": raw.get("finished_at"),
        "config_hash": context["config_hash"],
        "git_sha": context.get("git_sha"),
        "settings_json": json.dumps(cell, sort_keys=True),
        "effective_json": json.dumps(effective, sort_keys=True) if effective else None,
        "host_load_max": context.get("host_load_max"),
        "round": context.get("round"),
        "versions_json": json.dumps(raw["provenance"]["versions"], sort_keys=True)
        if raw.get("provenance", {}).get("versions")
        else None,
        **canary_columns(raw.get("canary")),
        **quality_columns(cell, raw, context.get("round")),
    }
    rows = []
    measured: dict[tuple, int] = {}
    for point in raw.get("points", []):
        key = tuple(point[k] for k in metrics.POINT)
        measured[key] = measured.get(key, 0) + 1
        rows.append(
            {
                **base,
                **{k: point[k] for k in (*metrics.POINT, "repeat")},
                **point_metrics(point),
                "host_foreign_cpu": point.get("host_foreign_cpu"),
                "host_steal_cpu": point.get("host_steal_cpu"),
                "status": "ok",
                "error": None,
            }
        )
    for point in points(cell["sweep"]):
        key = tuple(point[k] for k in metrics.POINT)
        if measured.get(key, 0) >= cell["sweep"]["repeats"]:
            continue
        rows.append(
            {
                **base,
                **point,
                "repeat": None,
                "status": status if status != "ok" else "failed",
                "error": error or "point was not measured",
            }
        )
    return rows


QUALITY_COLUMNS = ("quality_status", "quality_error", "quality_s", "quality_nll", "quality_nll_tokens",
                   "quality_bits_per_byte", "quality_greedy_json", "quality_method_version")  # fmt: skip


def quality_columns(cell: dict, raw: dict, round: int | None) -> dict:
    """The quality step's columns (contract: cellbench.quality_texts), for every row of the round
    that measured it; null on other rounds ("not measured", never 0)."""
    columns = dict.fromkeys(QUALITY_COLUMNS)
    quality = cell.get("quality", False)  # settings of cells resolved before quality existed lack it
    if round != quality_texts.MEASURED_ROUND:
        return columns
    if not quality:
        return {**columns, "quality_status": "off"}
    found = raw.get("quality")
    if not isinstance(found, dict):
        # The container ended (failed, timed out) before its quality step: measured nothing.
        why = raw.get("error") or "the container ended before it"
        return {**columns, "quality_status": "failed", "quality_error": f"quality step not reached: {why}"[:500],
                "quality_method_version": quality_texts.QUALITY_METHOD_VERSION}  # fmt: skip
    status = found.get("status") if found.get("status") in ("ok", "failed", "unsupported") else "failed"
    columns.update(
        quality_status=status,
        quality_error=found.get("error") if status != "ok" else None,
        quality_s=found.get("seconds"),
        quality_method_version=quality_texts.QUALITY_METHOD_VERSION,
    )
    figures = (found.get("nll_sum"), found.get("nll_tokens"), found.get("greedy"))
    if status == "ok" and not (
        isinstance(figures[0], int | float) and config.is_int(figures[1]) and figures[1] > 0
        and isinstance(figures[2], list) and all(isinstance(text, str) for text in figures[2])
    ):  # fmt: skip
        status = "failed"
        columns.update(quality_status=status, quality_error="the quality step reported ok without its figures")
    if status == "ok":
        nll_sum, tokens = found["nll_sum"], found["nll_tokens"]
        scored_bytes = quality_texts.reference_bytes(
            quality_texts.split_chunks(quality_texts.load_reference(), quality["chunk_chars"])
        )
        columns.update(
            quality_nll=nll_sum / tokens,
            quality_nll_tokens=tokens,
            quality_bits_per_byte=nll_sum / math.log(2) / scored_bytes,
            quality_greedy_json=json.dumps(found["greedy"]),
        )
    return columns


def canary_columns(canary: dict | None) -> dict:
    """The host canary's figures as columns (null where it did not run or had no numpy)."""
    canary = canary or {}
    return {
        f"canary_{key}": canary.get(key) if isinstance(canary.get(key), int | float) else None
        for key in ("matmul_1t_gflops", "matmul_all_gflops", "memcpy_gb_s")
    }


def _engine_version(engine: str, raw: dict) -> str | None:
    """The version of the first of the engine's declared packages that the image has."""
    found = raw.get("provenance", {}).get("versions", {})
    declared = contract.ENGINES[engine].packages if engine in contract.ENGINES else (engine,)
    return next((found[p] for p in declared if found.get(p)), None)


def _effective_eager(effective: dict) -> bool | None:
    if not effective:
        return None
    return bool(effective.get("enforce_eager")) or effective.get("compilation_mode") in (
        "0",
        "NONE",
        "CompilationMode.NONE",
    )
