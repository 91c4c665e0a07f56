"""Roofline context for decode: how close a point came to the memory-bandwidth bound.

Approximation (documented in docs/reports.md): one decode step reads every weight once for the whole
batch, so the bytes read per generated token are weight_bytes / batch size, and the bound on
decode steps per second is bandwidth / weight_bytes. A point that decodes one step every TPOT
seconds reached   fraction = weight_bytes / (TPOT x bandwidth).
KV-cache and activation traffic are left out, so the fraction understates the real traffic
(more so at long contexts and large batches); a fraction near or above 1 means the estimate, not
the device, is off.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .config import load_data_file

DEVICES_PATH = Path(__file__).with_name("data") / "devices.yaml"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@functools.cache
def device_table() -> tuple[dict, ...]:
    return tuple(load_data_file(DEVICES_PATH))


def stored_weight_bytes(manifest: dict) -> int | None:
    """Bytes of the weight files in a model manifest (the GGUF beside them is another engine's)."""
    sizes = [f["bytes"] for name, f in manifest.get("files", {}).items() if name.endswith(WEIGHT_SUFFIXES)]
    return sum(sizes) if sizes else None


def engine_weight_bytes(stored: int | None, stored_dtype: str | None, effective_dtype: str | None, quantized: bool):
    """Weight bytes as the engine holds them: an unquantized model cast to another dtype
    (bf16 files run as float32) changes size with the dtype; quantized weights keep theirs."""
    if stored is None:
        return None
    if quantized or stored_dtype not in DTYPE_BYTES or effective_dtype not in DTYPE_BYTES:
        return stored
    return stored * DTYPE_BYTES[effective_dtype] // DTYPE_BYTES[stored_dtype]


def bandwidth(device_name: str | None, study_table: dict[str, float] | None = None) -> tuple[float, str] | None:
    """(GB/s, where it comes from) for a device name: the study's table first, then the package's."""
    if not isinstance(device_name, str) or not device_name:  # None, or NaN from a failed GPU cell's row
        return None
    for pattern, gb_s in (study_table or {}).items():
        if re.search(pattern, device_name, re.IGNORECASE):
            return float(gb_s), "study"
    for row in device_table():
        if re.search(row["match"], device_name, re.IGNORECASE):
            return float(row["bandwidth_gb_s"]), row["source"]
    return None


def decode_fraction(weight_bytes: float | None, tpot_s: float | None, bandwidth_gb_s: float | None) -> float | None:
    """Fraction of the bandwidth bound a point's decode reached (None if a figure is missing)."""
    if not weight_bytes or not tpot_s or not bandwidth_gb_s or tpot_s <= 0:
        return None
    return weight_bytes / (tpot_s * bandwidth_gb_s * 1e9)
