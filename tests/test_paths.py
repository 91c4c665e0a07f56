"""The results layout has one source, cellbench.paths: no rule, module or script spells a path
under results/ itself; and the layout's functions give the paths the documentation shows."""

import ast
import glob
import io
import re
import tokenize
from pathlib import Path

import pytest
from cellbench import machines, paths

ROOT = Path(__file__).resolve().parents[1]
# String tokens: in Python >= 3.12 an f-string's text is FSTRING_MIDDLE tokens.
STRING_TOKENS = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
# A string token's prefix, quotes and text (an FSTRING_MIDDLE token has neither prefix nor quotes).
QUOTED = re.compile(r"([rbfuRBFU]*(?:'''|\"\"\"|'|\")|)(.*?)(?:'''|\"\"\"|'|\")?", re.DOTALL)
# archive.py builds its member paths itself until it moves to cellbench.paths; it may not add any.
PENDING: dict[str, int] = {}


def _spells_results(text: str) -> bool:
    return "results/" in text or text == "results"


def _python_literals(text: str) -> list[tuple[int, str]]:
    """String constants of a module (f-string parts included), docstrings left out: prose may name
    the layout."""
    tree = ast.parse(text)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def _snakemake_literals(text: str) -> list[tuple[int, str]]:
    """String tokens of a Snakefile (Snakemake's grammar is not Python's, its tokens are), without
    prefix and quotes; comments are not tokens of this kind."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return [(token.start[0], QUOTED.fullmatch(token.string)[2]) for token in tokens if token.type in STRING_TOKENS]


def results_literals(path: Path) -> list[str]:
    text = path.read_text()
    found = _python_literals(text) if path.suffix == ".py" else _snakemake_literals(text)
    return [f"{line}: {value}" for line, value in sorted(found) if _spells_results(value)]


def checked_files() -> list[Path]:
    files = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    files += sorted((ROOT / "workflow" / "cellbench").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    return [path for path in files if path.name != "paths.py" or path.parent.name != "cellbench"]


def test_no_rule_module_or_script_spells_a_results_path():
    files = checked_files()
    assert len(files) > 30 and any(path.suffix == ".smk" for path in files)
    spelled = {}
    for path in files:
        rel = str(path.relative_to(ROOT))
        found = results_literals(path)
        if len(found) > PENDING.get(rel, 0):
            spelled[rel] = found
    assert not spelled, f"paths spelled outside cellbench.paths (call a paths function): {spelled}"


def test_the_check_sees_literals_in_rules_and_modules_but_not_prose(tmp_path):
    rule = tmp_path / "x.smk"
    rule.write_text('# results/ in a comment\nrule x:\n    output:\n        "results/x.txt",\n')
    assert results_literals(rule) == ["4: results/x.txt"]
    rule.write_text('rule y:\n    log:\n        f"{LOGS}/y.log", "results", r"""results/z""",\n')
    assert results_literals(rule) == ["3: results", "3: results/z"]
    module = tmp_path / "x.py"
    module.write_text(
        '"""Writes results/x."""\n\n\ndef f(d):\n    """Into results/y."""\n'
        '    return d / "results" / "x", f"{d}/results/z"\n'
    )
    assert results_literals(module) == ["6: /results/z", "6: results"]


def test_the_layout_by_hand():
    cell = "vllm-bf16-0123456789"
    assert paths.image_manifest("cpu") == Path("results/images/cpu.json")
    assert paths.image_archive("cpu") == Path("results/images/cpu.tar")
    assert paths.model_manifest("smollm2-135m") == Path("results/models/smollm2-135m/manifest.json")
    assert paths.cell_metrics(cell, 2) == Path(f"results/cells/{cell}/round-2/metrics.parquet")
    assert paths.cell_provenance(cell, 2) == Path(f"results/cells/{cell}/round-2/provenance.json")
    assert paths.cell_log(cell, 2) == Path(f"results/cells/{cell}/round-2/engine.log")
    assert paths.run_dir(cell, "RUN") == Path(f"results/cells/{cell}/.run-RUN")
    assert paths.round_log(cell, 2) == Path(f"results/logs/cells/{cell}/round-2.log")
    assert paths.image_log("cpu") == Path("results/logs/images/cpu.log")
    assert paths.model_log("m") == Path("results/logs/models/m.log")
    assert paths.step_log("aggregate") == Path("results/logs/aggregate.log")
    assert paths.summary() == Path("results/summary.parquet")
    assert paths.summary_markdown() == Path("results/tables/summary.md")
    assert paths.machines_csv(Path("t")) == Path("t/machines.csv")
    assert paths.verdicts() == Path("results/tables/verdicts.md")
    assert paths.plot("latency.png") == Path("results/plots/latency.png")
    assert paths.report_html() == Path("results/report/index.html")
    assert paths.runs_dir() == Path("results/runs")
    assert paths.archive_dir() == Path("results/archive")
    assert paths.aggregate_cache() == Path("results/cache/aggregate")
    assert paths.progress_cache() == Path("results/cache/progress.json")
    assert paths.imported_archive("m1", "A1") == Path("results/imported/m1/A1")
    # Another root: the names inside an archive, or an imported archive's folder.
    assert str(paths.cell_metrics(cell, 1, Path())) == f"cells/{cell}/round-1/metrics.parquet"
    assert paths.summary(Path("/w")) == Path("/w/summary.parquet")
    with pytest.raises(ValueError, match="not a plot"):
        paths.plot("other.png")


def test_rules_patterns_are_the_functions_with_wildcards():
    assert (
        str(paths.cell_metrics(paths.CELL_ID, paths.ROUND)) == "results/cells/{cell_id}/round-{round}/metrics.parquet"
    )
    assert str(paths.round_log(paths.CELL_ID, paths.ROUND)) == "results/logs/cells/{cell_id}/round-{round}.log"
    assert str(paths.model_manifest(paths.MODEL)) == "results/models/{model}/manifest.json"
    assert re.fullmatch(paths.CELL_ID_SHAPE, "vllm-bf16-0123456789")
    assert not re.fullmatch(paths.CELL_ID_SHAPE, "vllm-bf16")
    assert re.fullmatch(paths.ROUND_SHAPE, "12") and not re.fullmatch(paths.ROUND_SHAPE, "0")
    assert re.fullmatch(paths.one_of(["a.b", "c"]), "a.b") and not re.fullmatch(paths.one_of(["a.b"]), "axb")


def test_cell_rounds_and_round_files():
    cells = {"b-0000000001": {"sweep": {"rounds": 1}}, "a-0000000002": {"sweep": {"rounds": 2}}}
    assert paths.cell_rounds(cells) == [("a-0000000002", 1), ("a-0000000002", 2), ("b-0000000001", 1)]
    assert paths.round_files(cells, "engine.log")[1] == Path("results/cells/a-0000000002/round-2/engine.log")


def test_imported_metrics_patterns_find_rounds_and_pre_round_archives(tmp_path):
    archive = paths.imported_archive("m1", "20260101T000000Z", tmp_path)
    per_round = paths.cell_metrics("c1-0123456789", 1, archive)
    per_cell = paths.cell_dir("c2-0123456789", archive) / "metrics.parquet"
    local = paths.cell_metrics("c1-0123456789", 1, tmp_path)  # this machine's own: not imported
    for path in (per_round, per_cell, local):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    found = [file for pattern in paths.imported_metrics_patterns(tmp_path) for file in glob.glob(str(pattern))]
    assert sorted(found) == sorted([str(per_round), str(per_cell)])
    assert machines.imported_metrics(tmp_path) == sorted([str(per_round), str(per_cell)])


def test_a_cellbench_from_another_checkout_is_refused(tmp_path, capsys, monkeypatch):
    from cellbench import cli

    assert paths.other_checkout({}) is None  # not called by a Snakefile
    assert paths.other_checkout({paths.CHECKOUT_ENV: str(paths.PROJECT_ROOT)}) is None
    (tmp_path / "link").symlink_to(paths.PROJECT_ROOT)  # the same checkout by another name
    assert paths.other_checkout({paths.CHECKOUT_ENV: str(tmp_path / "link")}) is None
    assert paths.other_checkout({paths.CHECKOUT_ENV: str(tmp_path)}) == str(tmp_path)
    monkeypatch.setenv(paths.CHECKOUT_ENV, str(tmp_path))
    assert cli.main(["runs"]) == 2
    err = capsys.readouterr().err
    assert f"runs the code in '{paths.PROJECT_ROOT}', but the Snakefile that called it is in '{tmp_path}'" in err
