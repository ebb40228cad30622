"""The code's layout as a contract: test modules share helpers through tests/helpers.py and
tests/references.py, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a function-level import counts too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_test_module_imports_another():
    tests = {p.stem for p in TESTS.glob("test_*.py")}
    offenders = {p.name: sorted(imported_modules(p) & tests) for p in TESTS.glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}
