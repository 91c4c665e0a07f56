"""Datasets: prompt files read and refused on the host, the shipped set, shared prefixes and the
requests a point sends in the container, the dataset columns, and ids of studies without one."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
from cellbench import config, datasets, measure, paths
from cellbench.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SHA256 = "4e389cee768832f17d7b25c73e9b39efaa9c05b2aaf5cad5b839d0a63cc44398"

# Cell ids of the studies in config/ before datasets existed: a study without a dataset keeps them.
GOLDEN_IDS = {
    "config.yaml": [
        "vllm-bfloat16-enforce_eager-6ec5904aaa",
        "vllm-float32-enforce_eager-21c423e2bf",
        "vllm-compiled-f0f4169770",
        "llamacpp-b9a7c8365a",
    ],
    "cuda-awq.yaml": [
        "qwen3-8b-bf16-no_enforce_eager-0610cf67a1",
        "qwen3-8b-bf16-enforce_eager-f2ef32e5de",
        "qwen3-8b-awq-no_enforce_eager-6ab0f13207",
        "qwen3-8b-awq-enforce_eager-5020469fea",
        "qwen3-8b-awq-no-triton-no_enforce_eager-8983bf60cb",
        "qwen3-8b-awq-no-triton-enforce_eager-cbdb99027f",
        "qwen3-8b-awq-triton-no_enforce_eager-7a100fb890",
        "qwen3-8b-awq-triton-enforce_eager-104317b790",
        "qwen2.5-7b-gptq-no_enforce_eager-e548886e01",
        "qwen2.5-7b-gptq-enforce_eager-5f9f2311d1",
        "qwen2.5-7b-bf16-no_enforce_eager-d60f379b7b",
        "qwen2.5-7b-bf16-enforce_eager-82b74482d1",
        "qwen3-8b-awq-marlin-no_enforce_eager-54f7046d7d",
        "qwen3-8b-awq-marlin-enforce_eager-c866c8db42",
        "qwen2.5-7b-gptq-marlin-no_enforce_eager-8cc97cfb4a",
        "qwen2.5-7b-gptq-marlin-enforce_eager-99025265e0",
    ],
    "rocm-awq.yaml": [
        "qwen3-8b-bf16-no_enforce_eager-32dceceed3",
        "qwen3-8b-bf16-enforce_eager-2a2e57ef81",
        "qwen3-8b-awq-no_enforce_eager-5f405da679",
        "qwen3-8b-awq-enforce_eager-8356c89e77",
        "qwen3-8b-awq-no-triton-no_enforce_eager-450cf4ced1",
        "qwen3-8b-awq-no-triton-enforce_eager-bd6c6f33db",
        "qwen2.5-7b-gptq-no_enforce_eager-34dd8897f3",
        "qwen2.5-7b-gptq-enforce_eager-70a64edd8b",
        "qwen2.5-7b-bf16-no_enforce_eager-e139025688",
        "qwen2.5-7b-bf16-enforce_eager-317ace1b9a",
    ],
}


def _cells(study: dict) -> list[dict]:
    return list(config.resolve(study)["cells"].values())


def _with_dataset(study: dict, dataset: dict, **group) -> dict:
    study = copy.deepcopy(study)
    study["cells"].append({"name": "ds", "dataset": dataset, **group})
    return study


def _write(tmp_path: Path, text: str | bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --- Ids of studies without a dataset --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_IDS))
def test_studies_without_a_dataset_keep_their_cell_ids(name):
    _, resolved = config.read(ROOT / "config" / name)
    assert list(resolved["cells"]) == GOLDEN_IDS[name]


def test_an_explicit_random_dataset_is_the_default_and_keeps_the_id(study):
    before = {cell["name"]: cell["id"] for cell in _cells(study)}
    study["defaults"]["dataset"] = {"kind": "random"}
    after = {cell["name"]: cell["id"] for cell in _cells(study)}
    assert after == before
    assert all(cell["dataset"] == {"kind": "random"} for cell in _cells(study))


# --- Reading prompt files --------------------------------------------------------------------


def test_jsonl_prompts_with_their_lines_and_sha256():
    data = b'{"prompt": "To be", "output_len": 5}\n\n{"prompt": "or not", "output_len": 7, "id": "x"}\n'
    found = datasets.parse(data, "p.jsonl")
    assert found["entries"] == [
        {"line": 1, "prompt": "To be", "output_len": 5, "completion": None},
        {"line": 3, "prompt": "or not", "output_len": 7, "completion": None},  # a blank line 2, other keys ignored
    ]
    assert found["sha256"] == hashlib.sha256(data).hexdigest() and found["skipped"] == 0


def test_a_sharegpt_array_is_read_as_vllms_loader_reads_it():
    data = """[
  {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
  {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
  {"id": "c",
   "conversations": [{"from": "gpt", "value": "first"}, {"from": "human", "value": "second"},
                     {"from": "gpt", "value": "third"}]}
]
"""
    found = datasets.parse(data.encode(), "sg.json")
    # Turns 0 and 1 whatever their "from" (vLLM's rule); one turn only: skipped; lines of each object.
    assert found["entries"] == [
        {"line": 2, "prompt": "Hi", "output_len": None, "completion": "Hello there"},
        {"line": 4, "prompt": "first", "output_len": None, "completion": "second"},
    ]
    assert found["skipped"] == 1
    fixed = datasets.parse(data.encode(), "sg.json", output_len=9)
    assert [entry["output_len"] for entry in fixed["entries"]] == [9, 9]


def test_dataset_output_len_replaces_each_entry_s_and_prompts_takes_the_first_n():
    data = b'{"prompt": "a", "output_len": 5}\n{"prompt": "b"}\n{"prompt": "c", "output_len": 2}\nnot json\n'
    found = datasets.parse(data, "p.jsonl", output_len=3, prompts=2)
    assert [(e["prompt"], e["output_len"]) for e in found["entries"]] == [("a", 3), ("b", 3)]
    # Lines after the first N usable entries are not read: line 4 is no error here.
    assert len(datasets.parse(data, "p.jsonl", output_len=3, prompts=3)["entries"]) == 3


BAD_FILES = [
    (b"", "the file is empty; expected one JSON object per line, or a JSON array"),
    (b"\n  \n", "the file is empty; expected one JSON object per line, or a JSON array"),
    (b'{"prompt": "a", "output_len": 1}\n{"prompt": "\xff"}\n',
     "line 2: byte 45 (0xff) is not UTF-8; a prompt file is UTF-8"),
    (b'{"prompt": "a", "output_len": 1}\n{"prompt": "b", "output_len": 2\n',
     "line 2: not JSON (Expecting ',' delimiter, column 32)"),
    (b'{"prompt": "a", "output_len": 1}\n\n{"text": "b"}\n',
     'line 3: no prompt (expected a "prompt" string or a ShareGPT "conversations" list)'),
    (b'{"prompt": "a", "output_len": -3}\n', "line 1: output_len -3 is not a positive integer"),
    (b'{"prompt": "a", "output_len": 0}\n', "line 1: output_len 0 is not a positive integer"),
    (b'{"prompt": "a", "output_len": true}\n', "line 1: output_len true is not a positive integer"),
    (b'{"prompt": "a", "output_len": 2.5}\n', "line 1: output_len 2.5 is not a positive integer"),
    (b'{"prompt": "a"}\n', "line 1: no output_len (give one per line, or dataset.output_len for every request)"),
    (b'{"prompt": "", "output_len": 1}\n', 'line 1: prompt is "", expected a non-empty string'),
    (b'{"prompt": 7, "output_len": 1}\n', "line 1: prompt is 7, expected a non-empty string"),
    (b'["a"]\n', "line 1: expected a JSON object, found str"),
    (b'{"conversations": "hi"}\n', "line 1: conversations is str, expected a list of turns"),
    (b'{"conversations": [{"value": "a"}, {"from": "gpt"}]}\n', 'line 1: conversations[1] has no text "value"'),
    (b'{"conversations": [{"value": "a"}]}\n',
     "no usable entry (1 conversations of fewer than two turns, skipped as vLLM does)"),
    (b'[\n {"prompt": "a", "output_len": 1}\n {"prompt": "b", "output_len": 1}\n]\n',
     "line 3: expected ',' or ']', found '{'"),
    (b'[\n {"prompt": "a", "output_len": 1},\n {"prompt": "b", "output_len": }\n]',
     "line 3: not JSON (Expecting value, column 32)"),
    (b'[{"prompt": "a", "output_len": 1}]\n\nmore\n', "line 3: text after the JSON array"),
    (b'[{"prompt": "a", "output_len": 1}', "line 1: expected ',' or ']', found end of file"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "problem"), BAD_FILES)
def test_a_bad_prompt_file_is_one_line_naming_the_file_and_line(data, problem):
    with pytest.raises(datasets.DatasetError) as raised:
        datasets.parse(data, "data/p.jsonl")
    assert str(raised.value) == f"data/p.jsonl: {problem}"


def test_more_entries_than_travel_to_a_cell_need_prompts(monkeypatch):
    monkeypatch.setattr(datasets, "MAX_ENTRIES", 2)
    data = b'{"prompt": "a", "output_len": 1}\n' * 3
    with pytest.raises(datasets.DatasetError, match=r"^p: more than 2 usable entries; set dataset.prompts"):
        datasets.parse(data, "p")
    assert len(datasets.parse(data, "p", prompts=2)["entries"]) == 2


# --- The study: validation, ids, the sweep --------------------------------------------------


def test_a_jsonl_cell_s_id_follows_the_file_s_content_not_its_path(study, tmp_path):
    first = _write(tmp_path, '{"prompt": "a", "output_len": 3}\n', "one.jsonl")
    copy_ = _write(tmp_path, first.read_text(), "two.jsonl")
    changed = _write(tmp_path, '{"prompt": "a", "output_len": 4}\n', "three.jsonl")

    def cell(path):
        return next(c for c in _cells(_with_dataset(study, {"kind": "jsonl", "path": str(path)})) if c["group"] == "ds")

    one = cell(first)
    assert one["dataset"] == {"kind": "jsonl", "path": str(first), "entries": 1,
                              "sha256": hashlib.sha256(first.read_bytes()).hexdigest()}  # fmt: skip
    assert cell(copy_)["id"] == one["id"] and cell(changed)["id"] != one["id"]
    # Each request has its own lengths: the points are batch sizes x 0 -> 0.
    assert one["sweep"]["input_len"] == [0] and one["sweep"]["output_len"] == [0]
    assert measure.points(one["sweep"]) == [
        {"batch_size": 1, "input_len": 0, "output_len": 0},
        {"batch_size": 8, "input_len": 0, "output_len": 0},
    ]


def test_a_relative_path_is_read_from_the_project_root(study):
    cells = _cells(_with_dataset(study, {"kind": "jsonl", "path": "workflow/cellbench/data/prompts/shakespeare.jsonl"}))
    shipped = _cells(_with_dataset(study, {"kind": "shipped", "name": "shakespeare"}))
    ds, sh = (next(c for c in found if c["group"] == "ds") for found in (cells, shipped))
    assert ds["dataset"]["sha256"] == sh["dataset"]["sha256"] and ds["dataset"]["entries"] == 200


def test_a_group_s_dataset_replaces_the_defaults_whole(study):
    study["defaults"]["dataset"] = {"kind": "shared_prefix", "prefix_len": 64}
    study = _with_dataset(study, {"kind": "shipped", "name": "shakespeare"})
    cells = {cell["group"]: cell for cell in _cells(study)}
    assert cells["ds"]["dataset"]["kind"] == "shipped" and "prefix_len" not in cells["ds"]["dataset"]
    assert cells["vllm-compiled"]["dataset"] == {"kind": "shared_prefix", "prefix_len": 64, "num_prefixes": 1}
    assert cells["vllm-compiled"]["sweep"]["input_len"] == [128]  # shared_prefix keeps the sweep's lengths


@pytest.mark.parametrize(
    ("dataset", "group", "message"),
    [
        ({"kind": "jsonl"}, {}, "dataset.path: required for kind jsonl"),
        ({"kind": "shipped"}, {}, "dataset.name: required for kind shipped"),
        ({"kind": "shipped", "name": "sonnets"}, {}, "dataset.name: 'sonnets' is not a shipped set (shakespeare)"),
        ({"kind": "shared_prefix"}, {}, "dataset.prefix_len: required for kind shared_prefix"),
        ({"kind": "shared_prefix", "prefix_len": 8, "path": "x"}, {},
         "dataset.path: not a setting of kind shared_prefix (it takes prefix_len, num_prefixes)"),
        ({"kind": "random", "prefix_len": 8}, {},
         "dataset.prefix_len: not a setting of kind random (it takes no other key)"),
        ({"kind": "shared_prefix", "prefix_len": 128}, {},
         "dataset.prefix_len: 128 is not below the sweep's input_len 128; a prompt is the shared prefix, "
         "then a suffix of its own (input_len is the whole prompt)"),
        ({"kind": "shipped", "name": "shakespeare"}, {"sweep": {"output_len": [16, 32]}},
         "sweep.output_len: [16, 32] gives several values, but a shipped dataset gives every request its own "
         "lengths (the points would be the same); give one value or none"),
        ({"kind": "shipped", "name": "shakespeare"}, {"engine": "transformers"},
         "kind shipped: the transformers engine decodes a static batch of equal lengths; use kind random or "
         "shared_prefix"),
        ({"kind": "shipped", "name": "shakespeare"},
         {"profile": {"point": {"batch_size": 1, "input_len": 128, "output_len": 64}}},
         "kind shipped: a profile needs a point of fixed lengths; use kind random or shared_prefix"),
        ({"kind": "shipped", "name": "shakespeare", "sha256": "0" * 64}, {},
         f"shipped set shakespeare: sha256 is {SHIPPED_SHA256}, the study pins {'0' * 64}"),
    ],
)  # fmt: skip
def test_a_dataset_that_does_not_fit_its_cell_is_refused_naming_the_cell(study, dataset, group, message):
    with pytest.raises(config.ConfigError) as raised:
        _cells(_with_dataset(study, dataset, **group))
    assert str(raised.value) == f"config: cell ds: {message}"


def test_schema_refuses_what_no_kind_takes(study):
    with pytest.raises(config.ConfigError, match=r"^config: cells\[3\]\.dataset\.kind: 'sharegpt' is not one of"):
        _cells(_with_dataset(study, {"kind": "sharegpt"}))
    with pytest.raises(config.ConfigError, match=r"^config: cells\[3\]\.dataset\.output_len: -1 is less than"):
        _cells(_with_dataset(study, {"kind": "shipped", "name": "shakespeare", "output_len": -1}))
    with pytest.raises(config.ConfigError, match=r"^config: cells\[3\]\.dataset\.limit: unknown key"):
        _cells(_with_dataset(study, {"kind": "shipped", "name": "shakespeare", "limit": 3}))


def test_a_missing_file_is_one_line(study, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(config.ConfigError) as raised:
        _cells(_with_dataset(study, {"kind": "jsonl", "path": str(missing)}))
    assert str(raised.value) == f"config: cell ds: {missing}: cannot read the prompt file (No such file or directory)"
    with pytest.raises(config.ConfigError, match=r": not a file$"):
        _cells(_with_dataset(study, {"kind": "jsonl", "path": str(tmp_path)}))


def test_validate_refuses_a_bad_prompt_file_in_one_line_and_writes_nothing(study, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = _write(tmp_path, '{"prompt": "a", "output_len": 1}\n{"prompt": "b", "output_len": -2}\n')
    path = tmp_path / "study.json"
    for group in study["cells"]:
        if group.get("image") == "llamacpp":
            group["image"] = "cpu"  # a context under this checkout: validation checks it
    path.write_text(json.dumps(_with_dataset(study, {"kind": "jsonl", "path": str(prompts)})))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"cellbench: config: cell ds: {prompts}: line 2: output_len -2 is not a positive integer"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cell_entry_carries_the_entries_and_refuses_a_changed_file(tmp_path):
    path = _write(tmp_path, '{"prompt": "a", "output_len": 3}\n')
    dataset = {"kind": "jsonl", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    entry = datasets.cell_entry(dataset)
    assert entry == {"kind": "jsonl", "name": "prompts.jsonl", "sha256": dataset["sha256"], "output_len": None,
                     "entries": [{"line": 1, "prompt": "a", "output_len": 3, "completion": None}]}  # fmt: skip
    assert datasets.cell_entry({"kind": "random"}) is None
    assert datasets.cell_entry({"kind": "shared_prefix", "prefix_len": 4, "num_prefixes": 1}) is None
    path.write_text('{"prompt": "b", "output_len": 3}\n')
    with pytest.raises(datasets.DatasetError, match=r"changed since the study was read"):
        datasets.cell_entry(dataset)


def test_the_shipped_set_matches_its_source_notes():
    path = paths.PROMPTS_DIR / "shakespeare.jsonl"
    found = datasets.read({"kind": "shipped", "name": "shakespeare"})
    source = (paths.PROMPTS_DIR / "SOURCE.md").read_text()
    assert found["sha256"] in source and f"{path.stat().st_size:,} bytes" in source
    lengths = [entry["output_len"] for entry in found["entries"]]
    assert len(lengths) == 200 and min(lengths) == 4 and max(lengths) == 128
    assert len({len(entry["prompt"]) for entry in found["entries"]}) > 100  # varied lengths
    assert path.stat().st_size < 200_000


def test_the_shipped_set_is_made_again_byte_for_byte(tmp_path, bench):
    """scripts/make_prompt_set.py on the tiny-shakespeare corpus, here the part it reads (the
    corpus itself is not in the repository: the SOURCE.md rule is checked by the file's sha256)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_prompt_set", ROOT / "scripts" / "make_prompt_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    speeches = "A:\nhi\n\nB:\none two three\n\n" * 1000
    entries, start, _ = module.prompt_set("x" * module.START + "\n\n" + speeches)
    assert start == module.START + 2 and len(entries) == module.COUNT
    # 1 speech, then the next speaker's line; "one two three" is 13 characters / 3.5: 4 tokens.
    assert entries[0] == {"prompt": "A:\nhi\n\nB:\n", "output_len": 4}
    # The next prompt starts after the speech asked for: 3 speeches, then B asked to speak.
    assert entries[1] == {"prompt": "A:\nhi\n\nB:\none two three\n\nA:\nhi\n\nB:\n", "output_len": 4}


# --- The container: the requests a point sends ------------------------------------------------


class Words:
    """An engine whose tokens are the words of a text (token i of a text: i), vocabulary 3."""

    vocab_size, special_ids = 3, {0}

    def encode(self, text):
        return list(range(len(text.split())))


POINT = {"batch_size": 4, "input_len": 4, "output_len": 6}


def _cell(dataset, **sweep):
    return {"sweep": {"seed": 0, **sweep}, "dataset": dataset, "engine_args": {}}


def test_random_prompts_are_the_ones_cells_sent_before_datasets(bench):
    engine = Words()
    requests = bench.point_requests(_cell({"kind": "random"}), POINT, 2, 4, engine)
    assert requests == [(ids, 6) for ids in bench.prompt_token_ids(0, POINT, 2, 4, 3, {0})]
    assert bench.point_requests({"sweep": {"seed": 0}}, POINT, 2, 4, engine) == requests  # cells of before
    assert bench.as_batch(requests) == ([ids for ids, _ in requests], 6)
    assert bench.as_batch([([1], 3), ([2], 5)]) == ([[1], [2]], [3, 5])
    assert bench.per_request(6, 3) == [6, 6, 6] and bench.per_request([1, 2], 2) == [1, 2]


def test_shared_prefix_prompts_share_the_prefix_exactly_and_differ_after_it(bench):
    # Vocabulary {1, 2} (0 is special): the 4 suffixes of 2 tokens are all 4 pairs there are.
    prompts = bench.shared_prefix_prompts(0, POINT, 0, 4, 3, {0}, prefix_len=2)
    assert all(len(p) == 4 and 0 not in p for p in prompts)
    assert len({tuple(p[:2]) for p in prompts}) == 1
    assert sorted(tuple(p[2:]) for p in prompts) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    # The same prefix for every point and repeat of the cell; seeded: the same call, the same prompts.
    other = bench.shared_prefix_prompts(0, {**POINT, "batch_size": 1, "input_len": 9}, 5, 1, 3, {0}, prefix_len=2)
    assert other[0][:2] == prompts[0][:2] and len(other[0]) == 9
    assert bench.shared_prefix_prompts(0, POINT, 0, 4, 3, {0}, prefix_len=2) == prompts
    with pytest.raises(ValueError, match="no 5 distinct suffixes of 2 tokens"):
        bench.shared_prefix_prompts(0, POINT, 0, 5, 3, {0}, prefix_len=2)


def test_shared_prefix_with_several_prefixes_takes_them_in_turn(bench):
    prompts = bench.shared_prefix_prompts(7, {**POINT, "input_len": 40}, 0, 4, 50_000, set(), 30, num_prefixes=2)
    assert prompts[0][:30] == prompts[2][:30] != prompts[1][:30] == prompts[3][:30]
    assert len({tuple(p[30:]) for p in prompts}) == 4
    cell = _cell({"kind": "shared_prefix", "prefix_len": 30, "num_prefixes": 2})

    class Big:
        vocab_size, special_ids = 50_000, set()

    requests = bench.point_requests({**cell, "sweep": {"seed": 7}}, {**POINT, "input_len": 40}, 0, 4, Big())
    assert requests == [(p, 6) for p in prompts]


def test_a_point_s_warmup_and_repeats_take_distinct_windows_of_the_dataset(bench):
    windows = [bench.dataset_order(0, POINT, repeat, 2, 6) for repeat in (-1, 0, 1)]
    assert sorted(i for window in windows for i in window) == [0, 1, 2, 3, 4, 5]
    # Wrapping: the 4th window of 2 in 6 is the first again.
    assert bench.dataset_order(0, POINT, 2, 2, 6) == windows[0]
    assert bench.dataset_order(0, POINT, 0, 4, 3)[3] == bench.dataset_order(0, POINT, 0, 4, 3)[0]


def _dataset_cell(entries, output_len=None, **engine_args):
    prompts = {"kind": "jsonl", "name": "p.jsonl", "sha256": "f" * 64, "output_len": output_len, "entries": entries}
    return {**_cell({"kind": "jsonl"}), "dataset_prompts": prompts, "engine_args": engine_args}


def _entry(line, words, completion_words=None, output_len=None):
    completion = None if completion_words is None else " ".join(["w"] * completion_words)
    return {"line": line, "prompt": " ".join(["w"] * words), "output_len": output_len, "completion": completion}


def test_sharegpt_entries_are_pruned_by_vllms_length_rule(bench):
    entries = [
        _entry(1, 3, 10),  # prompt below 4 tokens
        _entry(2, 4, 3),  # output below 4 tokens
        _entry(3, 1025, 10),  # prompt above 1024
        _entry(4, 1000, 1049),  # prompt + output 2049, above 2048
        _entry(5, 4, 4),  # kept: output 4 tokens (the completion's)
        _entry(6, 1024, 1024),  # kept: 2048 in all
        _entry(7, 1, output_len=2),  # a plain entry: no pruning
    ]
    usable, pruned = bench.dataset_requests(_dataset_cell(entries), Words())
    assert pruned == 4
    assert [(r["line"], len(r["ids"]), r["output_len"]) for r in usable] == [(5, 4, 4), (6, 1024, 1024), (7, 1, 2)]
    # dataset.output_len fixed: the completion's length no longer counts, nor its minimum.
    fixed = [{**e, "output_len": 2} for e in entries[:2]]
    usable, pruned = bench.dataset_requests(_dataset_cell(fixed, output_len=2), Words())
    assert [(r["line"], r["output_len"]) for r in usable] == [(2, 2)] and pruned == 1


def test_a_dataset_request_longer_than_the_context_fails_naming_its_line(bench):
    cell = _dataset_cell([_entry(1, 2, output_len=2), _entry(9, 8, output_len=3)], max_model_len=10)
    with pytest.raises(ValueError, match=r"^dataset p\.jsonl line 9: a prompt of 8 tokens and 3 output tokens exceed"):
        bench.dataset_requests(cell, Words())
    with pytest.raises(ValueError, match="no entry passes vLLM's ShareGPT length rule"):
        bench.dataset_requests(_dataset_cell([_entry(1, 1, 10)]), Words())


def test_dataset_requests_of_a_point_with_their_lines(bench):
    entries = [_entry(line, line, output_len=10 * line) for line in (1, 2, 3, 4, 5)]
    cell, engine = _dataset_cell(entries), Words()
    point = {"batch_size": 2, "input_len": 0, "output_len": 0}
    requests = bench.point_requests(cell, point, 0, 2, engine)
    lines = bench.point_lines(cell, point, 0, 2, engine)
    assert [(len(ids), length) for ids, length in requests] == [(line, 10 * line) for line in lines]
    assert lines == [entries[i]["line"] for i in bench.dataset_order(0, point, 0, 2, 5)]
    assert bench.dataset_facts(cell, engine) == {"usable": 5, "pruned": 0}
    assert bench.point_lines(_cell({"kind": "random"}), point, 0, 2, engine) is None


# --- Columns ---------------------------------------------------------------------------------


def test_dataset_columns_and_request_lengths():
    requests = [{"prompt_tokens": p, "output_tokens": o} for p, o in ((10, 1), (20, 1), (30, 1), (40, 5))]
    # Linear-interpolated percentiles: p50 of 10..40 is 25; p90 at rank 2.7: 30 + 0.7 x 10 = 37.
    assert measure.request_lengths(requests) == {
        "prompt_tokens_mean": 25.0, "prompt_tokens_p50": 25.0, "prompt_tokens_p90": 37.0,
        "output_tokens_mean": 2.0, "output_tokens_p50": 1.0, "output_tokens_p90": pytest.approx(3.8),
    }  # fmt: skip
    shipped = {"kind": "shipped", "name": "shakespeare", "sha256": "a" * 64, "entries": 200}
    assert measure.dataset_columns({"dataset": shipped}) == {
        "dataset_kind": "shipped", "dataset_name": "shakespeare", "dataset_sha256": "a" * 64,
        "dataset_prefix_len": None,
    }  # fmt: skip
    assert measure.dataset_columns({})["dataset_kind"] == "random"  # a cell resolved before datasets
    prefix = measure.dataset_columns({"dataset": {"kind": "shared_prefix", "prefix_len": 96, "num_prefixes": 1}})
    assert prefix == {"dataset_kind": "shared_prefix", "dataset_name": None, "dataset_sha256": None,
                      "dataset_prefix_len": 96}  # fmt: skip


# --- Tables ----------------------------------------------------------------------------------


def test_dataset_points_are_named_by_their_dataset_with_their_lengths_in_the_summary():
    import pandas as pd
    import test_aggregate
    from cellbench import aggregate, report

    base = test_aggregate._rows("base", "m1", 8, [10.0, 10.0])
    lengths = [{"prompt_tokens_mean": 100.0, "prompt_tokens_p50": 90.0, "prompt_tokens_p90": 180.0,
                "output_tokens_mean": 30.0, "output_tokens_p50": 20.0, "output_tokens_p90": 60.0},
               {"prompt_tokens_mean": 120.0, "prompt_tokens_p50": 110.0, "prompt_tokens_p90": 200.0,
                "output_tokens_mean": 40.0, "output_tokens_p50": 30.0, "output_tokens_p90": 80.0}]  # fmt: skip
    shipped = [
        {**row, **length, "input_len": 0, "output_len": 0, "dataset_kind": "shipped", "dataset_name": "shakespeare",
         "dataset_sha256": SHIPPED_SHA256}
        for row, length in zip(test_aggregate._rows("prose", "m1", 8, [5.0, 7.0]), lengths, strict=True)
    ]  # fmt: skip
    points = aggregate.cell_points(pd.DataFrame(base + shipped), "base-h")
    text = report.summary_markdown(points, aggregate.fastest_per_point(points), "s", "base")
    assert "| m1 | prose | ok | 8 × shakespeare | 6.0 |" in text
    # Means over the two repeats: prompt tokens 110 (mean), 100 (p50), 190 (p90); output 35, 25, 70.
    assert (
        "| m1 | prose | 8 × shakespeare | shipped shakespeare | 4e389cee7688 | 110 | 100 | 190 | 35 | 25 | 70 |" in text
    )
    assert "## Prompts from a dataset" in text
    assert "## Prompts from a dataset" not in report.summary_markdown(
        aggregate.cell_points(pd.DataFrame(base), "base-h"), pd.DataFrame(), "s", "base"
    )
