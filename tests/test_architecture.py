"""The architecture's rules, checked on the source: the core's dependencies, function length, thin CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "model_core"
MAX_FUNCTION_LINES = 60  # body lines, docstring excluded


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "shipped" not in p.parts)


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_neither_the_plugin_nor_qt(path):
    imported = _imported(ast.parse(path.read_text()))
    bad = sorted(n for n in imported if n.split(".")[0] in {"napari_ar3d", "napari", "qtpy", "PyQt5", "PyQt6",
                                                            "PySide2", "PySide6", "magicgui", "widgets", "sample_data"})
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def _body_lines(node: ast.FunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return (body[-1].end_lineno - body[0].lineno + 1) if body else 0


def test_no_core_function_is_longer_than_a_screen():
    long = []
    for path in _modules(CORE):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_every_subcommand_is_a_thin_module_over_the_core():
    from model_core.cli import COMMANDS

    names = {c.name for c in COMMANDS}
    modules = {p.stem for p in (CORE / "cli").glob("*.py") if not p.stem.startswith("_")}
    assert names <= modules, f"subcommands without a module of their own: {sorted(names - modules)}"
    for name in names:
        tree = ast.parse((CORE / "cli" / f"{name}.py").read_text())
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and "arguments" not in n.name]
        long = [f.name for f in functions if _body_lines(f) > 40]  # option declarations are not logic
        assert not long, f"cli/{name}.py: {long} hold logic; move it into the core"


def test_importing_the_plugin_and_the_vocabulary_imports_no_torch():
    code = ("import sys, napari_ar3d, model_core.vocabulary, model_core.errors, model_core.data.phantoms\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
