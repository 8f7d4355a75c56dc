"""The house rules that keep the code readable (docs/architecture.md), checked on the source.

Floors: utils/ (1) -> models/ (2) -> inference/ (3) -> ui_classification/ and the scripts (4).
A module imports only from its own floor or below; nothing imports a script.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

FLOORS = {"utils": 1, "models": 2, "inference": 3, "ui_classification": 4}
SCRIPTS = {path.stem for path in REPO.glob("*.py")}  # train, infer, export, split_dataset, runui, ...
SOURCE_DIRS = ["utils", "models", "inference", "ui_classification", "bench"]
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    found = sorted(REPO.glob("*.py"))
    for folder in SOURCE_DIRS:
        found += sorted((REPO / folder).rglob("*.py"))
    return found


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import, function-level ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _upward_imports(path: Path, root: Path = REPO) -> list[str]:
    relative = path.relative_to(root)
    here = FLOORS.get(relative.parts[0], 5 if len(relative.parts) == 1 else 0)
    problems = []
    for line, module in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
        top = module.split(".")[0]
        if top in SCRIPTS and len(relative.parts) > 1 and relative.parts[0] != "bench":
            problems.append(f"{relative}:{line} imports the script {module}")
        elif FLOORS.get(top, 0) > here and here != 0:
            problems.append(f"{relative}:{line} imports {module}, a floor above it")
    return problems


def test_no_import_runs_back_up_a_floor():
    problems = [problem for path in _sources() if path.parts[-2] != "bench" for problem in _upward_imports(path)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule itself works: a utils module importing inference, models or a script is caught."""
    (tmp_path / "utils").mkdir()
    bad = tmp_path / "utils" / "bad.py"
    bad.write_text("from inference.predictor import Predictor\nimport models.registry\nimport utils.files\n"
                   "def f():\n    import train\n")
    assert len(_upward_imports(bad, tmp_path)) == 3


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_80_lines(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(REPO)}: {', '.join(long)}"
