"""The texts a cell's quality step measures, and the contract of what it records: pure functions.

A cell's quality is measured once per cell (round 1 only, after its speed points, in the same
container and engine load, never inside a timed region) on texts shipped in the package
(paths.QUALITY_DIR; their source is its SOURCE.md):

- greedy continuations (temperature 0, at most `max_tokens` tokens, stopping at EOS) of the first
  `quality.prompts` prompts of prompts.json;
- the negative log-likelihood of reference.txt, split on blank-line (speech) boundaries into
  chunks of at most `quality.chunk_chars` characters, each scored on its own from the engine's
  own prompt log-probabilities (every token after the chunk's first).

Nothing is compared in the container: engines may have different tokenizers, so the host
compares decoded texts and bits per byte (the NLL over the UTF-8 bytes of the text, which no
tokenizer changes).

The contract, three places:

cell.json (runner.prepare_round), `quality_texts`: cell_entry() below, or null (quality off, or
a round after the first):
    {"prompts": [str, ...], "chunks": [str, ...], "max_tokens": int, "reference_bytes": int}

raw.json (scripts/bench_cell.py), `quality`, present when cell.json had quality_texts:
    {"status": "ok" | "failed" | "unsupported", "error": one-line str | null, "seconds": float,
     "greedy": [decoded continuation per prompt], "greedy_tokens": int (total generated),
     "nll_sum": float (sum of -log p in nats over the scored tokens), "nll_tokens": int,
     "method": str (how the engine gave them, e.g. "vllm prompt_logprobs=0")}
    A failure of the quality step never changes the cell's speed status or rows.

Parquet (metrics.COLUMN_HISTORY version 3; measure.quality_columns), on every row of the round
that measured quality, null on other rounds and in older files ("not measured", never 0):
    quality_status          str   ok | failed | unsupported | off (round 1 of a cell with quality off)
    quality_error           str   one-line reason when not ok
    quality_s               f64   seconds of the quality step
    quality_nll             f64   nll_sum / nll_tokens: mean NLL per scored token, nats
    quality_nll_tokens      int   scored tokens
    quality_bits_per_byte   f64   nll_sum / ln 2 / reference_bytes: the figure verdicts compare
    quality_greedy_json     str   JSON list of the greedy texts, in prompt order
    quality_method_version  int   QUALITY_METHOD_VERSION when quality was measured
"""

from __future__ import annotations

import json
from pathlib import Path

from . import paths

# Bump when the texts, their chunking or the way an engine scores them change: figures of two
# method versions are not compared.
QUALITY_METHOD_VERSION = 1
# The one round of a cell that measures quality (its figure belongs to the cell, not to a round).
MEASURED_ROUND = 1
QUALITY_STATUSES = ("ok", "failed", "unsupported", "off")


def load_reference(path: Path = paths.QUALITY_REFERENCE) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_prompts(path: Path = paths.QUALITY_PROMPTS) -> list[str]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _cut_speech(speech: str, limit: int) -> list[str]:
    """A speech longer than `limit`: its lines packed into pieces of at most `limit` characters
    (joined by their own newline), a line longer than `limit` cut at it."""
    pieces: list[str] = []
    for line in speech.split("\n"):
        while len(line) > limit:
            pieces.append(line[:limit])
            line = line[limit:]
        if pieces and len(pieces[-1]) + 1 + len(line) <= limit:
            pieces[-1] += "\n" + line
        else:
            pieces.append(line)
    return pieces


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """The text in chunks of at most `chunk_chars` characters, cut only between speeches (blank
    lines) where a speech fits: speeches are packed greedily, joined by their blank line; a speech
    longer than a chunk is cut at line ends into chunks of its own."""
    chunks: list[str] = []
    packing = False  # whether the last chunk may take another speech
    for speech in text.split("\n\n"):
        speech = speech.strip("\n")
        if not speech:
            continue
        if len(speech) > chunk_chars:
            chunks.extend(_cut_speech(speech, chunk_chars))
            packing = False
        elif packing and len(chunks[-1]) + 2 + len(speech) <= chunk_chars:
            chunks[-1] += "\n\n" + speech
        else:
            chunks.append(speech)
            packing = True
    return chunks


def reference_bytes(chunks: list[str]) -> int:
    """UTF-8 bytes of the scored text: the denominator of bits per byte."""
    return sum(len(chunk.encode("utf-8")) for chunk in chunks)


def cell_entry(quality: dict | bool, round: int) -> dict | None:
    """cell.json's `quality_texts` for a round of a cell with these `quality` settings: the texts
    on the measured round when quality is on, else None."""
    if not quality or round != MEASURED_ROUND:
        return None
    chunks = split_chunks(load_reference(), quality["chunk_chars"])
    return {
        "prompts": load_prompts()[: quality["prompts"]],
        "chunks": chunks,
        "max_tokens": quality["max_tokens"],
        "reference_bytes": reference_bytes(chunks),
    }
