import pytest
from cellbench import roofline


def test_weight_bytes_count_weight_files_only():
    manifest = {"files": {"model.safetensors": {"bytes": 270}, "tokenizer.json": {"bytes": 3}, "m.gguf": {"bytes": 98}}}
    assert roofline.stored_weight_bytes(manifest) == 270
    assert roofline.stored_weight_bytes({"files": {"config.json": {"bytes": 1}}}) is None


@pytest.mark.parametrize(
    "stored_dtype, effective_dtype, quantized, expected",
    [
        ("bfloat16", "float32", False, 2000),
        ("bfloat16", "bfloat16", False, 1000),
        ("float16", "float32", True, 1000),
        (None, "float32", False, 1000),
    ],  # fmt: skip
)
def test_engine_weight_bytes_follow_the_dtype_the_engine_runs(stored_dtype, effective_dtype, quantized, expected):
    assert roofline.engine_weight_bytes(1000, stored_dtype, effective_dtype, quantized) == expected


def test_decode_fraction_of_the_bandwidth_bound():
    # 16 GB of weights on a 5300 GB/s device: at most 331 decode steps/s; 10 ms per step is 100/s.
    weights = 16e9
    assert roofline.decode_fraction(weights, 0.010, 5300) == pytest.approx(100 / (5300 / 16))
    assert roofline.decode_fraction(weights, None, 5300) is None and roofline.decode_fraction(None, 0.01, 5300) is None


def test_bandwidth_comes_from_the_study_first_then_the_device_table():
    assert roofline.bandwidth("AMD Instinct MI300X", {}) == (
        5300.0,
        next(row["source"] for row in roofline.device_table() if row["match"] == "MI300X"),
    )
    assert roofline.bandwidth("AMD Instinct MI300X", {"MI300": 5000}) == (5000.0, "study")
    assert roofline.bandwidth("Intel(R) Xeon(R) CPU", {}) is None
    assert roofline.bandwidth(None, {".*": 20}) is None


def test_a_point_without_a_device_name_has_no_bound():
    # A GPU cell that failed before its engine named the GPU: a null in the column, NaN in pandas.
    # Found on the two-node test cluster, where the report of such a study crashed on it.
    import pandas as pd

    points = pd.DataFrame({"device_name": ["NVIDIA H200", None, float("nan")]})
    assert [roofline.bandwidth(name, {}) for name in points["device_name"]][1:] == [None, None]
    assert roofline.bandwidth(float("nan"), {".*": 20}) is None


@pytest.mark.parametrize(
    "name, gb_s",
    [
        ("NVIDIA H200", 4800),  # the name nvidia-smi gave on a real H200 (issue 19)
        ("AMD Instinct MI325X", 6000),
        ("AMD_Instinct_MI355X", 8000),  # vLLM's ROCm platform names it so
        ("AMD Instinct MI300X", 5300),
    ],
)
def test_device_table_knows_the_current_datacenter_gpus(name, gb_s):
    assert roofline.bandwidth(name)[0] == gb_s
