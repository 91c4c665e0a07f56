import hashlib
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from cellbench import config, paths
from cellbench.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_default_study_expands_to_named_cells(study):
    cells = config.expand_cells(study)
    names = [c["name"] for c in cells]
    assert names == ["vllm-bfloat16-enforce_eager", "vllm-float32-enforce_eager", "vllm-compiled", "llamacpp"]
    for cell in cells:
        assert re.fullmatch(re.escape(cell["name"]) + r"-[0-9a-f]{10}", cell["id"])
        assert cell["sweep"]["batch_size"] == [1, 8]  # study defaults reach every cell
        assert cell["env"] == {"VLLM_CPU_KVCACHE_SPACE": "2"}
        assert cell["device"] == "cpu"


def test_schema_defaults_fill_what_the_study_leaves_out(study):
    del study["defaults"]["sweep"]["repeats"]
    del study["defaults"]["timeout_s"]
    cell = config.expand_cells(study)[0]
    assert cell["sweep"]["repeats"] == 3
    assert cell["timeout_s"] == 1800
    assert cell["quantization"] is None


def test_cartesian_product_of_axes(study):
    study["cells"] = [
        {
            "name": "grid",
            "axes": {
                "dtype": ["bfloat16", "float32"],
                "engine_args.enforce_eager": [True, False],
                "env.VLLM_USE_TRITON_AWQ": ["1", "0"],
            },
        }
    ]
    study["baseline"] = "grid-bfloat16-enforce_eager-vllm_use_triton_awq-1"
    cells = config.resolve(study)["cells"].values()
    assert len(cells) == 8
    names = {c["name"] for c in cells}
    assert "grid-float32-no_enforce_eager-vllm_use_triton_awq-0" in names
    eager_off = next(c for c in cells if c["name"] == "grid-float32-no_enforce_eager-vllm_use_triton_awq-0")
    assert eager_off["engine_args"] == {"max_model_len": 512, "enforce_eager": False}
    assert eager_off["env"] == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_TRITON_AWQ": "0"}


def test_id_ignores_key_order_and_machine_settings(study):
    first = config.expand_cells(study)[0]
    study["defaults"]["engine_args"] = dict(reversed(list(study["defaults"]["engine_args"].items())))
    study["defaults"]["timeout_s"] = 60
    study["defaults"]["resources"] = {"cpus": "0", "memory": "1g"}
    again = config.expand_cells(study)[0]
    assert again["id"] == first["id"]


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["defaults"]["engine_args"].update(max_model_len=1024),
        lambda s: s["defaults"]["env"].update(VLLM_CPU_KVCACHE_SPACE="4"),
        lambda s: s["defaults"]["sweep"].update(output_len=[32]),
        lambda s: s["defaults"].update(model="other") or s["models"].update(other=s["models"]["smollm2-135m"]),
    ],
)
def test_id_changes_with_what_is_measured(study, change):
    before = config.expand_cells(study)[0]["id"]
    change(study)
    after = config.expand_cells(study)[0]["id"]
    assert before.split("-")[-1] != after.split("-")[-1]


def test_resolve_returns_baseline_id(study):
    resolved = config.resolve(study)
    assert resolved["baseline"].startswith("vllm-bfloat16-enforce_eager-")
    assert resolved["baseline"] in resolved["cells"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(colour="red"), "config: colour: unknown key"),
        (lambda s: s["defaults"].update(timeout=3), "config: defaults.timeout: unknown key"),
        (lambda s: s["cells"][0].update(dtpye="float32"), "config: cells[0].dtpye: unknown key"),
        (
            lambda s: s["defaults"]["sweep"].update(batch_size=[0]),
            "config: defaults.sweep.batch_size[0]: 0 is less than",
        ),
        (
            lambda s: s["defaults"]["sweep"].update(output_len=[]),
            "config: defaults.sweep.output_len: [] should be non-empty",
        ),
        (lambda s: s["defaults"].update(dtype="fp8"), "config: defaults.dtype: 'fp8' is not one of"),
        (lambda s: s["cells"][0]["axes"].update(dtype=[]), "config: cells[0].axes.dtype: [] should be non-empty"),
        (lambda s: s.pop("baseline"), "config: <top>: 'baseline' is a required property"),
        (
            lambda s: s["defaults"].update(image="gpu"),
            "config: cell vllm-bfloat16-enforce_eager: image 'gpu' is not in images",
        ),
        (lambda s: s["cells"].append({"name": "vllm"}), "config: cells: group name 'vllm' is used twice"),
        (lambda s: s.update(baseline="nope"), "config: baseline: 'nope' is not a cell name"),
        (lambda s: s["defaults"]["env"].update(HF_TOKEN="x"), "env.HF_TOKEN looks like a secret"),
        (lambda s: s["cells"][0]["axes"].update(dtype=["float32", "float32"]), "config: cells[0].axes.dtype"),
        (lambda s: s["cells"][0]["axes"].update({"colour": ["red"]}), "config: cells[0].axes"),
    ],
)
def test_bad_config_names_the_key(study, change, message):
    change(study)
    with pytest.raises(config.ConfigError) as raised:
        config.resolve(study)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_bad_yaml_and_missing_file_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml: line \d+"):
        config.load_study(bad)
    with pytest.raises(config.ConfigError, match="cannot read study file"):
        config.load_study(tmp_path / "missing.yaml")


def test_llamacpp_and_serve_cells(study):
    study["cells"] += [
        {"name": "served", "mode": "serve", "serve": {"request_rate": 4}},
        {"name": "modes", "axes": {"mode": ["offline", "serve"]}},
    ]
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    assert cells["llamacpp"]["engine"] == "llamacpp" and cells["llamacpp"]["mode"] == "offline"
    assert cells["served"]["serve"] == {"request_rate": 4}
    # serve settings are part of the id only in serve mode
    assert cells["modes-serve"]["serve"] == {} and cells["modes-offline"]["mode"] == "offline"
    offline = dict(cells["modes-offline"], serve={"request_rate": 9})
    assert config.cell_hash(offline) == config.cell_hash(cells["modes-offline"])
    served = dict(cells["served"], serve={"request_rate": 9})
    assert config.cell_hash(served) != config.cell_hash(cells["served"])


def test_llama_server_cells_are_valid(study):
    study["cells"] += [
        {"name": "llama-served", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1", "mode": "serve"},
        {"name": "llama-tuned", "image": "llamacpp", "engine": "llamacpp", "mode": "serve",
         "engine_args": {"parallel": 2, "n_batch": 256, "flash_attn": True, "cache_prompt": False}},
    ]  # fmt: skip
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    assert cells["llama-served"]["mode"] == "serve" and cells["llama-served"]["engine"] == "llamacpp"
    assert cells["llama-tuned"]["engine_args"]["parallel"] == 2


def test_quality_is_on_by_default_and_part_of_the_id_only_when_on(study):
    study["cells"] += [
        {"name": "off", "quality": False},
        {"name": "few", "quality": {"prompts": 8}},
    ]
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    assert cells["llamacpp"]["quality"] == {"prompts": 32, "max_tokens": 32, "chunk_chars": 1200}
    assert cells["few"]["quality"] == {"prompts": 8, "max_tokens": 32, "chunk_chars": 1200}
    # Off: the id a study had before quality existed (the identity without the key).
    off = cells["off"]
    identity = {key: off[key] for key in config.IDENTITY_KEYS}
    identity["sweep"] = {k: v for k, v in off["sweep"].items() if k != "rounds"}
    old = hashlib.sha256(config.canonical_json(identity).encode()).hexdigest()[:10]
    assert off["quality"] is False and off["id"] == f"off-{old}"
    assert config.cell_hash(dict(off, quality={"prompts": 32, "max_tokens": 32, "chunk_chars": 1200})) != old
    assert config.cell_hash(dict(cells["few"], quality={**cells["few"]["quality"], "prompts": 9})) != config.cell_hash(
        cells["few"]
    )


def test_quality_defaults_fill_a_group_that_turns_it_on(study):
    study["defaults"]["quality"] = False
    study["cells"] = [{"name": "on", "quality": {"max_tokens": 5}}, {"name": "plain"}]
    study["baseline"] = "on"
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    assert cells["on"]["quality"] == {"prompts": 32, "max_tokens": 5, "chunk_chars": 1200}
    assert cells["plain"]["quality"] is False


def test_quality_tolerance_defaults_reach_the_study_record(study):
    resolved = config.resolve(study)
    assert resolved["quality_tolerance"] == {"drift": 0.02, "diverged": 0.25, "agreement_drift": 0.25}
    study["quality_tolerance"] = {"diverged": 0.5}
    record = config.study_record(study, config.resolve(study))
    assert record["quality_tolerance"] == {"drift": 0.02, "diverged": 0.5, "agreement_drift": 0.25}


@pytest.mark.parametrize(
    "group, message",
    [
        ({"engine": "llamacpp", "dtype": "float32"}, "a llamacpp cell runs its model file as stored"),
        ({"engine": "transformers", "mode": "serve"}, "mode serve is implemented for llamacpp, vllm cells only, not"),
        ({"engine": "transformers", "quantization": "awq"}, "the transformers engine takes none"),
        (
            {"engine": "llamacpp", "mode": "serve", "engine_args": {"n_gpu_layers": 99}},
            "cell bad: engine_args.n_gpu_layers: not a llama-server setting cellbench passes",
        ),
        (
            {"engine": "llamacpp", "mode": "serve", "engine_args": {"parallel": 0}},
            "cell bad: engine_args.parallel: 0 is not an integer of at least 1",
        ),
        (
            {"engine": "llamacpp", "mode": "serve", "engine_args": {"n_ctx": 1024}},  # the defaults give 512
            "cell bad: engine_args.n_ctx (1024) and engine_args.max_model_len (512) name the same llama-server",
        ),
        ({"mode": "online"}, "mode: 'online' is not one of"),
        ({"mode": "serve", "serve": {"request_rate": 0}}, "serve.request_rate"),
    ],
)
def test_bad_engine_or_mode_names_the_cell(study, group, message):
    study["cells"].append({"name": "bad", **group})
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.resolve(study)


# --- Hostile studies: templates, ids with a trailing newline, duplicate keys, bombs. ---

YTE_STUDY = """__use_yte__: true
study: s
description: ?f"{PAYLOAD}"
"""


def test_validate_never_evaluates_a_yte_template(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = f"{{__import__('os').system('touch {marker}')}}"
    path = tmp_path / "study.yaml"
    path.write_text(YTE_STUDY.replace("{PAYLOAD}", payload))
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "cellbench: config: __use_yte__: YTE templates run code; a study must be plain YAML\n"
    assert not marker.exists()


def test_validate_constructs_no_python_object(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "study.yaml"
    path.write_text(f"study: !!python/object/apply:os.system ['touch {marker}']\n")
    assert cli_main(["validate", str(path)]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("key", ["__use_yte__", "__variables__", "__anything"])
def test_resolve_refuses_template_keys_in_a_loaded_config(study, key):
    study[key] = True
    message = f"^config: {key}: YTE templates run code; a study must be plain YAML$"
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(study)


@pytest.mark.e2e
def test_snakemake_refuses_a_yte_study_after_snakemake_ran_it(tmp_path):
    """Snakemake evaluates the template in its own config loader, before the Snakefile: a study
    given to Snakemake is trusted like code. The payload only writes inside tmp_path."""
    marker = tmp_path / "ran"
    study = (ROOT / "tests" / "bad_configs" / "45-yte-template.yaml").read_text()
    path = tmp_path / "study.yaml"
    path.write_text(study.replace('?f"{2 + 2} cells"', f"?open({str(marker)!r}, 'w').write('x')"))
    argv = ["snakemake", "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(tmp_path), "--configfile", str(path)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("cellbench:")]
    assert done.returncode != 0
    assert lines == ["cellbench: config: __use_yte__: YTE templates run code; a study must be plain YAML"]
    assert marker.exists()  # what the docs say: Snakemake ran it; `cellbench validate` does not


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(study="s\n"),
        lambda s: s.update(machine_id="box-1\n"),
        lambda s: s["models"].update({"m\n": {"source": "hf-cache", "repo_id": "a/b"}}),
        lambda s: s["models"].update({"m": {"source": "hf-cache", "repo_id": "a/b\n"}}),
        lambda s: s["defaults"]["resources"].update(cpus="0-1\n"),
        lambda s: s["defaults"]["resources"].update(memory="12g\n"),
        lambda s: s["defaults"]["env"].update({"A\n": "1"}),
        lambda s: s["cells"][0].update(axes={"dtype\n": ["auto"]}),
        lambda s: s["cells"][0].update(image="cpu\n"),
    ],
)
def test_no_id_takes_a_trailing_newline(study, change):
    change(study)
    with pytest.raises(config.ConfigError, match=r"\\n'"):
        config.validate(study)


def test_every_schema_pattern_is_anchored_at_the_very_end():
    def patterns(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern":
                    yield value
                else:
                    yield from patterns(value)
        elif isinstance(node, list):
            for value in node:
                yield from patterns(value)

    found = list(patterns(config.load_schema()))
    assert len(found) >= 6
    for pattern in found:
        assert pattern.endswith("$"), pattern
        assert config._ecma_regex(pattern).pattern.endswith(r"\Z"), pattern
    assert config._ecma_regex(r"^[$]a\$$").pattern == r"^[$]a\$\Z"


def test_archive_and_hub_ids_fullmatch():
    from cellbench import archive, hfcache

    with pytest.raises(archive.ArchiveError):
        archive.check_id("cell id", "cell\n")
    assert archive.check_id("cell id", "cell") == "cell"
    assert not archive.MEMBER_RE.fullmatch("study/config.json\n")
    assert not hfcache.COMMIT.fullmatch("0" * 40 + "\n")


def test_duplicate_keys_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study: a\ncells: []\nbaseline: a\ncells: [{name: a}]\n")
    with pytest.raises(config.ConfigError, match=r": line 4: key 'cells' appears twice \(first on line 2\)$"):
        config.load_study(path)


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base: &base {a: 1, b: 2}\nchild: {<<: *base, b: 3}\n")
    assert config.load_study(path)["child"] == {"a": 1, "b": 3}


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 30)]
    path = tmp_path / "study.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(config.ConfigError, match=r"line 6: expands to more than 200000 values \(YAML aliases\)$"):
        config.load_study(path)


def test_shared_structure_from_another_loader_is_refused_without_walking_it(study):
    # What Snakemake's loader makes of an alias bomb: one list referenced ten times a level.
    bomb: list = ["lol"] * 10
    for _ in range(30):
        bomb = [bomb] * 10
    study["description"] = bomb
    with pytest.raises(config.ConfigError, match=r"^config: more than 200000 values"):
        config.resolve(study)


def test_deep_nesting_is_one_line_not_a_recursion_error(study, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("study: s\ndescription: " + "[" * 10_000 + "]" * 10_000 + "\n")
    assert cli_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"cellbench: {path}: line 2: nested deeper than 64 levels\n"
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    study["description"] = deep
    with pytest.raises(config.ConfigError, match=r"^config: nested deeper than 64 levels$"):
        config.resolve(study)


def test_bytes_not_utf8_are_named_by_offset(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"study: caf\xe9\n")
    with pytest.raises(config.ConfigError, match=r"study.yaml: byte 10: 0xe9 is not UTF-8; a study must be UTF-8 text"):
        config.load_study(path)
    path.write_bytes(b"study: a\x00b\n")
    with pytest.raises(config.ConfigError, match=r"study.yaml: character 8: special characters are not allowed"):
        config.load_study(path)


def test_quoted_values_are_cut(study):
    study["cells"] = {f"group{i}": {"name": "x" * 100} for i in range(1000)}
    with pytest.raises(config.ConfigError) as raised:
        config.resolve(study)
    message = str(raised.value)
    assert message.startswith("config: cells: {'group0': ") and "…" in message
    assert len(message) < 200 and "\n" not in message
    error = config.ConfigError("a\nb" + "c" * 1000)
    assert str(error).startswith("a\\nb") and len(str(error)) == config.MAX_MESSAGE


def _fabricate_results(workdir: Path, study_file: Path, when: float) -> None:
    """Every file a run of the study would leave (manifests, rounds), with mtimes after the repo's."""
    import os

    resolved = config.resolve(config.load_study(study_file))
    cells = resolved["cells"].values()
    made = [paths.image_manifest(c["image"]) for c in cells] + [paths.model_manifest(c["model"]) for c in cells]
    for path in made:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text("{}")
        os.utime(workdir / path, (when + 1, when + 1))
    for name in paths.ROUND_OUTPUTS:
        for path in paths.round_files(resolved["cells"], name):
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).write_bytes(b"PAR1 fabricated")
            os.utime(workdir / path, (when + 2, when + 2))


def _tables_made(workdir: Path, when: float) -> None:
    import os

    for rel in ("results/summary.parquet", "results/tables/summary.md", "results/tables/summary.csv",
                "results/tables/machines.md", "results/tables/machines.csv", "results/tables/diagnostics.md",
                "results/tables/verdicts.md", "results/report/index.html",
                *(f"results/plots/{name}" for name in paths.PLOTS)):  # fmt: skip
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text("made earlier")
        os.utime(workdir / rel, (when, when))


def _dry_run(workdir: Path, study_file: Path) -> str:
    argv = ["snakemake", "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(study_file)]  # fmt: skip
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_switching_studies_without_metadata_rebuilds_the_tables(tmp_path):
    """Results of two studies, tables last made for one, no .snakemake/: a dry run for the other
    schedules the tables (results/study.json changed), a second one does not."""
    import shutil
    import time

    default, other = ROOT / "config" / "config.yaml", ROOT / "config" / "rocm-awq.yaml"
    # After every input the repo gives the rules (a fresh checkout is seconds old), before now.
    sources = [p for folder in ("containers", "scripts") for p in (ROOT / folder).rglob("*") if p.is_file()]
    sources += [ROOT / "workflow" / "cellbench" / name for name in ("contract.py", "serving.py")]  # run_cell's inputs
    start = max(p.stat().st_mtime for p in sources) + 1
    time.sleep(max(0.0, start + 5 - time.time()))
    _fabricate_results(tmp_path, default, start)
    _fabricate_results(tmp_path, other, start)
    # What the Snakefile wrote when the rocm-awq tables were made, just before them.
    config.write_study_record(tmp_path / paths.study_file(), *config.read(other))
    os.utime(tmp_path / paths.study_file(), (start + 3, start + 3))
    _tables_made(tmp_path, start + 4)
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
    assert "Nothing to be done" in _dry_run(tmp_path, other)
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)

    out = _dry_run(tmp_path, default)
    assert re.search(r"^aggregate\s+1$", out, re.MULTILINE), out[-2000:]
    assert re.search(r"^report\s+1$", out, re.MULTILINE), out[-2000:]
    assert not re.search(r"^run_cell\s", out, re.MULTILINE), out[-2000:]  # the cells' own results stand
    assert json.loads((tmp_path / "results" / "study.json").read_text())["study"] == "cpu-demo"

    _tables_made(tmp_path, time.time() + 5)  # the tables made for the default study
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
    mtime = (tmp_path / "results" / "study.json").stat().st_mtime_ns
    assert "Nothing to be done" in _dry_run(tmp_path, default)
    assert (tmp_path / "results" / "study.json").stat().st_mtime_ns == mtime  # unchanged, not rewritten


def test_machine_id_from_the_environment_is_checked_like_the_study_s(study, monkeypatch, capsys):
    from cellbench import provenance

    monkeypatch.setenv("CELLBENCH_MACHINE_ID", "../box 1")
    with pytest.raises(config.ConfigError, match=r"^CELLBENCH_MACHINE_ID: value '../box 1' is not valid; expected"):
        provenance.machine_id()
    with pytest.raises(config.ConfigError, match="CELLBENCH_MACHINE_ID"):
        config.resolve(study)
    assert provenance.machine_id("from-config") == "from-config"
    assert cli_main(["validate", str(ROOT / "config" / "config.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cellbench: CELLBENCH_MACHINE_ID: value '../box 1'"), err
    monkeypatch.setenv("CELLBENCH_MACHINE_ID", "box-1.lab")
    assert provenance.machine_id() == "box-1.lab"


def _project(tmp_path: Path, monkeypatch) -> Path:
    """A project root of its own: containers/cpu with a Dockerfile and a lock, a sibling beside it."""
    for name in ("cpu", "sibling"):
        (tmp_path / "containers" / name).mkdir(parents=True)
        (tmp_path / "containers" / name / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "containers" / "sibling" / "requirements.lock").write_text("")
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("plant", "image", "message"),
    [
        (  # a context that is a link out of the project
            lambda root: (root / "containers" / "etc").symlink_to("/etc", target_is_directory=True),
            {"context": "containers/etc"},
            "config: images.cpu.context: 'containers/etc' leads outside the project root",
        ),
        (  # a file of the context that links to a system file: the build would copy its content
            lambda root: (root / "containers" / "cpu" / "passwd").symlink_to("/etc/passwd"),
            {"context": "containers/cpu"},
            "config: images.cpu.context: containers/cpu/passwd links outside the project root",
        ),
        (  # a wheelhouse that is a link to a sibling's lock
            lambda root: (root / "containers" / "cpu" / "requirements.lock").symlink_to(
                root / "containers" / "sibling" / "requirements.lock"
            ),
            {"context": "containers/cpu", "wheelhouse": "requirements.lock"},
            "config: images.cpu.wheelhouse: 'requirements.lock' leads outside containers/cpu",
        ),
    ],
)
def test_symlinks_out_of_the_project_are_refused(study, tmp_path, monkeypatch, plant, image, message):
    root = _project(tmp_path, monkeypatch)
    plant(root)
    study["images"]["cpu"] = {"device": "cpu", **image}
    with pytest.raises(config.ConfigError) as raised:
        config.resolve(study)
    assert str(raised.value).startswith(message), raised.value


def test_a_json_study_means_what_json_says(tmp_path):
    """Snakemake reads a --configfile as JSON first: so does load_study (1e-3 is a number, not
    the string YAML 1.1 would make of it), and NaN or Infinity are refused where they stand."""
    study = {"study": "s", "statistics": {"host_cpu_max": 1}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study).replace("1}", "1e-3}"))
    assert config.load_study(path)["statistics"]["host_cpu_max"] == 0.001
    path.write_text(json.dumps(study).replace("1}", "NaN}"))
    assert math.isnan(config.load_study(path)["statistics"]["host_cpu_max"])


@pytest.mark.parametrize(("cpuset", "cpus"), [("", []), ("3", [3]), ("0-3,8", [0, 1, 2, 3, 8]), ("2-2", [2])])
def test_cpusets_parse_strictly(cpuset, cpus):
    assert config.cpuset_cpus(cpuset) == cpus


@pytest.mark.parametrize("cpuset", ["5-1", ",,", "1,", ",1", "1-", "-1", "1--2", "0-2,1", "a", " 1"])
def test_bad_cpusets_are_refused(cpuset):
    with pytest.raises(config.ConfigError, match=r"^resources\.cpus: "):
        config.cpuset_cpus(cpuset)


@pytest.mark.parametrize("value", [2.0, True, "2", 0, None])
def test_parallel_sizes_are_integers(study, value):
    study["defaults"]["engine_args"]["tensor_parallel_size"] = value
    with pytest.raises(config.ConfigError, match="engine_args.tensor_parallel_size is .*; expected an integer"):
        config.resolve(study)


def test_every_id_and_argv_value_has_a_bound(study):
    """The default study is far inside every bound the validation sets."""
    resolved = config.resolve(study)
    assert all(len(cell_id) <= config.MAX_ID for cell_id in resolved["cells"])
    record = config.study_record(study, resolved)
    assert set(record["cells"]) == set(resolved["cells"]) and record["config"] == study


def test_study_record_is_written_only_when_it_changes(study, tmp_path):
    """results/study.json: the aggregate rule reads the rounds from it (not from a command line
    that grows with the study), in the order of the rule's own inputs."""
    resolved = config.resolve(study)
    target = tmp_path / paths.study_file()
    assert config.write_study_record(target, study, resolved)
    assert not config.write_study_record(target, study, resolved)
    assert paths.study_round_files(target) == paths.round_files(resolved["cells"])
    study["defaults"]["sweep"]["rounds"] = 2
    assert config.write_study_record(target, study, config.resolve(study))
    assert len(paths.study_round_files(target)) == 2 * len(resolved["cells"])
    assert [p.name for p in target.parent.iterdir()] == ["study.json"]  # no temporary file left


def test_the_serve_study_validates_and_has_load_levels():
    _, resolved = config.read(ROOT / "config" / "serve.yaml")
    cells = {c["name"]: c for c in resolved["cells"].values()}
    assert set(cells) == {"vllm-fp32", "llama-server"}
    assert {(c["mode"], c["serve"]["search"]["metric"]) for c in cells.values()} == {("serve", "request_rate")}
    assert cells["llama-server"]["engine"] == "llamacpp" and "enforce_eager" not in cells["llama-server"]["engine_args"]


def test_load_settings_enter_the_cell_id_only_as_given(study):
    study["defaults"]["sweep"]["batch_size"] = [1]
    study["cells"] = [
        {"name": "old", "mode": "serve", "serve": {"request_rate": 4}},
        {"name": "levels", "mode": "serve", "serve": {"concurrency": [1, 4]}},
    ]
    study["baseline"] = "old"
    cells = {c["name"]: c for c in config.resolve(study)["cells"].values()}
    # no default is filled into a cell's serve settings: an older serve study keeps its ids
    assert cells["old"]["serve"] == {"request_rate": 4}
    assert cells["levels"]["serve"] == {"concurrency": [1, 4]}
    given = dict(cells["levels"], serve={"concurrency": [1, 4], "requests_per_level": 8})
    assert config.cell_hash(given) != config.cell_hash(cells["levels"])


def test_data_files_read_with_libyaml_are_what_the_python_parser_reads():
    import yaml
    from cellbench import diagnose, roofline

    for path in (config.SCHEMA_PATH, diagnose.SIGNATURES_PATH, roofline.DEVICES_PATH):
        assert config.load_data_file(path) == yaml.safe_load(path.read_text()), path
