"""Study config: validation against the one JSON schema, expansion into cells, stable cell ids.

A cell is a plain dict. Its id is a readable name plus a short hash of the canonical JSON of
everything that decides what is measured (image name, model, engine, dtype, quantization,
engine args, env, mode, sweep). Nothing machine-specific (timeouts, CPU pinning, memory limits,
image digests) goes into the hash, so the same study gives the same ids on every machine.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import contract, locks

if TYPE_CHECKING:
    import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"

# Keys of a resolved cell that define the measurement, hence its id.
IDENTITY_KEYS = (
    "engine",
    "image",
    "model",
    "dtype",
    "quantization",
    "engine_args",
    "env",
    "mode",
    "sweep",
)
PROJECT_ROOT = SCHEMA_PATH.parents[2]


class ConfigError(ValueError):
    """A study that cannot run; the message is one line naming the key at fault."""

    def __init__(self, message: str):
        # One line, whatever a message quotes: a safety net under _quote.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…")


MAX_MESSAGE = 400  # characters of a ConfigError
MAX_QUOTE = 80  # characters of a value quoted in a message
# Bounds of what a study file may make the loader build (a hostile file is a bomb otherwise).
MAX_DEPTH = 64  # nesting levels
MAX_NODES = 200_000  # values after expanding YAML aliases (a "billion laughs" file is refused)
YTE_KEY = "__use_yte__"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 1] + "…"


def _quote(value: Any) -> str:
    """repr() of a value for a message, cut to MAX_QUOTE characters."""
    return _cut(repr(value))


class StudyLoader(yaml.SafeLoader):
    """SafeLoader (never runs code, never evaluates YTE) that also refuses duplicate keys, nesting
    deeper than MAX_DEPTH and documents whose aliases expand to more than MAX_NODES values."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)  # the anchored node, whose size is known
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"expands to more than {MAX_NODES} values (YAML aliases)", node.start_mark
            )
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` keys may be overridden by the mapping's own
                key = self.construct_object(key_node, deep=False)
                try:
                    line = first.get(key)
                except TypeError:
                    continue  # unhashable: SafeLoader refuses it below
                if line is not None:
                    problem = f"key {_quote(key)} appears twice (first on line {line + 1})"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


@functools.cache
def load_schema() -> dict:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    # The engines are those the contract declares (one list for the schema, the host and the container).
    schema["$defs"]["cell_settings"]["properties"]["engine"]["enum"] = list(contract.ENGINES)
    return schema


def load_study(path: str | Path) -> dict:
    """Read a study file with StudyLoader (plain YAML, never evaluated); a missing file, bytes
    that are not UTF-8, bad YAML or a bomb become a one-line ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read study file ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: byte {exc.start}: 0x{data[exc.start]:02x} is not UTF-8; a study must be UTF-8 text"
        ) from None
    try:
        config = yaml.load(text, Loader=StudyLoader)  # noqa: S506 (StudyLoader is a SafeLoader)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{path}: character {exc.position}: {exc.reason} ({_quote(exc.character)})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a study must be a YAML mapping, not {type(config).__name__}")
    check_plain(config)
    return config


def check_plain(config: dict) -> None:
    """A study is plain data: no template directive (Snakemake evaluates a file with
    `__use_yte__: true` as a YTE template, which runs code), no nesting deeper than MAX_DEPTH and
    no more than MAX_NODES values. Walks without recursion, so a deep or aliased structure built
    by another loader (Snakemake's) is refused here without a RecursionError or a long walk."""
    for key in config:
        if isinstance(key, str) and key.startswith("__"):
            raise ConfigError(f"config: {_cut(key)}: YTE templates run code; a study must be plain YAML")
    stack = [(config, 1)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"config: nested deeper than {MAX_DEPTH} levels")
        if seen > MAX_NODES:
            raise ConfigError(f"config: more than {MAX_NODES} values (YAML aliases expanded)")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def check_study_files(paths) -> None:
    """Read every study file Snakemake was given again, as `cellbench validate` does: Snakemake's
    own loader drops duplicate keys, removes `__use_yte__` after evaluating the template and
    takes alias bombs, so the Snakefile checks the files, not only the config they made."""
    for path in paths:
        load_study(path)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".") or "<top>"


@functools.cache
def _ecma_regex(pattern: str) -> re.Pattern:
    """A schema `pattern` as JSON Schema means it (ECMA-262): `$` matches only at the very end.
    Python's `$` also matches before a final newline, so "^[a-z0-9]+$" would take "name\\n";
    every bare `$` (not escaped, not in a [class]) becomes `\\Z`."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[":
            in_class = True
        elif char == "]":
            in_class = False
        elif char == "$" and not in_class:
            char = r"\Z"
        out.append(char)
    return re.compile("".join(out))


def _pattern(validator, pattern, instance, schema):
    """The `pattern` keyword with ECMA-262 anchoring: the one place every id of the schema
    (names, machine_id, env names, axes, propertyNames) is matched, for both entry points."""
    import jsonschema

    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{_quote(instance)} does not match {pattern!r}")


@functools.cache
def _validator_class():
    import jsonschema

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


def validate(config: dict) -> None:
    """Validate against the schema; raise ConfigError naming the first offending key."""
    check_plain(config)
    validator = _validator_class()(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if not errors:
        return
    error = errors[0]
    # An additionalProperties error names the parent; say which key is unknown.
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})), key=str)
        where = _key_path(error)
        prefix = "" if where == "<top>" else f"{where}."
        raise ConfigError(f"config: {prefix}{_cut(str(unknown[0]))}: unknown key") from None
    # A pattern message quotes a regex; the schema's description says in words what is expected.
    if error.validator == "pattern" and error.schema.get("description"):
        what = "key" if "propertyNames" in error.schema_path else "value"
        expected = error.schema["description"]
        raise ConfigError(
            f"config: {_key_path(error)}: {what} {_quote(error.instance)} is not valid; expected {expected}"
        ) from None
    # jsonschema's messages quote the whole instance (a long string, a big mapping): cut it.
    message = error.message.replace(repr(error.instance), _quote(error.instance))
    raise ConfigError(f"config: {_key_path(error)}: {message}") from None


def schema_defaults() -> dict:
    """Cell settings defaults, read from the schema's `default` keywords (one source of truth)."""
    defs = load_schema()["$defs"]
    settings = {}
    for key, prop in defs["cell_settings"]["properties"].items():
        if "default" in prop:
            settings[key] = copy.deepcopy(prop["default"])
    for nested in ("sweep", "resources"):
        settings[nested] = {
            key: copy.deepcopy(prop["default"]) for key, prop in defs[nested]["properties"].items() if "default" in prop
        }
    return settings


def _merge(base: dict, override: dict) -> dict:
    """Settings merge: nested dicts (engine_args, env, sweep, resources) merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_axis(cell: dict, key: str, value: Any) -> None:
    if "." in key:
        table, leaf = key.split(".", 1)
        cell[table] = {**cell[table], leaf: value}
    else:
        cell[key] = value


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-") or "none"


def _axis_label(key: str, value: Any) -> str:
    leaf = key.split(".", 1)[-1]
    if isinstance(value, bool):
        return leaf if value else f"no_{leaf}"
    if "." not in key:
        return str(value)
    return f"{leaf}-{value}"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# Sweep keys that say how often a cell is measured, not what: raising them keeps the id.
NOT_IDENTITY_SWEEP = ("rounds",)


def cell_hash(cell: dict) -> str:
    identity = {key: cell[key] for key in IDENTITY_KEYS}
    identity["sweep"] = {k: v for k, v in cell["sweep"].items() if k not in NOT_IDENTITY_SWEEP}
    if cell["mode"] == "serve":  # client settings matter only to a serving cell
        identity["serve"] = cell["serve"]
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:10]


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def expand_cells(config: dict) -> list[dict]:
    """Every cell of the study, resolved: defaults <- study defaults <- group <- axis values."""
    base = _merge(schema_defaults(), config.get("defaults", {}))
    cells = []
    for group in config["cells"]:
        settings = _merge(base, {k: v for k, v in group.items() if k not in ("name", "axes")})
        axes = group.get("axes", {})
        for values in itertools.product(*axes.values()):
            cell = copy.deepcopy(settings)
            labels = [group["name"]]
            for key, value in zip(axes, values, strict=True):
                _set_axis(cell, key, value)
                labels.append(_axis_label(key, value))
            cell["name"] = slugify("-".join(labels))
            cell["group"] = group["name"]
            cell["device"] = config["images"].get(cell.get("image"), {}).get("device")
            cell["id"] = f"{cell['name']}-{cell_hash(cell)}"
            cells.append(cell)
    return cells


def _check_references(config: dict, cells: list[dict]) -> None:
    groups = [group["name"] for group in config["cells"]]
    for name in groups:
        if groups.count(name) > 1:
            raise ConfigError(f"config: cells: group name {name!r} is used twice")
    for index, group in enumerate(config["cells"]):
        for key, values in group.get("axes", {}).items():
            if len(values) != len({canonical_json(v) for v in values}):
                raise ConfigError(f"config: cells[{index}].axes.{key}: values repeat")
    seen: dict[str, str] = {}
    for cell in cells:
        where = f"config: cell {cell['name']}"
        for key, table in (("image", "images"), ("model", "models")):
            if not cell.get(key):
                raise ConfigError(f"{where}: no {key} (set it in defaults or the cell group)")
            if cell[key] not in config[table]:
                known = ", ".join(sorted(config[table]))
                raise ConfigError(f"{where}: {key} {cell[key]!r} is not in {table} ({known})")
        for name in cell["env"]:
            if contract.is_secret_name(name):
                raise ConfigError(
                    f"{where}: env.{name} looks like a secret; export it in the shell instead, "
                    "cellbench passes it to the container without writing it down"
                )
        _check_engine(cell, config["models"][cell["model"]], where)
        if cell["name"] in seen:
            raise ConfigError(f"{where}: two cells resolve to the same name")
        seen[cell["name"]] = cell["id"]
    if config["baseline"] not in seen:
        raise ConfigError(
            f"config: baseline: {_quote(config['baseline'])} is not a cell name "
            f"(cells: {_cut(', '.join(sorted(seen)))})"
        )
    for name, model in config["models"].items():
        if model["source"] == "pypi-gguf":
            for key in ("package", "file", "prepare_image"):
                if not model.get(key):
                    raise ConfigError(f"config: models.{name}.{key}: required for pypi-gguf")
            if model["prepare_image"] not in config["images"]:
                raise ConfigError(f"config: models.{name}.prepare_image: {model['prepare_image']!r} is not in images")
        if model["source"] == "hf-cache" and not model.get("repo_id"):
            raise ConfigError(f"config: models.{name}.repo_id: required for hf-cache")


def _check_expectations(config: dict) -> None:
    # A glob that matches no cell is not an error (a study trimmed to a few cells keeps its
    # ranges); the verdicts list it as not measured.
    for index, exp in enumerate(config.get("expectations", [])):
        if exp.get("min") is not None and exp.get("max") is not None and exp["min"] > exp["max"]:
            raise ConfigError(f"config: expectations[{index}]: min {exp['min']} is above max {exp['max']}")
        try:
            re.compile(exp.get("device") or "")
        except re.error as exc:
            raise ConfigError(f"config: expectations[{index}].device: not a valid regex ({exc})") from None
    for pattern in config.get("bandwidth_gb_s", {}):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"config: bandwidth_gb_s: {_quote(pattern)} is not a valid regex ({exc})") from None


def _secret_values(value, where: str):
    """(key path) of every string, key or value, that has the shape of a credential."""
    if isinstance(value, dict):
        for key, item in value.items():
            if contract.SECRET_VALUE.search(str(key)):
                yield f"{where}.<key>" if where else "<key>"
            yield from _secret_values(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _secret_values(item, f"{where}[{index}]")
    elif isinstance(value, str) and contract.SECRET_VALUE.search(value):
        yield where


def _check_secrets(config: dict) -> None:
    """A study is shared and archived: it must hold no credential, by name or by shape."""
    for where in _secret_values(config, ""):
        raise ConfigError(
            f"config: {where}: holds what looks like a credential; remove it and export it in the shell instead"
        )
    tables = [(f"images.{name}.build_args", image.get("build_args", {})) for name, image in config["images"].items()]
    settings = [("defaults", config.get("defaults", {}))]
    settings += [(f"cells[{index}]", group) for index, group in enumerate(config["cells"])]
    for where, group in settings:
        tables.append((f"{where}.engine_args", group.get("engine_args", {})))
        tables.append((f"{where}.env", group.get("env", {})))
        tables.append((f"{where}.axes", group.get("axes", {})))
    for where, table in tables:
        for name in table:
            if contract.is_secret_name(name.split(".", 1)[-1]):
                raise ConfigError(
                    f"config: {where}.{name} looks like a secret; export it in the shell instead, "
                    "cellbench passes it to the container without writing it down"
                )


def _check_engine(cell: dict, model: dict, where: str) -> None:
    """What the cell's engine declares it can run (cellbench.contract)."""
    engine = contract.ENGINES[cell["engine"]]  # the schema's enum lists the declared ones
    if engine.weights_as_stored and cell["dtype"] != "auto":
        raise ConfigError(
            f"{where}: dtype {cell['dtype']!r}: a {engine.name} cell runs its model file as stored, use dtype auto"
        )
    suffix = engine.model_file_suffix
    if suffix and not model.get("file", "").endswith(suffix):
        raise ConfigError(f"{where}: model {cell['model']!r} has no {suffix} file for the {engine.name} engine")
    if engine.quantizations is not None and cell["quantization"] and cell["quantization"] not in engine.quantizations:
        can = ", ".join(engine.quantizations) or "none: it runs the prepared bf16/fp32 weights"
        raise ConfigError(f"{where}: quantization {cell['quantization']!r}: the {engine.name} engine takes {can}")
    if cell["mode"] == "serve" and not engine.serve:
        served = ", ".join(name for name, e in sorted(contract.ENGINES.items()) if e.serve)
        raise ConfigError(f"{where}: mode serve is implemented for {served} cells only, not {engine.name}")


def _check_resources(cells: list[dict]) -> None:
    """Settings that each pass the schema but cannot hold together."""
    for cell in cells:
        where = f"config: cell {cell['name']}"
        gpus = cell["resources"].get("gpus", 0)
        if cell["device"] == "cpu" and gpus:
            raise ConfigError(
                f"{where}: resources.gpus is {gpus} but image {cell['image']!r} is a cpu image; expected 0"
            )
        if cell["device"] in ("rocm", "cuda") and gpus < 1:
            raise ConfigError(f"{where}: a {cell['device']} cell has resources.gpus {gpus}; expected at least 1")
        tensor_parallel = cell["engine_args"].get("tensor_parallel_size", 1)
        if cell["device"] in ("rocm", "cuda") and isinstance(tensor_parallel, int) and tensor_parallel > max(gpus, 1):
            raise ConfigError(
                f"{where}: engine_args.tensor_parallel_size is {tensor_parallel} but resources.gpus gives "
                f"{gpus}; expected resources.gpus >= {tensor_parallel}"
            )


def _check_paths(config: dict) -> None:
    """Build contexts and wheelhouse locks exist, and each lock answers its requirements, before any job is planned."""
    for name, image in config["images"].items():
        context = PROJECT_ROOT / image["context"]
        if not (context / "Dockerfile").is_file():
            raise ConfigError(
                f"config: images.{name}.context: {_quote(image['context'])} has no Dockerfile; "
                "expected a folder under the project root holding one"
            )
        wheelhouse = image.get("wheelhouse")
        if wheelhouse and not (context / wheelhouse).is_file():
            raise ConfigError(
                f"config: images.{name}.wheelhouse: {_quote(wheelhouse)} is not a file in {_cut(image['context'])}; "
                "expected a lock file there (scripts/lock_images.sh makes one)"
            )
        if wheelhouse:
            try:
                locks.check_lock_file(context / wheelhouse, f"{image['context']}/{wheelhouse}")
            except locks.LockError as err:
                raise ConfigError(f"config: images.{name}.wheelhouse: {err}") from None


def statistics(config: dict) -> dict:
    """The study's `statistics` settings over the schema's defaults."""
    props = load_schema()["properties"]["statistics"]["properties"]
    return {key: (config.get("statistics") or {}).get(key, prop["default"]) for key, prop in props.items()}


def resolve(config: dict) -> dict:
    """Validate a study and return {"cells": {id: cell}, "baseline": id, ...}; raise ConfigError."""
    validate(config)
    _check_secrets(config)
    cells = expand_cells(config)
    _check_references(config, cells)
    _check_expectations(config)
    _check_resources(cells)
    _check_paths(config)
    by_name = {cell["name"]: cell for cell in cells}
    return {
        "study": config["study"],
        "config_hash": config_hash(config),
        "cells": {cell["id"]: cell for cell in cells},
        "baseline": by_name[config["baseline"]]["id"],
        "statistics": statistics(config),
    }
