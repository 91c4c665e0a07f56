"""How the host judges a finished container: status and one-line error (pure parts of the runner)."""

from cellbench import runner

CRASH_LOG = (
    "INFO loading\n"
    "torch._inductor.exc.InductorError: CppCompileError: C++ compile error\n"
    "RuntimeError: Engine core initialization failed. See root cause above.\n"
)


def test_ok_needs_both_the_script_and_the_container_to_agree():
    assert runner._outcome({"status": "ok"}, 0, False, 60, "") == ("ok", None)
    status, error = runner._outcome({"status": "ok"}, 137, False, 60, "")
    assert status == "failed" and "137" in error


def test_engine_error_from_the_script_is_kept():
    raw = {"status": "failed", "error": "RuntimeError: Engine core initialization failed. See root cause above."}
    assert runner._outcome(raw, 1, False, 60, CRASH_LOG) == ("failed", raw["error"])


def test_known_unsupported_signature_in_the_log_wins_over_a_vague_error():
    raw = {"status": "failed", "error": "RuntimeError: Engine core initialization failed."}
    log = "AttributeError: '_C' has no attribute 'cpu_gemm_wna16'\n" + CRASH_LOG
    status, error = runner._outcome(raw, 1, False, 60, log)
    assert status == "failed" and "cpu_gemm_wna16" in error


def test_timeout_names_the_engine_error_logged_before_the_kill():
    status, error = runner._outcome({"status": "loading"}, None, True, 60, CRASH_LOG)
    assert status == "timeout"
    assert error.startswith("cell exceeded its timeout of 60 s; container killed after the engine logged: ")
    assert "RuntimeError: Engine core initialization failed" in error


def test_container_that_never_reported():
    assert runner._outcome(None, 125, False, 60, "docker: Error response from daemon: x\n")[0] == "failed"
    assert runner._outcome(None, 137, False, 60, "")[1].startswith("container killed (exit 137")
