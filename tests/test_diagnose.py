import pytest
from cellbench import diagnose

SIGNATURES = diagnose.signatures()


@pytest.mark.parametrize("signature", SIGNATURES, ids=[s["id"] for s in SIGNATURES])
def test_every_signature_finds_its_examples(signature):
    for line in signature.get("examples", []):
        found = diagnose.findings(f"INFO unrelated line\n{line}\nINFO done\n", rows=(signature,))
        assert [f["id"] for f in found] == [signature["id"]], line
        assert found[0]["line"] == line.strip()[: diagnose.MAX_LINE] and found[0]["remediation"]
        assert "{" not in found[0]["finding"] + found[0]["remediation"]  # every placeholder was filled
    assert signature["source"].startswith("https://")


@pytest.mark.parametrize("signature", SIGNATURES, ids=[s["id"] for s in SIGNATURES])
def test_no_signature_fires_on_a_clean_log(signature):
    clean = "INFO 11-26 04:21:00 [llm.py:1] Supported tasks: ['generate']\nINFO Avg prompt throughput: 5 tokens/s\n"
    assert diagnose.findings(clean, rows=(signature,)) == []


def test_threshold_signature_fires_only_above_it():
    slow = next(s for s in SIGNATURES if "above" in s)
    below = f"Loading weights took {slow['above'] / 2} seconds"
    above = f"Loading weights took {slow['above'] * 2} seconds"
    assert diagnose.findings(below, rows=(slow,)) == []
    assert str(slow["above"] * 2) in diagnose.findings(above, rows=(slow,))[0]["finding"]


def test_the_error_line_counts_and_repeats_are_counted():
    found = diagnose.findings("x\n", error="AttributeError: '_C' has no attribute 'cpu_gemm_wna16'")
    assert [f["id"] for f in found] == ["unsupported-quantization-cpu"]
    found = diagnose.findings("OutOfMemoryError a\nOutOfMemoryError b\n")
    assert found[0]["count"] == 2 and found[0]["line"] == "OutOfMemoryError a"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "x"}, "missing severity"),
        (
            {
                "id": "x",
                "severity": "bad",
                "pattern": "a",
                "finding": "f",
                "remediation": "r",
                "source": "s",
                "examples": ["a"],
            },
            "severity 'bad'",
        ),  # fmt: skip
        (
            {
                "id": "x",
                "severity": "info",
                "pattern": "(",
                "finding": "f",
                "remediation": "r",
                "source": "s",
                "examples": ["a"],
            },
            "bad pattern",
        ),  # fmt: skip
        (
            {
                "id": "x",
                "severity": "info",
                "pattern": "a",
                "above": 1,
                "finding": "f",
                "remediation": "r",
                "source": "s",
                "examples": ["a"],
            },
            "named group",
        ),  # fmt: skip
    ],
)
def test_a_bad_signature_row_is_a_one_line_error(row, message):
    with pytest.raises(diagnose.SignatureError, match=message):
        diagnose.check_signature(row)


def test_vllm_kernel_path_lines_of_issue_19():
    """The seed's symptom, the explicit-awq line and the attention backend, as vLLM formats them."""
    text = (
        "awq quantization is not fully optimized yet. The speed can be slower than non-quantized models.\n"
        "Detected that the model can run with awq_marlin, however you specified quantization=awq explicitly, "
        "so forcing awq. Use quantization=awq_marlin for faster inference\n"
        "Using TRITON_ATTN backend out of potential backends: ['ROCM_ATTN', 'TRITON_ATTN'].\n"
    )
    found = {f["id"]: f for f in diagnose.findings(text)}
    assert "awq kernels" in found["quantization-not-optimized"]["finding"]
    assert "quantization=awq_marlin" in found["awq-marlin-not-used"]["remediation"]
    assert found["attention-backend"]["finding"] == "vLLM runs attention with its TRITON_ATTN backend in this cell."


def test_a_signature_needs_examples_or_says_why_it_has_none():
    row = {"id": "x", "severity": "info", "pattern": "a", "finding": "f", "remediation": "r", "source": "s"}
    with pytest.raises(diagnose.SignatureError, match="missing examples"):
        diagnose.check_signature(row)
    assert diagnose.check_signature({**row, "no_example": "format not read in the source"})
    tunable = next(s for s in SIGNATURES if s["id"] == "tunableop-arch-mismatch")
    assert not tunable.get("examples") and tunable["no_example"]  # its former example was invented
