"""Study config: validation against the one JSON schema, expansion into cells, stable cell ids.

A cell is a plain dict. Its id is a readable name plus a short hash of the canonical JSON of
everything that decides what is measured (image name, model, engine, dtype, quantization,
engine args, env, mode, sweep; the serve settings of a serve cell, the quality settings when
quality is on). Nothing machine-specific (timeouts, CPU pinning, memory limits, image digests)
goes into the hash, so the same study gives the same ids on every machine.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import atomic, contract, datasets, paths, serving

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


class ConfigError(ValueError):
    """A study that cannot run; the message is one line naming the key at fault."""

    def __init__(self, message: str):
        # One line, whatever a message quotes: a safety net under quote().
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…")


MAX_MESSAGE = 400  # characters of a ConfigError
MAX_QUOTE = 80  # characters of a value quoted in a message
# Bounds of what a study file may make the loader build (a hostile file is a bomb otherwise).
MAX_DEPTH = 64  # nesting levels
MAX_NODES = 200_000  # values after expanding YAML aliases (a "billion laughs" file is refused)
YTE_KEY = "__use_yte__"
# Bounds of what a study may ask of the file system and of command lines (accepted values that
# would only fail at run time). A cell's settings travel as JSON on its rule's command line, which
# Snakemake hands to `bash -c` as one argument: Linux refuses one over 128 KiB (MAX_ARG_STRLEN).
MAX_STRING = 4096  # bytes of any string in a study (UTF-8)
MAX_TEXT = 16384  # bytes of prose: `description` and an expectation's `source`
TEXT_KEYS = ("description", "source")
MAX_ARGV_JSON = 32768  # bytes of one value given to a rule's command line as JSON
MAX_ID = 128  # bytes of a cell id (it names the cell's folder) and of any id an archive carries
MACHINE_ID_ENV = "CELLBENCH_MACHINE_ID"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 1] + "…"


def quote(value: Any) -> str:
    """repr() of a value for a message, cut to MAX_QUOTE characters: a name someone typed is
    shown with its control characters escaped and never floods the terminal."""
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
                    problem = f"key {quote(key)} appears twice (first on line {line + 1})"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_data_file(path: Path):
    """One of cellbench's own YAML data files (the schema, log signatures, device table), with
    libyaml's parser where PyYAML has it: the pure-Python one took 0.2-0.8 s for the schema, in
    every snakemake invocation and every cell's run. Studies, which come from users, are read
    with StudyLoader instead (its bounds need the Python composer)."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


@functools.cache
def load_schema() -> dict:
    schema = load_data_file(SCHEMA_PATH)
    # The engines are those the contract declares (one list for the schema, the host and the container).
    schema["$defs"]["cell_settings"]["properties"]["engine"]["enum"] = list(contract.ENGINES)
    return schema


def _json_pairs(pairs: list) -> dict:
    """A JSON object, refusing a key given twice (json keeps the last one silently)."""
    mapping: dict = {}
    for key, value in pairs:
        if key in mapping:
            raise ConfigError(f"key {quote(key)} appears twice in one JSON object")
        mapping[key] = value
    return mapping


def _load_json(text: str):
    """The document as JSON (Snakemake reads a --configfile as JSON first, then as YAML: a JSON
    study must mean here what it means there, `1e-3` a number); None when it is not JSON."""
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except RecursionError:
        raise ConfigError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        return None


def load_study(path: str | Path) -> dict:
    """Read a study file the one way every entry point reads it: as JSON when it is JSON (as
    Snakemake does), else with StudyLoader (plain YAML, never evaluated); a missing file, bytes
    that are not UTF-8, bad YAML or JSON, or a bomb become a one-line ConfigError."""
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
        config = _load_json(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        if config is None:
            config = yaml.load(text, Loader=StudyLoader)  # noqa: S506 (StudyLoader is a SafeLoader)
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ConfigError(f"{path}: {_cut(str(exc))}") from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{path}: character {exc.position}: {exc.reason} ({quote(exc.character)})") from None
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


def _update(base: dict, override: dict) -> dict:
    """Snakemake's update_config: nested mappings merge key by key, anything else replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def load_studies(paths) -> dict:
    """The study of one or more files, each read by load_study and merged as Snakemake merges
    several --configfile. The Snakefile uses this instead of the config Snakemake loaded: its
    loader drops duplicate keys, removes `__use_yte__` after evaluating the template, takes alias
    bombs and reads JSON's NaN and Infinity; with the same loader, the pipeline and `cellbench
    validate` see the same values and give the same answer."""
    study: dict = {}
    for path in paths:
        _update(study, load_study(path))
    return study


def read(paths, overrides: dict | None = None) -> tuple[dict, dict]:
    """(study, resolved) of study files: the one reading and validation behind `cellbench
    validate` (and every command given --configfile) and the Snakefile. `overrides`: Snakemake's
    --config KEY=VALUE, merged last as Snakemake merges them."""
    study = load_studies([paths] if isinstance(paths, str | Path) else paths)
    if overrides:
        _update(study, overrides)
    return study, resolve(study)


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
        yield jsonschema.ValidationError(f"{quote(instance)} does not match {pattern!r}")


def is_int(value) -> bool:
    """An integer is an int: not a bool, and not a float with an integral value (JSON Schema's
    "integer" takes 2.0, which would then pass a check written for ints and fail at run time)."""
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def _validator_class():
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", lambda _checker, value: is_int(value))
    return jsonschema.validators.extend(base, {"pattern": _pattern}, type_checker=checker)


def validate(config: dict) -> None:
    """Validate against the schema; raise ConfigError naming the first offending key."""
    check_plain(config)
    validator = _validator_class()(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), [str(p) for p in e.path]))
    if not errors:
        _check_values(config)
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
            f"config: {_key_path(error)}: {what} {quote(error.instance)} is not valid; expected {expected}"
        ) from None
    # A `not` says what is refused ("True should not be valid under ..."); the description says
    # what is expected (quality: false or an object).
    if error.validator == "not" and error.schema.get("description"):
        expected = " ".join(error.schema["description"].split()).split(":")[0]  # its first clause
        raise ConfigError(f"config: {_key_path(error)}: {quote(error.instance)} is not valid; expected {expected}")
    # jsonschema's messages quote the whole instance (a long string, a big mapping): cut it.
    message = error.message.replace(repr(error.instance), quote(error.instance))
    raise ConfigError(f"config: {_key_path(error)}: {message}") from None


def _values(value, where: tuple = ()):
    """(key path, value) of every key and value in a study, keys as ("key", name) items."""
    stack = [(where, value)]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, dict):
            for key, item in value.items():
                yield (*where, ("key", key)), key
                stack.append(((*where, key), item))
        elif isinstance(value, list):
            stack.extend(((*where, index), item) for index, item in enumerate(value))


def _where(path: tuple) -> str:
    parts = []
    for part in path:
        if isinstance(part, tuple):  # a key itself
            parts.append(f".{_cut(str(part[1]))}")
        else:
            parts.append(f"[{part}]" if isinstance(part, int) else f".{_cut(str(part))}")
    return "".join(parts).lstrip(".") or "<top>"


def _check_values(config: dict) -> None:
    """What a schema keyword cannot say of every value at once: numbers are finite (JSON's NaN
    and Infinity, YAML's .nan and .inf pass `type: number` and every bound), and no string is
    so long that it breaks a command line or a file name at run time."""
    for where, value in _values(config):
        if where and isinstance(where[-1], tuple) and not isinstance(value, str):
            raise ConfigError(f"config: {_where(where[:-1])}: key {quote(value)} is not a string; quote it")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config: {_where(where)}: {value} is not a finite number")
        if isinstance(value, str):
            size = len(value.encode("utf-8", "surrogatepass"))
            text = bool(where) and not isinstance(where[-1], tuple) and where[-1] in TEXT_KEYS
            most = MAX_TEXT if text else MAX_STRING
            if size > most:
                what = "key" if where and isinstance(where[-1], tuple) else "string"
                raise ConfigError(
                    f"config: {_where(where)}: {quote(value[:MAX_QUOTE])} is a {what} of {size} bytes; at most {most} "
                    "(study values travel on command lines and in file names)"
                )


def check_machine_id(value: Any, key: str) -> str:
    """A machine id (the study's machine_id or CELLBENCH_MACHINE_ID) by the schema's own
    machine_id pattern and length; ConfigError naming `key` otherwise."""
    schema = {k: v for k, v in load_schema()["properties"]["machine_id"].items() if k != "type"}
    schema["type"] = "string"
    if next(iter(_validator_class()(schema).iter_errors(value)), None) is not None:
        raise ConfigError(f"{key}: value {quote(value)} is not valid; expected {schema['description']}")
    return value


def check_environment(environ=None) -> None:
    """Settings taken from the environment, checked like the study's own."""
    environ = os.environ if environ is None else environ
    if environ.get(MACHINE_ID_ENV):
        check_machine_id(environ[MACHINE_ID_ENV], MACHINE_ID_ENV)


def schema_defaults() -> dict:
    """Cell settings defaults, read from the schema's `default` keywords (one source of truth)."""
    defs = load_schema()["$defs"]
    settings = {}
    for key, prop in defs["cell_settings"]["properties"].items():
        if "default" in prop:
            settings[key] = copy.deepcopy(prop["default"])
    for nested in ("sweep", "resources", "telemetry"):
        settings[nested] = {
            key: copy.deepcopy(prop["default"]) for key, prop in defs[nested]["properties"].items() if "default" in prop
        }
    return settings


# Settings a group gives whole: a dataset's keys depend on its kind, so they do not merge.
REPLACED_WHOLE = ("dataset",)


def _merge(base: dict, override: dict) -> dict:
    """Settings merge: nested dicts (engine_args, env, sweep, resources) merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in REPLACED_WHOLE:
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
    if cell["quality"] is not False:  # so a study with quality off keeps the ids it had before
        identity["quality"] = cell["quality"]
    if cell.get("profile"):  # likewise: a study without profiles keeps its ids
        identity["profile"] = cell["profile"]
    dataset = datasets.identity(cell.get("dataset", datasets.DEFAULT))
    if dataset is not None:  # likewise: random prompts (the default) keep the ids cells had
        identity["dataset"] = dataset
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:10]


# Settings of where a study runs, not of what it measures: outside the config hash.
DEPLOYMENT_KEYS = ("image_archives",)


def config_hash(config: dict) -> str:
    measured = {key: value for key, value in config.items() if key not in DEPLOYMENT_KEYS}
    return hashlib.sha256(canonical_json(measured).encode()).hexdigest()[:16]


def plain_copy(value):
    """A deep copy of plain data (dicts, lists, scalars: what a study holds), several times
    faster than copy.deepcopy, which a 10,000-cell study called 10,000 times (1-4 s)."""
    if isinstance(value, dict):
        return {key: plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_copy(item) for item in value]
    return value


def expand_cells(config: dict) -> list[dict]:
    """Every cell of the study, resolved: defaults <- study defaults <- group <- axis values."""
    base = _merge(schema_defaults(), config.get("defaults", {}))
    cells = []
    for group in config["cells"]:
        settings = _merge(base, {k: v for k, v in group.items() if k not in ("name", "axes")})
        axes = group.get("axes", {})
        for values in itertools.product(*axes.values()):
            cell = plain_copy(settings)
            labels = [group["name"]]
            for key, value in zip(axes, values, strict=True):
                _set_axis(cell, key, value)
                labels.append(_axis_label(key, value))
            if cell["quality"] is not False:  # a group's {prompts: 40} over `quality: false` defaults
                cell["quality"] = {**quality_defaults(), **cell["quality"]}
            if cell.get("profile"):
                cell["profile"] = {"steps": 1, **cell["profile"]}
            cell["name"] = slugify("-".join(labels))
            try:
                cell["dataset"] = datasets.check(cell["dataset"], cell)
            except datasets.DatasetError as error:
                raise ConfigError(f"config: cell {cell['name']}: {error}") from None
            if cell["dataset"]["kind"] in datasets.FROM_FILE:  # every request has its own lengths
                fixed = [datasets.DATASET_LEN]
                cell["sweep"] = {**cell["sweep"], "input_len": fixed, "output_len": fixed}
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
        _check_engine(cell, config["models"][cell["model"]], where)
        if cell["name"] in seen:
            raise ConfigError(f"{where}: two cells resolve to the same name")
        seen[cell["name"]] = cell["id"]
    if config["baseline"] not in seen:
        raise ConfigError(
            f"config: baseline: {quote(config['baseline'])} is not a cell name (cells: {_cut(', '.join(sorted(seen)))})"
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
            raise ConfigError(f"config: bandwidth_gb_s: {quote(pattern)} is not a valid regex ({exc})") from None


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
    _check_profile(cell, engine, where)
    if cell["mode"] == "serve":
        _check_serve(cell, where)
    if cell["mode"] == "serve" and engine.name == "llamacpp":
        try:  # the rule the container renders llama-server's command line with (levels checked above)
            contract.llama_server_flags(
                cell["engine_args"], serving.most_in_flight(cell["serve"], cell["sweep"]["batch_size"])
            )
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None


# serve keys that only load levels use.
LEVEL_KEYS = ("burstiness", "requests_per_level", "warmup_requests", "slo")


def _check_serve(cell: dict, where: str) -> None:
    """Load levels, SLO and search settings that pass the schema one by one but not together."""
    serve = cell["serve"]
    found = serving.settings(serve)
    scalar_rate = isinstance(serve.get("request_rate"), int | float) and not isinstance(serve.get("request_rate"), bool)
    if scalar_rate and (found["concurrency"] or found["search"]):
        raise ConfigError(
            f"{where}: serve.request_rate: one number is the older per-point rate; with load levels "
            f"give a list, e.g. request_rate: [{serve['request_rate']}]"
        )
    if not serving.has_levels(serve):
        given = [key for key in LEVEL_KEYS if key in serve]
        if given:
            raise ConfigError(
                f"{where}: serve.{given[0]} applies to load levels; add serve.concurrency, a request_rate list "
                "or serve.search"
            )
        return
    batch = cell["sweep"]["batch_size"]
    if len(batch) > 1:
        raise ConfigError(
            f"{where}: sweep.batch_size {batch}: a cell with load levels takes its load from serve "
            "(concurrency, request_rate); give one batch_size"
        )
    search = found["search"]
    rates = bool(found["request_rate"]) or (search or {}).get("metric") == "request_rate"
    if "burstiness" in serve and not rates:
        raise ConfigError(f"{where}: serve.burstiness applies to request_rate levels; the cell has none")
    if not search:
        return
    if not found["slo"]:
        raise ConfigError(f"{where}: serve.search needs serve.slo: the budgets a probed load must hold")
    if search["low"] >= search["high"]:
        raise ConfigError(f"{where}: serve.search.low {search['low']} is not below high {search['high']}")
    if search["metric"] == "concurrency":
        for key in ("low", "high", "resolution"):
            if not float(search[key]).is_integer():
                raise ConfigError(f"{where}: serve.search.{key}: {search[key]} is not a whole concurrency")


def _check_profile(cell: dict, engine: contract.Engine, where: str) -> None:
    """A profile asks for a point the cell measures, of an engine that has a profiler."""
    profile = cell.get("profile")
    if not profile:
        return
    if engine.profiler is None:
        can = ", ".join(name for name, e in sorted(contract.ENGINES.items()) if e.profiler)
        raise ConfigError(f"{where}: profile: the {engine.name} engine has no profiler (profiles: {can})")
    if cell["mode"] == "serve":
        raise ConfigError(f"{where}: profile: a serve cell cannot be profiled (its engine runs in the server)")
    point = profile["point"]
    sweep = cell["sweep"]
    for key in ("batch_size", "input_len", "output_len"):
        if point[key] not in sweep[key]:
            raise ConfigError(
                f"{where}: profile.point.{key}: {point[key]} is not in the cell's sweep ({key}: {sweep[key]})"
            )


def cpuset_cpus(cpuset: str) -> list[int]:
    """The CPUs of a --cpuset-cpus list such as '0-3,8', parsed strictly (no empty part, every
    range low <= high, no CPU twice); ConfigError naming resources.cpus otherwise. Empty: []."""
    if cpuset == "":
        return []
    cpus: list[int] = []
    for part in cpuset.split(","):
        match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part)
        if not match:
            raise ConfigError(f"resources.cpus: {quote(cpuset)} is not a CPU list like '0-3,8' (part {quote(part)})")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if low > high:
            raise ConfigError(f"resources.cpus: {quote(cpuset)}: range {part} runs backwards; expected low-high")
        cpus.extend(range(low, high + 1))
    if len(cpus) != len(set(cpus)):
        raise ConfigError(f"resources.cpus: {quote(cpuset)} names a CPU twice")
    return cpus


MIN_MEMORY_MB = 6  # docker refuses a --memory limit below 6 MB
_UNIT_MB = {"k": 1 / 1024, "m": 1, "g": 1024, "": 1 / 2**20}


def memory_mb(memory: str) -> float:
    """A docker size ('12g', '512m', bytes without a unit) in MB; empty (no limit) is 0."""
    if not memory:
        return 0
    number, unit = (memory[:-1], memory[-1]) if memory[-1].isalpha() else (memory, "")
    if not number.isdigit() or unit not in _UNIT_MB:
        raise ConfigError(f"resources.memory: {quote(memory)} is not a size like '12g'")
    return int(number) * _UNIT_MB[unit]


# engine_args that count GPUs: their product is the GPUs a vLLM engine needs.
PARALLEL_ARGS = ("tensor_parallel_size", "pipeline_parallel_size")


def _check_resources(cells: list[dict]) -> None:
    """Settings that each pass the schema but cannot hold together."""
    for cell in cells:
        where = f"config: cell {cell['name']}"
        try:
            cpuset_cpus(cell["resources"].get("cpus", ""))
            memory = cell["resources"].get("memory", "")
            if memory and memory_mb(memory) < MIN_MEMORY_MB:
                raise ConfigError(f"resources.memory: {quote(memory)} is below docker's minimum of {MIN_MEMORY_MB}m")
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        for arg in PARALLEL_ARGS:
            value = cell["engine_args"].get(arg, 1)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{where}: engine_args.{arg} is {quote(value)}; expected an integer of at least 1")
        gpus = cell["resources"].get("gpus", 0)
        if cell["device"] == "cpu" and gpus:
            raise ConfigError(
                f"{where}: resources.gpus is {gpus} but image {cell['image']!r} is a cpu image; expected 0"
            )
        if cell["device"] in ("rocm", "cuda") and gpus < 1:
            raise ConfigError(f"{where}: a {cell['device']} cell has resources.gpus {gpus}; expected at least 1")
        tensor_parallel = cell["engine_args"].get("tensor_parallel_size", 1)
        pipeline_parallel = cell["engine_args"].get("pipeline_parallel_size", 1)
        if cell["device"] in ("rocm", "cuda") and tensor_parallel * pipeline_parallel > max(gpus, 1):
            asked, needs = f"engine_args.tensor_parallel_size is {tensor_parallel}", tensor_parallel
            if pipeline_parallel > 1:
                needs = tensor_parallel * pipeline_parallel
                asked += f" and engine_args.pipeline_parallel_size is {pipeline_parallel}"
            raise ConfigError(f"{where}: {asked} but resources.gpus gives {gpus}; expected resources.gpus >= {needs}")


def _inside(base: Path, label: str, value: str, key: str, expected: str) -> Path:
    """`value` (relative to `base`, called `label` in messages) resolved, symlinks followed;
    ConfigError naming `key` when it is absolute or ends up outside `base` (`..`, a link to a
    system file or to a sibling's)."""
    if value.startswith("/"):
        raise ConfigError(f"config: {key}: {quote(value)} is an absolute path; expected {expected}")
    root = base.resolve()
    target = (base / value).resolve()
    if not target.is_relative_to(root):
        raise ConfigError(f"config: {key}: {quote(value)} leads outside {label}; expected {expected}")
    return target


def _check_tree(folder: Path, key: str, label: str) -> None:
    """No file or folder in a build context links outside the project (its copy would take the
    target's content into the image)."""
    root = paths.PROJECT_ROOT.resolve()
    for parent, dirs, files in os.walk(folder):
        for entry in [*dirs, *files]:
            path = Path(parent) / entry
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                rel = path.relative_to(folder)
                raise ConfigError(
                    f"config: {key}: {_cut(f'{label}/{rel}')} links outside the project root; "
                    "expected a folder under the project root"
                )


def _check_paths(config: dict) -> None:
    """Build contexts and wheelhouse locks are inside the project and exist, and each lock answers
    its requirements, before any job is planned. Every other path-like value (model file,
    package, revision, repo id, base tag) has a strict pattern in the schema."""
    for name, image in config["images"].items():
        key = f"images.{name}.context"
        context = _inside(
            paths.PROJECT_ROOT, "the project root", image["context"], key, "a folder under the project root"
        )
        if context == paths.PROJECT_ROOT.resolve():
            raise ConfigError(
                f"config: {key}: {quote(image['context'])} is the project root itself; expected a folder under it"
            )
        if not (context / "Dockerfile").is_file():
            raise ConfigError(
                f"config: images.{name}.context: {quote(image['context'])} has no Dockerfile; "
                "expected a folder under the project root holding one"
            )
        _check_tree(context, key, _cut(image["context"]))
        wheelhouse = image.get("wheelhouse")
        if wheelhouse:
            _inside(
                context,
                _cut(image["context"]),
                wheelhouse,
                f"images.{name}.wheelhouse",
                f"a lock file inside the image's context {_cut(image['context'])}",
            )
        if wheelhouse and not (context / wheelhouse).is_file():
            raise ConfigError(
                f"config: images.{name}.wheelhouse: {quote(wheelhouse)} is not a file in {_cut(image['context'])}; "
                "expected a lock file there (scripts/lock_images.sh makes one)"
            )
        if wheelhouse:
            from . import locks  # packaging's import is paid where a study is read, not in every cell's run-cell

            try:
                locks.check_lock_file(context / wheelhouse, f"{image['context']}/{wheelhouse}")
            except locks.LockError as err:
                raise ConfigError(f"config: images.{name}.wheelhouse: {err}") from None


def _check_lengths(config: dict, cells: list[dict]) -> None:
    """What is accepted here must not fail at run time for its size: a cell id names the cell's
    folder (NAME_MAX is 255 bytes; the archive takes at most MAX_ID), and the JSON that rules
    hand to their command lines stays far below Linux's 128 KiB for one argument."""
    for cell in cells:
        size = len(cell["id"].encode())
        if size > MAX_ID:
            raise ConfigError(
                f"config: cell {_cut(cell['name'])}: its id is {size} bytes; at most {MAX_ID} "
                "(it names the cell's folder): shorten the group name or the axis values"
            )
    sized = [(f"cell {_cut(cell['name'])}", cell) for cell in cells]
    sized += [(f"images.{name}", image) for name, image in config["images"].items()]
    sized += [(f"models.{name}", model) for name, model in config["models"].items()]
    sized += [("expectations", config.get("expectations", [])), ("bandwidth_gb_s", config.get("bandwidth_gb_s", {}))]
    for where, value in sized:
        size = len(json.dumps(value, sort_keys=True).encode())
        if size > MAX_ARGV_JSON:
            raise ConfigError(
                f"config: {where}: {size} bytes as JSON; at most {MAX_ARGV_JSON} (it travels on a command line)"
            )


def study_record(config: dict, resolved: dict) -> dict:
    """What the tables are made of, as a pure function of the study: written to
    paths.study_file() and an input of the table rules, so that switching studies (or changing
    one) rebuilds the tables even where Snakemake's metadata is gone. Nothing machine-specific."""
    return {
        "study": resolved["study"],
        "config_hash": resolved["config_hash"],
        "baseline": resolved["baseline"],
        "statistics": resolved["statistics"],
        "quality_tolerance": resolved["quality_tolerance"],
        "cells": {cell_id: cell["sweep"]["rounds"] for cell_id, cell in sorted(resolved["cells"].items())},
        "config": config,
    }


def write_study_record(path: Path, config: dict, resolved: dict) -> bool:
    """Write the study record atomically, only when its content changed (its mtime is what the
    tables are compared with); True when written."""
    text = json.dumps(study_record(config, resolved), indent=1, sort_keys=True) + "\n"
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    atomic.write_text(path, text)
    return True


def quality_defaults() -> dict:
    """The quality step's settings when a study turns it on without giving them all."""
    return copy.deepcopy(load_schema()["$defs"]["cell_settings"]["properties"]["quality"]["default"])


def quality_tolerance(config: dict) -> dict:
    """The study's `quality_tolerance` over the schema's defaults; drift may not exceed diverged."""
    props = load_schema()["properties"]["quality_tolerance"]["properties"]
    given = config.get("quality_tolerance") or {}
    tolerance = {key: given.get(key, prop["default"]) for key, prop in props.items()}
    if tolerance["drift"] > tolerance["diverged"]:
        raise ConfigError(
            f"config: quality_tolerance.drift: {tolerance['drift']} is above diverged ({tolerance['diverged']}); "
            "a cell drifts before it diverges"
        )
    return tolerance


def statistics(config: dict) -> dict:
    """The study's `statistics` settings over the schema's defaults."""
    props = load_schema()["properties"]["statistics"]["properties"]
    return {key: (config.get("statistics") or {}).get(key, prop["default"]) for key, prop in props.items()}


def resolve(config: dict) -> dict:
    """Validate a study and return {"cells": {id: cell}, "baseline": id, ...}; raise ConfigError."""
    validate(config)
    check_environment()
    _check_secrets(config)
    cells = expand_cells(config)
    _check_references(config, cells)
    _check_expectations(config)
    _check_resources(cells)
    _check_paths(config)
    _check_lengths(config, cells)
    by_name = {cell["name"]: cell for cell in cells}
    return {
        "study": config["study"],
        "config_hash": config_hash(config),
        "cells": {cell["id"]: cell for cell in cells},
        "baseline": by_name[config["baseline"]]["id"],
        "statistics": statistics(config),
        "quality_tolerance": quality_tolerance(config),
    }
