"""llama.cpp's llama-server through Snakemake in the real llama.cpp image: one serve cell at
batch 1 and 4 (4 parallel slots, continuous batching) beside an offline llama.cpp cell at batch
4 (its 4 requests run one after another), on the Q4_1 GGUF. Prints both cells' batch-4 output
tok/s; the host is busy with other work, so the figures are indicative and no ratio is asserted."""

import json

import pytest
from cellbench import contract
from test_e2e_engines import cell_rows, run_study, tiny_study

pytestmark = pytest.mark.e2e

CELLS = [
    # Quality asked of the served cell only: llama-server has no prompt log-probabilities, so the
    # step says unsupported at once, and the speed rows stand.
    {"name": "served", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1", "mode": "serve",
     "quality": {"prompts": 2, "max_tokens": 4, "chunk_chars": 600}},
    {"name": "offline", "image": "llamacpp", "engine": "llamacpp", "quantization": "Q4_1",
     "sweep": {"batch_size": [4]}},
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("llama-server")
    study = tiny_study(CELLS)
    study["study"] = "tiny-llama-server"
    study["defaults"]["sweep"].update(batch_size=[1, 4], input_len=[16], output_len=[16], repeats=1, rounds=1)
    study["defaults"]["quality"] = False
    # One thread each: on a host whose cores other work keeps busy, llama.cpp's threads wait for
    # each other at every step (seen: 0.5 tok/s with 2 threads); one thread has no one to wait for.
    study["defaults"]["engine_args"].update(n_threads=1, n_threads_batch=1)
    return run_study(workdir, study)


def test_llama_server_serves_batch_1_and_4(finished):
    rows = cell_rows(finished, "served").sort_values("batch_size")
    assert list(rows["batch_size"]) == [1, 4] and set(rows["status"]) == {"ok"}, rows["error"].iloc[0]
    assert set(rows["mode"]) == {"serve"} and set(rows["engine"]) == {"llamacpp"}
    assert (rows["output_tokens"] == rows["batch_size"] * 16).all()  # ignore_eos and max_tokens held
    for column in ("ttft_p50_s", "tpot_p50_s", "itl_p50_s", "latency_p99_s"):
        assert (rows[column] > 0).all(), column
    assert (rows["ttft_p50_s"] < rows["latency_p50_s"]).all()
    assert set(rows["effective_quantization"]) == {"Q4_1"}


def test_llama_server_reports_what_it_resolved(finished):
    rows = cell_rows(finished, "served")
    effective = json.loads(rows["effective_json"].iloc[0])
    assert effective["server"] == "llama-server" and effective["mode"] == "serve"
    assert effective["n_slots"] == 4  # the largest batch
    assert effective["n_ctx_slot"] == 256 and effective["n_ctx"] == 4 * 256  # max_model_len per slot
    assert effective["n_threads"] == 1 and effective["n_threads_batch"] == 1  # the study's n_threads
    assert effective["engine_args"] == {"max_model_len": 256, "n_threads": 1, "n_threads_batch": 1}
    assert "--parallel" in effective["argv"] and effective["build"]
    assert contract.missing_reports(effective, "llamacpp") == []
    assert "engine-contract" not in rows["findings_json"].iloc[0]


def test_llama_server_quality_is_unsupported_and_its_speed_rows_stand(finished):
    rows = cell_rows(finished, "served")
    assert set(rows["quality_status"]) == {"unsupported"} and set(rows["status"]) == {"ok"}
    assert "prompt log-probabilities" in rows["quality_error"].iloc[0]


def test_parallel_slots_against_requests_one_after_another(finished):
    served = cell_rows(finished, "served").set_index("batch_size")
    offline = cell_rows(finished, "offline").set_index("batch_size")
    assert set(offline["status"]) == {"ok"}
    slots, series = served.loc[4, "output_tok_s"], offline.loc[4, "output_tok_s"]
    # Indicative only: other work shares this host's cores while the test runs.
    print(f"\nbatch 4, output tok/s (busy host): llama-server -np 4 {slots:.1f}, offline llama.cpp {series:.1f}, "
          f"ratio {slots / series:.2f}")  # fmt: skip
    assert slots > 0 and series > 0
