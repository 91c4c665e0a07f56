"""The bad-config corpus: every file in tests/bad_configs/ is refused, by `cellbench validate` and
by the real entry point `snakemake -n --configfile FILE`, with one line naming the key at fault.

The first line of each file is `# expect: <fragment of that line>`; a JSON study cannot hold a
comment, so a NAME.json case has its fragment in NAME.expect beside it. Refusal must start no
container and change nothing under results/ (a planted results tree is compared before/after).
"""

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cellbench import cli

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted([*(ROOT / "tests" / "bad_configs").glob("*.yaml"), *(ROOT / "tests" / "bad_configs").glob("*.json")])
MISSING = ROOT / "tests" / "bad_configs" / "no-such-study.yaml"
# Snakemake reads --configfile itself, before the Snakefile runs: for a file it cannot read or
# parse it prints its own message, which names the file but is not ours to shorten.
SNAKEMAKE_OWN = {
    "43-bad-yaml.yaml": "Config file is not valid JSON or YAML",
    "44-not-a-mapping.yaml": "Config file must be given as JSON or YAML with keys at top level",
    # Snakemake opens it as UTF-8 and shows its own UnicodeDecodeError traceback.
    "61-not-utf8.yaml": "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 62",
    MISSING.name: "No such file or directory",
}


def expected(path: Path) -> str:
    if path == MISSING:
        return "cannot read study file (No such file or directory)"
    if path.suffix == ".json":
        return path.with_suffix(".expect").read_text().strip()
    first = path.read_bytes().split(b"\n", 1)[0].decode()  # the rest of a case may not be UTF-8
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <message fragment>'"
    return first.removeprefix("# expect: ")


def cellbench_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("cellbench:")]


def results_tree(workdir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted((workdir / "results").rglob("*"))
    }


def containers_of(workdir: Path) -> list[str]:
    argv = ["docker", "ps", "-a", "--quiet", "--filter", f"label=cellbench.origin={workdir}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else []


def test_corpus_is_large_and_every_case_states_its_message():
    assert len(CORPUS) >= 30
    messages = [expected(path) for path in CORPUS]
    assert len(set(messages)) == len(messages), "two cases expect the same message"


@pytest.mark.parametrize("path", [*CORPUS, MISSING], ids=lambda p: p.name)
def test_validate_refuses_with_one_line(path, capsys):
    assert cli.main(["validate", str(path)]) != 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("cellbench: ") and expected(path) in err, err


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """`snakemake -n` (the entry point, seconds a case) on every case, two at a time, beside planted results."""
    workdir = tmp_path_factory.mktemp("refused")
    (workdir / "results" / "cells" / "kept-0123456789").mkdir(parents=True)
    (workdir / "results" / "cells" / "kept-0123456789" / "metrics.parquet").write_bytes(b"PAR1 earlier results")
    (workdir / "results" / "summary.parquet").write_bytes(b"PAR1 earlier summary")
    before = results_tree(workdir)

    def dry_run(path: Path) -> subprocess.CompletedProcess:
        argv = ["snakemake", "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
                "--directory", str(workdir), "--configfile", str(path)]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip([*CORPUS, MISSING], pool.map(dry_run, [*CORPUS, MISSING]), strict=True))
    return done, before, results_tree(workdir), containers_of(workdir)


@pytest.mark.e2e
@pytest.mark.parametrize("path", [*CORPUS, MISSING], ids=lambda p: p.name)
def test_snakemake_refuses_with_one_line(dry_runs, path):
    done = dry_runs[0][path]
    output = done.stdout + done.stderr
    assert done.returncode != 0
    if path.name in SNAKEMAKE_OWN:
        assert SNAKEMAKE_OWN[path.name] in output, output[-2000:]
        return
    lines = cellbench_lines(output)
    assert len(lines) == 1 and expected(path) in lines[0], output[-2000:]
    assert "Traceback" not in output


@pytest.mark.e2e
def test_refusals_start_nothing_and_change_nothing(dry_runs):
    _, before, after, containers = dry_runs
    assert after == before
    assert containers == []
