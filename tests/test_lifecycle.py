"""Ownership of containers, leftovers, hardening flags and secret names (pure logic, no Docker)."""

import os
import subprocess
import sys

import pytest
from cellbench import config, containers, lifecycle, models, paths, runner


def label(host="h1", boot="b1", pid=42, ticks="1000"):
    return f"{host}:{boot}:{pid}:{ticks}"


def alive_only(*living):
    return lambda pid, ticks: (pid, ticks) in living


@pytest.mark.parametrize(
    ("runner_label", "gone"),
    [
        (label(), False),  # the runner lives
        (label(ticks="999"), True),  # same pid, another process: the pid was reused
        (label(pid=43), True),  # the runner exited
        (label(boot="b0"), True),  # the host rebooted since
        (label(host="h2"), None),  # another host's runner: not judged from here
        (None, None),  # no label: from before the label existed
        ("garbage", True),
    ],
)
def test_runner_is_gone(runner_label, gone):
    assert lifecycle.runner_is_gone(runner_label, "h1", "b1", alive_only((42, "1000"))) is gone


def test_leftovers_keep_live_and_foreign_runs():
    found = [
        {"name": "live", "state": "running", "labels": {lifecycle.LABEL_RUNNER: label()}},
        {"name": "dead", "state": "running", "labels": {lifecycle.LABEL_RUNNER: label(pid=7)}},
        {"name": "elsewhere", "state": "running", "labels": {lifecycle.LABEL_RUNNER: label(host="h2", pid=7)}},
        {"name": "old-running", "state": "running", "labels": {}},
        {"name": "old-exited", "state": "exited", "labels": {}},
    ]
    stale = lifecycle.leftovers(found, "h1", "b1", alive_only((42, "1000")))
    assert [c["name"] for c in stale] == ["dead", "old-exited"]


def test_stale_run_dirs_are_those_of_gone_runners_on_this_host(tmp_path):
    def run_dir(cell, run, owner):
        work = paths.run_dir(cell, run, tmp_path)
        work.mkdir(parents=True)
        if owner is not None:
            (work / lifecycle.RUN_OWNER).write_text(owner + "\n")
        return work

    live = run_dir("a-0000000001", "r1", label())
    dead = run_dir("a-0000000001", "r2", label(pid=7))
    rebooted = run_dir("b-0000000002", "r3", label(boot="b0"))
    foreign = run_dir("b-0000000002", "r4", label(host="h2", pid=7))
    unlabelled = run_dir("c-0000000003", "r5", None)  # its runner may be writing the file now
    (paths.cell_dir("c-0000000003", tmp_path) / "round-1").mkdir()  # a round, not a run directory
    assert lifecycle.stale_run_dirs(tmp_path, "h1", "b1", alive_only((42, "1000"))) == [dead, rebooted]
    assert live.exists() and foreign.exists() and unlabelled.exists()


def test_clean_runs_removes_only_folders_of_gone_runners(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_label = lifecycle.runner_label(child.pid)
    child.wait()
    for run, owner in (("dead", gone_label), ("live", lifecycle.runner_label())):
        work = paths.run_dir("a-0000000001", run, tmp_path / paths.RESULTS)
        work.mkdir(parents=True)
        (work / lifecycle.RUN_OWNER).write_text(owner)
    done = subprocess.run(
        [sys.executable, "-m", "cellbench.cli", "clean", "--runs", "--origin", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout == f"removed {paths.run_dir('a-0000000001', 'dead', tmp_path / paths.RESULTS)}\n"
    assert [p.name for p in paths.run_dirs(tmp_path / paths.RESULTS)] == [".run-live"]


@pytest.mark.parametrize("origin", ["", "a\nb"])  # empty once meant every origin
def test_clean_refuses_an_origin_that_is_no_path(capsys, origin):
    from cellbench import cli

    with pytest.raises(SystemExit):
        cli.main(["clean", "--containers", "--origin", origin])
    assert f"argument --origin: {origin!r} is not a folder's path" in capsys.readouterr().err


def test_clean_runs_says_in_one_line_when_there_is_nothing_to_clean(tmp_path, capsys):
    from cellbench import cli

    missing = tmp_path / "gone"
    for origin, message in (
        (str(missing), f"cellbench: clean: no results folder at '{missing}/results' (run it where snakemake ran"),
        ("x" * 300, "File name too long"),  # the system's refusal in one line, not a traceback
    ):
        assert cli.main(["clean", "--runs", "--origin", origin]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_runner_label_names_this_process():
    host, boot, pid, ticks = lifecycle.runner_label().rsplit(":", 3)
    assert int(pid) == os.getpid() and boot == lifecycle.boot_id()
    assert lifecycle.runner_is_gone(lifecycle.runner_label(), host, boot) is False


def test_a_finished_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_label = lifecycle.runner_label(child.pid)
    child.wait()
    host, boot, _, _ = child_label.rsplit(":", 3)
    assert lifecycle.runner_is_gone(child_label, host, boot) is True


def test_pipeline_pid_is_the_nearest_snakemake_else_the_parent():
    # A process named snakemake starts a shell that starts python, as Snakemake runs a job.
    script = (
        "import os; from cellbench.lifecycle import pipeline_pid, parent_of; "
        "print(pipeline_pid(), os.getppid(), parent_of(os.getppid()))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    job = f"bash -c '{sys.executable} -c \\\"{script}\\\"; true'; true"
    done = subprocess.run(["bash", "-c", f'exec -a snakemake bash -c "{job}"'], capture_output=True, text=True, env=env)
    pipeline, parent, grandparent = (int(x) for x in done.stdout.split())
    assert pipeline == grandparent != parent
    assert lifecycle.pipeline_pid() == os.getppid()  # pytest has no snakemake above it


def test_hardening_flags():
    cpu = containers.hardening_flags("cpu", containers.CONTAINER_USER)
    assert cpu[:2] == ["--user", "65534:65534"] and "--cap-drop" in cpu and "no-new-privileges" in cpu
    assert "--cap-drop" not in containers.hardening_flags("rocm", containers.CONTAINER_USER)
    assert containers.hardening_flags("cpu", None) == []


def test_hardened_command_has_no_privilege_and_keeps_labels(study):
    cell = config.expand_cells(study)[0]
    argv = containers.docker_run_command(
        cell,
        run_id="r1",
        image_ref="sha256:abc",
        model_dir="/m",
        out_dir="/o",
        scripts_dir="/s",
        environ={},
        labels={lifecycle.LABEL_RUNNER: "h:b:1:2"},
        user=containers.CONTAINER_USER,
    )
    assert "--privileged" not in argv and "--cap-add" not in argv
    assert argv[argv.index("--network") + 1] == "none"
    assert any(arg.endswith(":/model:ro") for arg in argv)
    assert f"{lifecycle.LABEL_RUNNER}=h:b:1:2" in argv
    assert argv[argv.index("--memory") + 1] == study["defaults"]["resources"]["memory"]


def test_publish_is_all_or_nothing(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    moves = {tmp_path / "a": tmp_path / "out-a", tmp_path / "b": tmp_path / "missing-dir" / "out-b"}
    with pytest.raises(FileNotFoundError):
        runner._publish(moves)
    assert not (tmp_path / "out-a").exists()


def test_models_are_shared_for_reading(tmp_path):
    (tmp_path / "sub").mkdir(mode=0o700)
    (tmp_path / "sub" / "weights").write_bytes(b"w")
    (tmp_path / "sub" / "weights").chmod(0o600)
    models.share_for_reading(tmp_path)
    assert (tmp_path / "sub" / "weights").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o755


def test_an_oom_kill_inside_the_container_names_memory_over_the_engines_vague_error():
    raw = {"status": "failed", "error": "RuntimeError: Engine core initialization failed.", "oom_kills": 1}
    status, error = runner._outcome(raw, 1, False, 60, "")
    assert status == "failed" and error.startswith("out of memory")
    assert "600m limit" in runner._outcome(None, 137, False, 60, "", memory="600m")[1]
