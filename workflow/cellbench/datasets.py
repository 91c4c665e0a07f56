"""The prompts a cell sends: its `dataset` setting, reading and checking a prompt file on the
host, the shipped prompt sets, and the contract of what cell.json, raw.json and the dataset
columns hold. Pure functions, besides reading the file.

Kinds (`dataset.kind`):

- random (the default): seeded random token ids of the point's input_len, output_len tokens
  each (bench_cell.prompt_token_ids); cells without a dataset keep their ids and prompts.
- jsonl: a user's file (`path`, relative to the project root or absolute), read and checked
  here when the study is read. One JSON object per line (blank lines skipped), or one JSON array
  of such objects (ShareGPT's own files are an array). Each object is either
    {"prompt": str, "output_len": int >= 1}      (output_len may be left out when the dataset
                                                 gives `output_len` for every request)
  or a ShareGPT conversation
    {"conversations": [{"from": ..., "value": str}, {"from": ..., "value": str}, ...]}
  read as vLLM's ShareGPT loader reads it (vllm/benchmarks/datasets/datasets.py,
  ShareGPTDataset, vLLM 0.32.0: https://github.com/vllm-project/vllm/blob/ba059444112cb96dc866a7fcfa13c9634a78d0ba/vllm/benchmarks/datasets/datasets.py):
  an entry with fewer than two turns is skipped; the first turn's text is the prompt, the second
  turn's length in tokens of the engine's tokenizer is the output length (whatever the turns'
  "from"); then, in the container, vLLM's is_valid_sequence prunes a request whose prompt is
  below 4 tokens, whose output is below 4 tokens (unless `output_len` fixes it), whose prompt is
  above 1024 tokens or whose prompt + output is above 2048. Other keys of an object are ignored.
- shipped: a prompt set shipped in the package (paths.PROMPTS_DIR/<name>.jsonl, its source in
  SOURCE.md beside it), read like a jsonl file.
- shared_prefix: every request of the cell starts with one of `num_prefixes` seeded random
  prefixes of `prefix_len` tokens (request i of a point takes prefix i mod num_prefixes; the same
  prefixes for every point and repeat of the cell), then a suffix of input_len - prefix_len
  seeded random tokens, distinct within a point's requests: `engine_args.enable_prefix_caching`
  on/off becomes a meaningful axis.

The sweep: with random and shared_prefix a point's input_len and output_len are what they say.
With jsonl and shipped the lengths are each request's own: the resolved cell's sweep has
input_len [0] and output_len [0] ("from the dataset"; input_len and output_len are required
columns, and a mean would differ from point to point and break the pairing with the
baseline), so a sweep giving several values of either is refused. batch_size (and repeats,
warmup) keep their meaning: a point sends batch_size requests of the dataset. Which ones: the
usable entries in a seeded order per point (seed, batch size); the warm-up takes the first
batch_size, repeat r the (r + 1)-th window of batch_size, wrapping around: a point's warm-up
and repeats use distinct prompts while (repeats + 1) x batch_size <= entries. Points of one cell
may share prompts; vLLM's prefix caching (on by default) then finds them cached.

The contract, four places:

study (the schema's `dataset`): {kind, path, name, output_len, prompts, sha256, prefix_len,
    num_prefixes}, checked by check(); the resolved cell's `dataset` adds `sha256` (jsonl,
    shipped: of the whole file) and `entries` (usable entries read). The cell id covers the
    dataset only when it is not random: its kind and settings, and the file's sha256 instead of
    its path (a changed file is a new cell; the same file elsewhere is the same cell).

cell.json (runner.prepare_round), `dataset_prompts`: cell_entry() below; null for random and
    shared_prefix (made in the container from the seed):
    {"kind": str, "name": str, "sha256": str, "output_len": int | null,
     "entries": [{"line": int, "prompt": str, "output_len": int | null, "completion": str | null}]}
    An entry with a completion is a ShareGPT one (its output length and pruning in the container).

raw.json (scripts/bench_cell.py): each request of a jsonl/shipped point adds "dataset_line"
    (the line of the file it came from); raw["dataset"] = {"usable": int, "pruned": int} after
    the first point (requests left after vLLM's ShareGPT pruning, requests pruned).

Parquet (metrics.COLUMN_HISTORY version 5; measure.dataset_columns), every row of a new file:
    dataset_kind  random | jsonl | shipped | shared_prefix
    dataset_name  the shipped set's name or the file's name; null for random, shared_prefix
    dataset_sha256, dataset_prefix_len; prompt_tokens_{mean,p50,p90}, output_tokens_{mean,p50,p90}
    of the repeat's requests as the engine counted them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from . import paths

KINDS = ("random", "jsonl", "shipped", "shared_prefix")
DEFAULT = {"kind": "random"}
# The keys each kind takes besides `kind` (the schema lists them all; check() says which go where).
SETTINGS = {
    "random": (),
    "jsonl": ("path", "output_len", "prompts", "sha256"),
    "shipped": ("name", "output_len", "prompts", "sha256"),
    "shared_prefix": ("prefix_len", "num_prefixes"),
}
FROM_FILE = ("jsonl", "shipped")  # kinds whose requests carry their own lengths
DATASET_LEN = 0  # input_len and output_len of a jsonl/shipped cell's points: "from the dataset"
MAX_FILE_BYTES = 1 << 30  # a prompt file the host reads and hashes at every study load
MAX_ENTRIES = 10_000  # entries that travel to a cell in cell.json; more need `prompts`
SUFFIX = ".jsonl"
# vLLM's is_valid_sequence (the ShareGPT rule; its defaults): min_len, max_prompt_len, max_total_len.
SHAREGPT_LIMITS = (4, 1024, 2048)


class DatasetError(ValueError):
    """A prompt file that cannot be used; the message is one line naming the file (and line)."""


def shipped_names() -> list[str]:
    return sorted(path.name.removesuffix(SUFFIX) for path in paths.PROMPTS_DIR.glob(f"*{SUFFIX}"))


def file_of(dataset: dict) -> tuple[Path, str]:
    """(the file of a jsonl or shipped dataset, how messages name it)."""
    if dataset["kind"] == "shipped":
        return paths.PROMPTS_DIR / f"{dataset['name']}{SUFFIX}", f"shipped set {dataset['name']}"
    given = dataset["path"]
    path = Path(given)
    return (path if path.is_absolute() else paths.PROJECT_ROOT / path), given


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _entry(value, line: int, label: str, fixed: int | None) -> dict | None:
    """One object of a prompt file as an entry, None when vLLM's ShareGPT loader skips it."""
    where = f"{label}: line {line}"
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(value).__name__}")
    if "conversations" in value:
        turns = value["conversations"]
        if not isinstance(turns, list):
            raise DatasetError(f"{where}: conversations is {type(turns).__name__}, expected a list of turns")
        if len(turns) < 2:
            return None  # vLLM keeps conversations of at least two turns
        for index in (0, 1):
            turn = turns[index]
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise DatasetError(f'{where}: conversations[{index}] has no text "value"')
        return {"line": line, "prompt": turns[0]["value"], "output_len": fixed, "completion": turns[1]["value"]}
    if "prompt" not in value:
        raise DatasetError(f'{where}: no prompt (expected a "prompt" string or a ShareGPT "conversations" list)')
    prompt = value["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise DatasetError(f"{where}: prompt is {json.dumps(prompt)[:40]}, expected a non-empty string")
    length = value.get("output_len")
    if "output_len" in value and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise DatasetError(f"{where}: output_len {json.dumps(length)[:40]} is not a positive integer")
    if fixed is None and length is None:
        raise DatasetError(f"{where}: no output_len (give one per line, or dataset.output_len for every request)")
    return {"line": line, "prompt": prompt, "output_len": fixed or length, "completion": None}


def _objects(text: str, label: str):
    """(line, parsed object) of a JSON array or of JSON lines; DatasetError on malformed JSON."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text.startswith("[", start):  # one JSON array: its elements one by one, to know their lines
        pos = start + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if text.startswith("]", pos):
                after = pos + 1 + len(text[pos + 1 :]) - len(text[pos + 1 :].lstrip())
                if after < len(text):
                    raise DatasetError(f"{label}: line {_line_of(text, after)}: text after the JSON array")
                return
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{label}: line {exc.lineno}: not JSON ({exc.msg}, column {exc.colno})") from None
            yield _line_of(text, pos), value
            pos = end
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                what = "end of file" if pos >= len(text) else repr(text[pos])
                raise DatasetError(f"{label}: line {_line_of(text, pos)}: expected ',' or ']', found {what}")
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{label}: line {number}: not JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise DatasetError(f"{label}: line {number}: JSON nested too deeply") from None


def parse(data: bytes, label: str, output_len: int | None = None, prompts: int | None = None) -> dict:
    """A prompt file's bytes as {"entries", "skipped", "sha256"}: the first `prompts` usable entries
    (all when None, at most MAX_ENTRIES), ShareGPT conversations of fewer than two turns skipped.
    DatasetError, one line naming `label` and the line, for a file that is empty, not UTF-8 or not
    JSON, or an entry without a prompt or with a length that is not a positive integer."""
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{label}: line {line}: byte {exc.start} (0x{data[exc.start]:02x}) is not UTF-8; a prompt file is UTF-8"
        ) from None
    if not text.strip():
        raise DatasetError(f"{label}: the file is empty; expected one JSON object per line, or a JSON array")
    entries, skipped = [], 0
    for line, value in _objects(text, label):
        entry = _entry(value, line, label, output_len)
        if entry is None:
            skipped += 1
            continue
        if len(entries) == MAX_ENTRIES:
            raise DatasetError(
                f"{label}: more than {MAX_ENTRIES} usable entries; set dataset.prompts to use the first N "
                f"(at most {MAX_ENTRIES})"
            )
        entries.append(entry)
        if len(entries) == prompts:
            break  # what follows is not read
    if not entries:
        why = f" ({skipped} conversations of fewer than two turns, skipped as vLLM does)" if skipped else ""
        raise DatasetError(f"{label}: no usable entry{why}")
    return {"entries": entries, "skipped": skipped, "sha256": sha256}


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, size: int, mtime_ns: int, label: str, output_len, prompts) -> dict:
    return parse(Path(path).read_bytes(), label, output_len, prompts)


def read(dataset: dict) -> dict:
    """The file of a jsonl or shipped dataset, parsed (see parse); read once per change of the file
    in one process (a study's cells often share one). DatasetError when it cannot be read."""
    path, label = file_of(dataset)
    try:
        stat = path.stat()
        if not path.is_file():
            raise DatasetError(f"{label}: not a file")
    except OSError as exc:
        raise DatasetError(f"{label}: cannot read the prompt file ({exc.strerror})") from None
    if stat.st_size > MAX_FILE_BYTES:
        raise DatasetError(f"{label}: {stat.st_size} bytes; at most {MAX_FILE_BYTES} (1 GiB)")
    try:
        return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, label,
                            dataset.get("output_len"), dataset.get("prompts"))  # fmt: skip
    except OSError as exc:
        raise DatasetError(f"{label}: cannot read the prompt file ({exc.strerror})") from None


def check(dataset: dict, cell: dict) -> dict:
    """The cell's dataset resolved (defaults filled, a file read: its sha256 and usable entries)
    and checked against the cell's sweep and engine; DatasetError with a one-line reason (the
    caller names the cell). Pure but for reading the file."""
    kind = dataset.get("kind", "random")
    for key in dataset:
        if key != "kind" and key not in SETTINGS[kind]:
            takes = ", ".join(SETTINGS[kind]) or "no other key"
            raise DatasetError(f"dataset.{key}: not a setting of kind {kind} (it takes {takes})")
    resolved = {"kind": kind, **{key: dataset[key] for key in SETTINGS[kind] if key in dataset}}
    sweep = cell["sweep"]
    if kind == "shared_prefix":
        if "prefix_len" not in dataset:
            raise DatasetError("dataset.prefix_len: required for kind shared_prefix")
        resolved.setdefault("num_prefixes", 1)
        short = [length for length in sweep["input_len"] if length <= dataset["prefix_len"]]
        if short:
            raise DatasetError(
                f"dataset.prefix_len: {dataset['prefix_len']} is not below the sweep's input_len {short[0]}; "
                "a prompt is the shared prefix, then a suffix of its own (input_len is the whole prompt)"
            )
    if kind not in FROM_FILE:
        return resolved
    needs = "path" if kind == "jsonl" else "name"
    if needs not in dataset:
        raise DatasetError(f"dataset.{needs}: required for kind {kind}")
    if kind == "shipped" and dataset["name"] not in shipped_names():
        raise DatasetError(f"dataset.name: {dataset['name']!r} is not a shipped set ({', '.join(shipped_names())})")
    for axis in ("input_len", "output_len"):
        if len(sweep[axis]) > 1:
            raise DatasetError(
                f"sweep.{axis}: {sweep[axis]} gives several values, but a {kind} dataset gives every request its "
                "own lengths (the points would be the same); give one value or none"
            )
    if cell.get("engine") == "transformers":
        raise DatasetError(
            f"kind {kind}: the transformers engine decodes a static batch of equal lengths; "
            "use kind random or shared_prefix"
        )
    if cell.get("profile"):
        raise DatasetError(f"kind {kind}: a profile needs a point of fixed lengths; use kind random or shared_prefix")
    found = read(dataset)
    if dataset.get("sha256") and dataset["sha256"] != found["sha256"]:
        _, label = file_of(dataset)
        raise DatasetError(f"{label}: sha256 is {found['sha256']}, the study pins {dataset['sha256']}")
    return {**resolved, "sha256": found["sha256"], "entries": len(found["entries"])}


def identity(dataset: dict) -> dict | None:
    """What of a resolved dataset decides what is measured (None for random: the ids cells had
    before datasets existed): its settings, the file's sha256 instead of its path."""
    if dataset["kind"] == "random":
        return None
    return {key: value for key, value in dataset.items() if key not in ("path", "entries")}


def label(dataset: dict) -> str | None:
    """dataset_name: the shipped set's name or the file's name."""
    if dataset["kind"] == "shipped":
        return dataset["name"]
    if dataset["kind"] == "jsonl":
        return Path(dataset["path"]).name
    return None


def cell_entry(dataset: dict) -> dict | None:
    """cell.json's `dataset_prompts` of a resolved dataset: the file read again, refused when it is
    no longer the file the study was read with (its sha256 is in the cell id)."""
    if dataset["kind"] not in FROM_FILE:
        return None
    found = read(dataset)
    if found["sha256"] != dataset["sha256"]:
        _, name = file_of(dataset)
        raise DatasetError(f"{name}: changed since the study was read (sha256 {found['sha256'][:12]}, "
                           f"the cell's {dataset['sha256'][:12]}); read the study again")  # fmt: skip
    return {"kind": dataset["kind"], "name": label(dataset), "sha256": dataset["sha256"],
            "output_len": dataset.get("output_len"), "entries": found["entries"]}  # fmt: skip
