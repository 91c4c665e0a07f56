"""Requested vs effective settings: what a cell asked for against what the engine actually used.

The engine may override a request without failing: vLLM's ROCm platform sets
VLLM_USE_TRITON_AWQ=1 in RocmPlatform.verify_quantization for every quantized model
(https://github.com/vllm-project/vllm/blob/001eda31e3d032e9dc864e97f3630358b2ff8b5a/vllm/platforms/rocm.py),
and vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn, LD_PRELOAD and the compile mode
in CpuPlatform.check_and_update_config. `effective` is what scripts/bench_cell.py read inside the
container after the engine started: dtype, quantization, enforce_eager, compilation_mode,
engine_args (the requested names, looked up in the engine's config) and env (after start).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from . import contract
from .config import canonical_json

# Names the engine reports in other spellings.
_DTYPES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
# Settings compared between cells besides the requested ones: what each engine decides on its
# own, from its declaration; their union is never a "requested" setting of its own.
ENGINE_DECIDED = tuple(dict.fromkeys(s for e in contract.ENGINES.values() for s in e.decides))
# Request keys that are not engine settings and cannot be overridden.
FIXED_KEYS = ("engine", "image", "model", "mode", "sweep")
_UNKNOWN = object()


def _norm(value: Any) -> Any:
    """Comparable form: dtype aliases, bools and numbers as the engine and YAML write them."""
    if isinstance(value, str):
        text = value.strip()
        lowered = text.lower().removeprefix("torch.")
        if lowered in ("true", "false"):
            return lowered == "true"
        try:
            return float(text) if any(c in text for c in ".e") else int(text)
        except ValueError:
            return _DTYPES.get(lowered, lowered if lowered in _DTYPES.values() else text)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value) if isinstance(value, float) and not value.is_integer() else int(value)
    return value


def requested(cell: dict) -> dict[str, Any]:
    """The cell's requests as flat settings: dtype, quantization, engine_args.NAME, env.NAME.
    dtype 'auto' asks for nothing, so it is not a request."""
    flat: dict[str, Any] = {}
    if cell.get("dtype") not in (None, "auto"):
        flat["dtype"] = cell["dtype"]
    flat["quantization"] = cell.get("quantization")
    flat.update({f"engine_args.{k}": v for k, v in cell.get("engine_args", {}).items()})
    flat.update({f"env.{k}": v for k, v in cell.get("env", {}).items()})
    return flat


def effective_value(effective: dict, setting: str) -> Any:
    """The engine's value of a flat setting, or _UNKNOWN when the engine did not report it.
    An env variable absent after start is unset (None): bench_cell records every requested one."""
    if setting.startswith("env."):
        env = effective.get("env")
        # None: the engine could not read its environment (a serve cell whose server never
        # wrote it); the client's own is no stand-in, so the value is unknown.
        return _UNKNOWN if env is None else env.get(setting[4:])
    if setting.startswith("engine_args."):
        name = setting.split(".", 1)[1]
        reported = effective.get("engine_args", {})
        if name in reported:
            return reported[name]
        return effective.get(name, _UNKNOWN)
    return effective.get(setting, _UNKNOWN)


def overrides(cell: dict, effective: dict | None) -> list[dict]:
    """Every requested setting the engine did not use as asked, in request order."""
    if not effective:
        return []
    found = []
    for setting, asked in requested(cell).items():
        used = effective_value(effective, setting)
        if used is _UNKNOWN or _norm(asked) == _norm(used):
            continue
        found.append({"setting": setting, "requested": asked, "effective": used})
    return found


def label(setting: str) -> str:
    return setting.split(".", 1)[1] if "." in setting else setting


def describe_override(override: dict) -> str:
    """'VLLM_USE_TRITON_AWQ forced to 1 by the engine'."""
    used = override["effective"]
    if used is None:
        return f"{label(override['setting'])} unset by the engine"
    return f"{label(override['setting'])} forced to {used} by the engine"


def identity(cell: dict, effective: dict, settings: list[str]) -> str | None:
    """What the cell really measured: fixed keys, the engine's own decisions and the effective
    value of every setting any compared cell requested. None if a value is unknown."""
    engine = contract.ENGINES.get(cell.get("engine", "vllm"))
    if engine is None:  # an archive from a version that knew an engine this one does not
        return None
    values = {key: cell.get(key) for key in FIXED_KEYS}
    for setting in (*engine.decides, *settings):
        used = effective_value(effective, setting)
        if used is _UNKNOWN:
            return None
        values[setting] = _norm(used)
    return canonical_json(values)


def _reason(cell: dict, effective: dict, other: dict) -> str:
    """Why two cells with different requests measured the same (their effective values agree)."""
    mine, theirs = requested(cell), requested(other)
    differing = [s for s in dict.fromkeys([*mine, *theirs]) if _norm(mine.get(s)) != _norm(theirs.get(s))]
    words = []
    for setting in differing:
        used = effective_value(effective, setting)
        asked_mine, asked_theirs = setting in mine, setting in theirs
        if (asked_mine and _norm(mine[setting]) != _norm(used)) or (
            asked_theirs and _norm(theirs[setting]) != _norm(used)
        ):
            words.append(describe_override({"setting": setting, "effective": used}))
        else:
            words.append(f"{label(setting)} resolved to {used}")
    return "; ".join(words) or "the same request"


def same_as(cells: list[tuple[dict, dict | None]], baseline_id: str | None = None) -> dict[str, str]:
    """Cells (of one machine) that measured the same thing as another cell although their
    requests differ: {cell_id: 'same as <cell name>: <why>'}. In each group of equal effective
    settings the cell with the fewest overrides (then the baseline, then by name) is the
    reference and stays unmarked."""
    started = [(cell, eff) for cell, eff in cells if eff]
    settings = sorted({s for cell, _ in started for s in requested(cell) if s not in ENGINE_DECIDED})
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for cell, eff in started:
        key = identity(cell, eff, settings)
        if key is not None:
            groups.setdefault(key, []).append((cell, eff))
    marks = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: (len(overrides(*m)), m[0]["id"] != baseline_id, m[0]["name"]))
        reference = members[0][0]
        for cell, eff in members[1:]:
            marks[cell["id"]] = f"same as {reference['name']}: {_reason(cell, eff, reference)}"
    return marks


def unreported(cell: dict, effective: dict | None) -> list[dict]:
    """A finding when the engine's record lacks what its declaration promises: the cell's
    overrides and "same as" comparisons cannot be checked (they would otherwise switch off silently)."""
    missing = contract.missing_reports(effective, cell["engine"]) if effective else []
    if not missing:
        return []
    return [
        {
            "id": "engine-contract",
            "severity": "warning",
            "finding": f"the {cell['engine']} engine did not report {', '.join(missing)} after start",
            "remediation": "its overrides and 'same as' marks are unknown for this cell; report them in "
            "the engine's effective() in scripts/bench_cell.py",
            "source": "workflow/cellbench/contract.py",
            "line": "",
            "count": len(missing),
        }
    ]


def overrides_json(cell: dict, effective: dict | None) -> str | None:
    """The Parquet column: overrides as JSON, null when the engine never started."""
    return json.dumps(overrides(cell, effective), sort_keys=True, default=str) if effective else None


def engine_set_env(env_at_start: dict, env_after: dict | None) -> dict[str, dict]:
    """Environment the engine itself set or changed while starting (requested or not); nothing
    when the environment after start is unknown (None)."""
    if env_after is None:
        return {}
    keys = sorted(set(env_at_start) | set(env_after))
    return {
        k: {"before": env_at_start.get(k), "after": env_after.get(k)}
        for k in keys
        if env_at_start.get(k) != env_after.get(k)
    }


def same_as_rows(rows: Iterable[dict], baseline_id: str | None = None) -> dict[tuple[str, str], str]:
    """same_as() for Parquet rows of any number of machines: {(machine_id, cell_id): mark}.
    The first row with settings of each (machine, cell) speaks for the cell."""
    by_machine: dict[str, dict[str, tuple[dict, dict | None]]] = {}
    for row in rows:
        settings, used = row["settings_json"], row["effective_json"]
        cells = by_machine.setdefault(row["machine_id"], {})
        if isinstance(settings, str) and row["cell_id"] not in cells:
            cells[row["cell_id"]] = (json.loads(settings), json.loads(used) if isinstance(used, str) else None)
    return {
        (machine, cell_id): mark
        for machine, cells in sorted(by_machine.items())
        for cell_id, mark in same_as(list(cells.values()), baseline_id).items()
    }
