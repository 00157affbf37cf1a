"""Who may import whom, checked on every import statement (module level or deferred into a function), parsed with
`ast`:

- nothing under tests/ imports `bench` (a test runs a bench script as a subprocess, tests/helpers/bench.py);
- nothing under bench/, nftcore/ or kernels/ imports `tests` (what both need lives in nftcore.testing);
- nothing in nftcore outside nftcore/testing imports `nftcore.testing` (fixtures and references are not product code);
- a test module imports no other test module: shared helpers live in tests/helpers/ (or tests/conftest.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path` (or in `source`, as if it were that file), and for
    `from M import x` also "M.x" (x may be a module); relative imports are resolved against the file's package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(folders: list[str], forbidden: str, *, skip: str | None = None) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))
            if skip is None or not path.is_relative_to(ROOT / skip)
            for line, name in imported_modules(path) if under(name, forbidden)]


@pytest.mark.parametrize("folders,forbidden,skip", [
    (["tests"], "bench", None),
    (["bench", "nftcore", "kernels"], "tests", None),
    (["nftcore"], "nftcore.testing", "nftcore/testing"),
], ids=["tests-import-no-bench", "nothing-imports-tests", "product-imports-no-testing"])
def test_import_rules(folders, forbidden, skip):
    assert violations(folders, forbidden, skip=skip) == []


def test_test_modules_import_no_other_test_module():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / "tests").glob("test_*.py"))
           for line, name in imported_modules(path)
           if under(name, "tests") and name.split(".")[1].startswith("test_") and name.split(".")[1] != path.stem]
    assert bad == []


def test_the_parser_sees_deferred_and_relative_imports():
    """Not vacuous: an import inside a function and a relative import are both found, with their full names."""
    source = "def f():\n    from bench import harness\n\n\nfrom .jobs import ROOT\nimport tests.helpers\n"
    names = {name for _, name in imported_modules(ROOT / "tests" / "helpers" / "probe.py", source)}
    assert {"bench", "bench.harness", "tests.helpers.jobs", "tests.helpers.jobs.ROOT", "tests.helpers"} <= names
    assert under("bench.harness", "bench") and not under("benchmarks", "bench")
