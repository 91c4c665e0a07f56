"""Serving under load, defined once: request timings, load levels, SLOs, goodput, capacity search.

Standard library only: the host imports it as `cellbench.serving` and the engine container runs
it as `serving` beside scripts/bench_cell.py (mounted read-only at contract.MOUNT_CONTRACT), so
the client that drives a load level and the host that turns its timestamps into rows read the
same definitions.

The figures follow vLLM's serving benchmark, `vllm bench serve` (vllm/benchmarks/serve.py:
calculate_metrics and get_request; vllm/benchmarks/lib/endpoint_request_func.py:
async_request_openai_completions; https://github.com/vllm-project/vllm, as shipped in vllm
0.32.0):

- TTFT = first streamed chunk - send; E2EL = last streamed chunk - send; ITL = the gaps between
  consecutive chunks (a chunk holding several tokens is one gap).
- TPOT = (E2EL - TTFT) / (output tokens - 1), output tokens from the server's usage record;
  requests of one output token have no TPOT in its statistics and count as TPOT 0 for goodput.
- A request meets the SLO when every budget given holds, `value <= budget` (vLLM's `--goodput
  ttft:MS tpot:MS e2el:MS`); goodput = requests meeting it / duration, request throughput =
  completed requests / duration, token throughputs = tokens / duration.
- Open-loop arrivals: gaps drawn from a gamma distribution of shape = burstiness and scale =
  1 / (rate x burstiness), i.e. mean 1 / rate; burstiness 1 is a Poisson process.
- Percentiles with linear interpolation (numpy's default, which vLLM uses); std is the
  population standard deviation (np.std).

Where cellbench differs, on purpose: vLLM measures every request it sends, from the first send
to the last answer. cellbench runs a load level as warm-up requests, then measured requests,
then cool-down requests that keep the load on until the last measured one finished (steady
state: the measured requests neither start on an idle server nor finish on a draining one), and
takes the duration over the measured requests only: first measured send to last measured end.
"""

from __future__ import annotations

import itertools
import math
import random

# The budgets a study may give (serve.slo) -> the request timing each one bounds.
SLO_TIMINGS = {"ttft_ms": "ttft_s", "tpot_ms": "tpot_s", "e2e_ms": "e2e_s"}
SLO_WORDS = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E"}
LOAD_KINDS = ("concurrency", "request_rate")
PHASES = ("sweep", "search")
UNITS = {"concurrency": "concurrent", "request_rate": "req/s"}
# Defaults of serve.* (kept out of a cell's settings, so cell ids change only when set).
REQUESTS_PER_LEVEL = 8
BURSTINESS = 1.0
SLO_SHARE = 0.9


def settings(serve: dict | None) -> dict:
    """A cell's `serve` object with every default of the load settings filled in."""
    serve = dict(serve or {})
    search = serve.get("search")
    rates = serve.get("request_rate")
    return {
        "concurrency": list(serve.get("concurrency") or []),
        # A scalar request_rate is the older setting (a point's batch_size requests at that
        # rate): not a level list.
        "request_rate": list(rates) if isinstance(rates, list) else [],
        "burstiness": serve.get("burstiness", BURSTINESS),
        "requests_per_level": serve.get("requests_per_level", REQUESTS_PER_LEVEL),
        "warmup_requests": serve.get("warmup_requests"),
        "slo": dict(serve.get("slo") or {}),
        "search": None if not search else {"slo_share": SLO_SHARE, **search},
    }


def has_levels(serve: dict | None) -> bool:
    """Whether a serve cell measures load levels (else: the older one batch per point)."""
    found = settings(serve)
    return bool(found["concurrency"] or found["request_rate"] or found["search"])


def most_in_flight(serve: dict | None, batch_sizes: list[int]) -> int:
    """The most requests a cell sends at once by its own count: its largest batch, concurrency
    level, or concurrency search bound (a request-rate level's in-flight count is the server's
    doing). A llama-server cell gets this many parallel slots unless it sets its own."""
    found = settings(serve)
    sizes = [*batch_sizes, *found["concurrency"]]
    if found["search"] and found["search"].get("metric") == "concurrency":
        sizes.append(int(found["search"]["high"]))
    return max([1, *(int(size) for size in sizes)])


def sweep_levels(serve: dict | None) -> list[dict]:
    """The swept load levels of a cell in the order they run: concurrencies, then rates."""
    found = settings(serve)
    levels = [level("concurrency", c, "sweep") for c in found["concurrency"]]
    levels += [level("request_rate", r, "sweep", found["burstiness"]) for r in found["request_rate"]]
    return levels


def level(kind: str, value, phase: str, burstiness: float | None = None) -> dict:
    """One load level as raw.json and the rows name it."""
    if kind == "concurrency":
        return {"load_kind": kind, "concurrency": int(value), "request_rate": None, "burstiness": None,
                "load_phase": phase}  # fmt: skip
    return {"load_kind": kind, "concurrency": None, "request_rate": float(value),
            "burstiness": BURSTINESS if burstiness is None else float(burstiness), "load_phase": phase}  # fmt: skip


def load_value(load: dict):
    """The level's load: its concurrency or its request rate."""
    return load["concurrency"] if load["load_kind"] == "concurrency" else load["request_rate"]


def result_name(point: dict) -> str:
    """A level's file name stem: 'sweep-concurrency-4-128x64-repeat0'."""
    return (f"{point['load_phase']}-{point['load_kind']}-{load_value(point):g}-{point['input_len']}x"
            f"{point['output_len']}-repeat{point['repeat']}")  # fmt: skip


def label(load: dict) -> str:
    """'concurrency 4', 'rate 2.5 req/s', 'rate 2.5 req/s (burstiness 0.5)', '… (search)'."""
    if load["load_kind"] == "concurrency":
        text = f"concurrency {load['concurrency']}"
    else:
        text = f"rate {load['request_rate']:g} req/s"
        if load.get("burstiness") not in (None, 1.0):
            text += f" (burstiness {load['burstiness']:g})"
    return text + (" (search)" if load.get("load_phase") == "search" else "")


# ---------------------------------------------------------------------------------------------
# How many requests a level sends


def in_flight(load: dict, latency_s: float | None) -> int:
    """Requests a level keeps in flight: its concurrency (closed loop), or for a rate the
    requests that arrive during one request's latency (Little's law: rate x latency), at least 1.
    `latency_s` is the median E2E latency of the cell's unloaded warm-up requests."""
    if load["load_kind"] == "concurrency":
        return load["concurrency"]
    return max(1, math.ceil(load["request_rate"] * (latency_s or 0.0)))


def plan(load: dict, requests_per_level: int, warmup_requests: int | None, latency_s: float | None) -> dict:
    """{"warmup": W, "measured": M} of a level: M = k x the requests in flight (k =
    requests_per_level), so each level measures k "waves" whatever its load; W = one wave
    unless the study fixes warmup_requests."""
    wave = in_flight(load, latency_s)
    return {"warmup": wave if warmup_requests is None else warmup_requests, "measured": requests_per_level * wave}


def arrival_gaps(rate: float, burstiness: float, rng: random.Random):
    """Endless seconds between open-loop arrivals: gamma(shape = burstiness, scale = 1 / (rate x
    burstiness)), as vLLM's get_request draws them (exponential, i.e. Poisson, at burstiness 1)."""
    scale = 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale)


# ---------------------------------------------------------------------------------------------
# Per-request timings


def tpot(e2e_s: float | None, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """(E2E - TTFT) / (output tokens - 1); None for fewer than 2 tokens or a missing timing."""
    if e2e_s is None or ttft_s is None or not output_tokens or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def request_timings(request: dict) -> dict:
    """TTFT, E2E latency, ITLs and TPOT of one streamed request, from the send time (`send_s`)
    and the arrival of each chunk that carried output (`chunk_s`), seconds from any one origin.
    A request that failed (`error`) or streamed nothing has no timings (`ok` False)."""
    chunks = request.get("chunk_s") or []
    if request.get("error") or not chunks or request.get("send_s") is None:
        return {"ok": False, "ttft_s": None, "e2e_s": None, "itl_s": [], "tpot_s": None}
    send = request["send_s"]
    ttft, e2e = chunks[0] - send, chunks[-1] - send
    return {
        "ok": True,
        "ttft_s": ttft,
        "e2e_s": e2e,
        "itl_s": [later - earlier for earlier, later in itertools.pairwise(chunks)],
        "tpot_s": tpot(e2e, ttft, request.get("output_tokens")),
    }


def meets_slo(timings: dict, slo: dict) -> bool:
    """Whether a request met every budget of `slo` ({ttft_ms, tpot_ms, e2e_ms}, any subset):
    vLLM's `value <= budget`; a failed request never does; TPOT of a one-token answer is 0."""
    if not timings["ok"]:
        return False
    for key, budget in slo.items():
        value = timings[SLO_TIMINGS[key]]
        if key == "tpot_ms" and value is None:
            value = 0.0
        if value is None or value > budget / 1000:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; None without values."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    rank = (len(values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def std(values: list[float]) -> float | None:
    """Population standard deviation (np.std)."""
    centre = mean(values)
    if centre is None:
        return None
    values = [v for v in values if v is not None]
    return math.sqrt(sum((v - centre) ** 2 for v in values) / len(values))


# ---------------------------------------------------------------------------------------------
# A level: its steady-state window and its figures


def split(requests: list[dict], warmup: int, measured: int) -> tuple[list, list, list]:
    """(warm-up, measured, cool-down) requests of a level recorded in send order: the first
    `warmup` sent, the next `measured`, and whatever was sent after them to keep the load on."""
    return requests[:warmup], requests[warmup : warmup + measured], requests[warmup + measured :]


def window(measured: list[dict]) -> tuple[float, float] | None:
    """(start, end) of the steady-state window: the first measured request's send to the last
    measured request's end (its last chunk, or when it failed); None without a measured send."""
    sends = [r["send_s"] for r in measured if r.get("send_s") is not None]
    if not sends:
        return None
    ends = [_end(r) for r in measured if _end(r) is not None]
    start = min(sends)
    return start, max([start, *ends])


def _end(request: dict) -> float | None:
    if request.get("chunk_s") and not request.get("error"):
        return request["chunk_s"][-1]
    return request.get("end_s")


PERCENTILES = (50, 90, 99)


def level_figures(requests: list[dict], warmup: int, measured: int, slo: dict | None = None) -> dict:
    """Everything a level reports, over its measured requests, named and defined as vLLM's
    `bench serve --save-result` JSON (times in ms), plus `slo_share` (share of the measured
    requests meeting every budget, failed ones included: they did not meet it) and the counts
    of the window. Without an SLO, request_goodput and slo_share are None."""
    _, sample, _ = split(requests, warmup, measured)
    timed = [(r, request_timings(r)) for r in sample]
    done = [(r, t) for r, t in timed if t["ok"]]
    span = window(sample)
    duration = (span[1] - span[0]) if span else None
    rate = (lambda n: n / duration) if duration else (lambda n: None)
    output = sum(r.get("output_tokens") or 0 for r, _ in done)
    prompt = sum(r.get("prompt_tokens") or 0 for r, _ in done)
    good = sum(meets_slo(t, slo) for _, t in timed) if slo else None
    figures = {
        "duration": duration,
        "completed": len(done),
        "failed": len(sample) - len(done),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": rate(len(done)),
        "request_goodput": rate(good) if slo else None,
        "output_throughput": rate(output),
        "total_token_throughput": rate(prompt + output),
        "slo_share": (good / len(sample) if sample else None) if slo else None,
        "good": good,
        "requests_warmup": min(warmup, len(requests)),
        "requests_measured": len(sample),
    }
    series = {
        "ttft": [t["ttft_s"] for _, t in done],
        "tpot": [t["tpot_s"] for _, t in done if t["tpot_s"] is not None],
        "itl": [gap for _, t in done for gap in t["itl_s"]],
        "e2el": [t["e2e_s"] for _, t in done],
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values]
        figures[f"mean_{name}_ms"] = mean(ms)
        figures[f"median_{name}_ms"] = percentile(ms, 50)
        figures[f"std_{name}_ms"] = std(ms)
        for q in PERCENTILES:
            figures[f"p{q}_{name}_ms"] = percentile(ms, q)
    errors = [r["error"] for r in sample if r.get("error")]
    figures["first_error"] = errors[0] if errors else None
    return figures


def passed(figures: dict, slo_share: float) -> bool:
    """A level holds the SLO when its share of measured requests meeting it is at least slo_share."""
    return figures.get("slo_share") is not None and figures["slo_share"] >= slo_share


# ---------------------------------------------------------------------------------------------
# The capacity search: bracketing by doubling from `low`, then bisection to `resolution`


def _round(metric: str, value: float):
    return int(value) if metric == "concurrency" else round(value, 6)


def next_probe(probes: list[tuple[float, bool]], search: dict) -> float | int | None:
    """The next load to probe, or None when the search is done. `probes` are (load, held the
    SLO) in the order run; `search` is {metric, low, high, resolution}. First `low`; while every
    probe held, double (capped at `high`); after the first miss, bisect between the highest load
    that held below the lowest that missed, until they are within `resolution` (concurrency:
    integers). Done when `low` already misses, or `high` holds."""
    metric, low, high, resolution = search["metric"], search["low"], search["high"], search["resolution"]
    if not probes:
        return _round(metric, low)
    held = [load for load, ok in probes if ok]
    missed = [load for load, ok in probes if not ok]
    if not held:
        return None  # the lower bound misses: no capacity at all
    if not missed:
        top = max(held)
        return None if top >= high else _round(metric, min(top * 2, high))
    ceiling = min(missed)
    floor = max([load for load in held if load < ceiling], default=None)
    if floor is None or ceiling - floor <= resolution:
        return None
    middle = _round(metric, (floor + ceiling) / 2)
    if middle <= floor or middle >= ceiling or any(middle == load for load, _ in probes):
        return None
    return middle


def max_probes(search: dict) -> int:
    """The most probes next_probe can ask for: the doublings from low to high, then the halvings
    of the bracket down to the resolution (each at most ceil(log2) + 1)."""
    low, high, resolution = float(search["low"]), float(search["high"]), float(search["resolution"])
    doublings = math.ceil(math.log2(high / low)) + 1
    halvings = math.ceil(math.log2(max(1.0, (high - low) / resolution))) + 1
    return doublings + halvings


def rows_per_shape(serve: dict, repeats: int) -> int:
    """The most rows a round of a cell with load levels has per sweep shape (input x output):
    each swept level `repeats` times, every possible probe, and one row for an unfinished search."""
    found = settings(serve)
    search = found["search"]
    return len(sweep_levels(serve)) * repeats + (max_probes(search) + 1 if search else 0)


def outcome(probes: list[tuple[float, bool]], search: dict) -> dict:
    """The search's answer from its probes: {capacity, bound, reason}. capacity: the highest load
    that held the SLO below the lowest that missed it (None when `low` missed); bound: "exact"
    (to the resolution), "at least" (`high` held) or "none"; reason: one line."""
    held = [load for load, ok in probes if ok]
    missed = [load for load, ok in probes if not ok]
    unit = UNITS[search["metric"]]
    if not probes:
        return {"capacity": None, "bound": "none", "reason": "no load was probed"}
    if not held:
        return {"capacity": None, "bound": "none",
                "reason": f"the lower bound {search['low']:g} {unit} already misses the SLO"}  # fmt: skip
    if not missed:
        top = max(held)
        return {"capacity": top, "bound": "at least",
                "reason": f"every probe held the SLO, up to the upper bound {search['high']:g} {unit}"}  # fmt: skip
    ceiling = min(missed)
    floor = max([load for load in held if load < ceiling], default=None)
    if floor is None:
        return {"capacity": None, "bound": "none",
                "reason": f"{ceiling:g} {unit} missed the SLO and no lower load held it"}  # fmt: skip
    return {"capacity": floor, "bound": "exact",
            "reason": f"holds at {floor:g}, misses at {ceiling:g} {unit}"}  # fmt: skip


def slo_text(slo: dict, slo_share: float | None = None) -> str:
    """'SLO share ≥ 0.9 (TTFT ≤ 500 ms, TPOT ≤ 50 ms)'."""
    budgets = ", ".join(f"{SLO_WORDS[key]} ≤ {slo[key]:g} ms" for key in SLO_TIMINGS if key in slo)
    if slo_share is None:
        return budgets
    return f"SLO share ≥ {slo_share:g} ({budgets})"
