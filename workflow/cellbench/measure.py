"""From what a container recorded (raw.json) to Parquet rows: pure functions.

Metric definitions follow vLLM's benchmarks: throughput = tokens / wall seconds of the point,
TPOT = (latency - TTFT) / (output tokens - 1), percentiles with linear interpolation.
"""

from __future__ import annotations

import itertools
import json
import math
import re

from . import config, contract, datasets, devices, metrics, quality_texts, serving

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
        **dataset_columns(cell),
    }
    rows = []
    measured: dict[tuple, int] = {}
    slo = serving.settings(cell.get("serve"))["slo"]
    for point in raw.get("points", []):
        key = point_key(point)
        measured[key] = measured.get(key, 0) + 1
        figures = level_columns(point, slo) if point.get("load_kind") else point_metrics(point)
        failed = point.get("load_kind") and not figures["requests_s"]
        rows.append(
            {
                **base,
                **{k: point[k] for k in (*metrics.POINT, "repeat")},
                **{k: point.get(k) for k in metrics.LOAD},
                **figures,
                **request_lengths(point["requests"]),
                "host_foreign_cpu": point.get("host_foreign_cpu"),
                "host_steal_cpu": point.get("host_steal_cpu"),
                "status": "failed" if failed else "ok",
                "error": level_error(point) if failed else None,
            }
        )
    for point in planned_points(cell):
        if measured.get(point_key(point), 0) >= cell["sweep"]["repeats"]:
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
    rows += search_rows(cell, raw, base, status, error)
    return rows


def point_key(point: dict) -> tuple:
    """What names a point of a round: the sweep point and, for a load level, the level."""
    return tuple(point.get(k) for k in (*metrics.POINT, *metrics.LOAD))


def planned_points(cell: dict) -> list[dict]:
    """Every point a round of the cell must measure: the sweep's points; for a serve cell with
    load levels, each sweep point (input x output length) at each swept level, its batch_size the
    level's concurrency (0 for a request rate: an open loop has no fixed batch). The capacity
    search's probes are not known in advance (search_rows)."""
    if cell.get("mode") != "serve" or not serving.has_levels(cell.get("serve")):
        return points(cell["sweep"])
    planned = []
    for point in points(cell["sweep"]):
        for load in serving.sweep_levels(cell["serve"]):
            planned.append({**point, "batch_size": load["concurrency"] or 0, **load})
    return planned


def level_columns(point: dict, slo: dict) -> dict:
    """A load level's row figures over its steady-state window (cellbench.serving.level_figures)."""
    figures = serving.level_figures(point["requests"], point["warmup_requests"], point["measured_requests"], slo)

    def seconds(name: str, stat: str) -> float | None:
        value = figures[f"{stat}_{name}_ms"]
        return None if value is None else value / 1000

    return {
        "duration_s": figures["duration"],
        "output_tokens": figures["total_output_tokens"],
        "output_tok_s": figures["output_throughput"],
        "total_tok_s": figures["total_token_throughput"],
        "requests_s": figures["request_throughput"],
        **{f"latency_{q}_s": seconds("e2el", q) for q in ("p50", "p90", "p99")},
        **{f"ttft_{q}_s": seconds("ttft", q) for q in ("p50", "p90", "p99")},
        **{f"tpot_{q}_s": seconds("tpot", q) for q in ("p50", "p90", "p99")},
        **{f"itl_{q}_s": seconds("itl", q) for q in ("p50", "p90", "p99")},
        "ttft_mean_s": seconds("ttft", "mean"),
        "tpot_mean_s": seconds("tpot", "mean"),
        "itl_mean_s": seconds("itl", "mean"),
        "requests_measured": figures["requests_measured"],
        "requests_warmup": figures["requests_warmup"],
        "requests_failed": figures["failed"],
        "slo_share": figures["slo_share"],
        "goodput_rps": figures["request_goodput"],
    }


def bench_serve_results(cell: dict, raw: dict | None, context: dict) -> list[tuple[str, dict]]:
    """(name, result) of every load level of a round, in the shape `vllm bench serve
    --save-result` writes (vllm/benchmarks/serve.py, main and benchmark), figures over the level's
    measured requests: a closed-loop level is vLLM's `--request-rate inf --max-concurrency C`.
    Per-request lists hold the measured requests (times in s; failed ones 0, as vLLM's)."""
    found = []
    slo = serving.settings(cell.get("serve"))["slo"]
    for point in (raw or {}).get("points", []):
        if not point.get("load_kind"):
            continue
        figures = serving.level_figures(point["requests"], point["warmup_requests"], point["measured_requests"], slo)
        _, sample, _ = serving.split(point["requests"], point["warmup_requests"], point["measured_requests"])
        timed = [serving.request_timings(r) for r in sample]
        closed = point["load_kind"] == "concurrency"
        result = {
            "date": (raw or {}).get("started_at"),
            "endpoint_type": "vllm",
            "backend": "vllm",
            "label": cell["name"],
            "model_id": cell["model"],
            "tokenizer_id": cell["model"],
            "num_prompts": figures["requests_measured"],
            "request_rate": "inf" if closed else point["request_rate"],
            "burstiness": 1.0 if closed else point["burstiness"],
            "max_concurrency": point["concurrency"] if closed else None,
            **{k: v for k, v in figures.items() if k not in ("good", "slo_share", "first_error",
                                                               "requests_warmup", "requests_measured")},
            "input_lens": [r.get("prompt_tokens") or 0 for r in sample],
            "output_lens": [r.get("output_tokens") or 0 if t["ok"] else 0 for r, t in zip(sample, timed, strict=True)],
            "ttfts": [t["ttft_s"] or 0.0 for t in timed],
            "itls": [t["itl_s"] for t in timed],
            "latencies": [t["e2e_s"] or 0.0 for t in timed],
            "start_times": [r.get("send_s") for r in sample],
            "errors": [r.get("error") or "" for r in sample],
            # What vLLM's file has no key for: where the level comes from and how it was measured.
            "cellbench": {
                "cell_id": cell["id"], "round": context.get("round"), "machine_id": context.get("machine_id"),
                "run_id": context.get("run_id"), "load_phase": point["load_phase"], "repeat": point["repeat"],
                "input_len": point["input_len"], "output_len": point["output_len"],
                "requests_warmup": figures["requests_warmup"], "requests_measured": figures["requests_measured"],
                "slo": slo or None, "slo_share": figures["slo_share"],
                "definitions": "cellbench.serving (steady-state window: warm-up and cool-down requests excluded)",
            },
        }  # fmt: skip
        found.append((serving.result_name(point), result))
    return found


def level_error(point: dict) -> str:
    """Why a level has no figures: none of its measured requests completed."""
    errors = [r["error"] for r in point.get("requests", []) if r.get("error")]
    why = f": {errors[0]}" if errors else ""
    return f"every measured request of the level failed{why}"[:500]


def search_rows(cell: dict, raw: dict, base: dict, status: str, error: str | None) -> list[dict]:
    """A failed row for a capacity search that did not finish (its probes are rows already)."""
    search = serving.settings(cell.get("serve"))["search"] if cell.get("mode") == "serve" else None
    if not search or (raw.get("search") or {}).get("done"):
        return []
    rows = []
    for point in points(cell["sweep"]):
        load = {**dict.fromkeys(metrics.LOAD), "load_kind": search["metric"], "load_phase": "search"}
        rows.append({**base, **point, "batch_size": 0, **load, "repeat": None,
                     "status": status if status != "ok" else "failed",
                     "error": error or "the capacity search did not finish"})  # fmt: skip
    return rows


def dataset_columns(cell: dict) -> dict:
    """Where the cell's prompts came from (cellbench.datasets); cells resolved before datasets
    existed sent random prompts."""
    dataset = cell.get("dataset") or datasets.DEFAULT
    return {
        "dataset_kind": dataset["kind"],
        "dataset_name": datasets.label(dataset),
        "dataset_sha256": dataset.get("sha256"),
        "dataset_prefix_len": dataset.get("prefix_len"),
    }


def request_lengths(requests: list[dict]) -> dict:
    """Mean, median and 90th percentile of the prompt and output tokens of a repeat's requests."""
    columns = {}
    for name in ("prompt_tokens", "output_tokens"):
        values = [r[name] for r in requests if r.get(name) is not None]
        columns.update({f"{name}_mean": _mean(values), f"{name}_p50": percentile(values, 50),
                        f"{name}_p90": percentile(values, 90)})  # fmt: skip
    return columns


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
