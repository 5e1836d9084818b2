"""The shape of the code: the layer contract (import-linter) and the size limits.

The contract lives in pyproject.toml and `make test` runs `lint-imports` on the real tree;
these tests show that the contract bites (an upward import or a cycle added to a copy of the
tree breaks it) and check the size limits that ruff cannot express (lines per function and
per module)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "flame"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(src_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src_root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=src_root, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(SRC, root / "flame", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _add_import(root: Path, module: str, statement: str) -> None:
    """Append an import inside a function, the kind a lazy import would hide."""
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = path.with_suffix("") / "__init__.py"
    path.write_text(path.read_text() + f"\n\ndef _added_by_test():\n    {statement}\n")


@pytest.mark.slow
def test_the_real_tree_keeps_the_contract(tmp_path):
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module, statement, expected", [
    ("flame.store", "import flame.cli", "flame.store is not allowed to import flame.cli"),  # library -> command line
    ("flame.fileio", "from flame import model", "flame.fileio is not allowed to import flame.model"),  # utility up
    ("flame.model", "from flame import train", "flame.model is not allowed to import flame.train"),  # library -> stage
    ("flame.prompts", "from flame import facets", "No cycles are allowed in flame"),  # a cycle in one layer
])
def test_an_upward_import_or_a_cycle_breaks_the_contract(tmp_path, module, statement, expected):
    root = _copy_tree(tmp_path)
    _add_import(root, module, statement)
    result = _lint_imports(root)
    assert result.returncode != 0 and expected in result.stdout, result.stdout[-3000:]


def _limits() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flame"]["size-limits"]


def _sizes(paths):
    """(module, lines, [(function, lines)]) for every Python file under `paths`."""
    for path in sorted(p for base in paths for p in base.rglob("*.py")):
        text = path.read_text()
        functions = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        yield str(name), len(text.splitlines()), functions


def test_no_module_or_function_over_the_size_limits():
    limits = _limits()
    excused = limits.get("exceptions", {})
    over = []
    for module, lines, functions in _sizes([SRC, ROOT / "benchmarks"]):
        if lines > limits["module-lines"] and module not in excused:
            over.append(f"{module}: {lines} lines")
        over += [f"{module}:{name}: {n} lines" for name, n in functions
                 if n > limits["function-lines"] and f"{module}:{name}" not in excused]
    assert not over, "over the size limits in pyproject.toml [tool.flame.size-limits]:\n" + "\n".join(over)


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(_limits()["function-lines"] + 1))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    (_, _, functions), = list(_sizes([tmp_path]))
    assert functions == [("long", _limits()["function-lines"] + 2)]
