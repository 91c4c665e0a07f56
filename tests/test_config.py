import re

import pytest
from cellbench import config


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


@pytest.mark.parametrize(
    "group, message",
    [
        ({"engine": "llamacpp", "dtype": "float32"}, "a llamacpp cell runs its GGUF as stored"),
        ({"engine": "llamacpp", "mode": "serve"}, "mode serve is implemented for vllm cells only"),
        ({"mode": "online"}, "mode: 'online' is not one of"),
        ({"mode": "serve", "serve": {"request_rate": 0}}, "serve.request_rate"),
    ],
)
def test_bad_engine_or_mode_names_the_cell(study, group, message):
    study["cells"].append({"name": "bad", **group})
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.resolve(study)
