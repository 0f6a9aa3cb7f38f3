"""STYLE.md kept honest: module and function sizes, and the import directions of plan and engine.

Everything is read with `ast` from the files under src/bigbatch, recursively; nothing is imported,
so the checks are fast and see imports inside functions too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "bigbatch"
# Every module, no exemptions: one over its limit is split by concept, never skipped here.
MAX_MODULE_LINES = 450
# Tighter limits for single modules: the accumulation math readable in one sitting.
MAX_LINES_FOR = {"engine.py": 400}
MAX_FUNCTION_LINES = 80
# plan.py is arithmetic only: importable and testable without torch.
TORCH_FREE = ("bigbatch.plan",)
# The engine works in anyone's loop: it never pulls in the run machinery, even indirectly.
ENGINE_MUST_NOT_IMPORT = (
    "config",
    "configfile",
    "checkpoint",
    "metrics",
    "report",
    "cli",
    "trainer",
)


def module_files() -> list[Path]:
    """Every .py file of the package, recursively, as paths relative to src/bigbatch."""
    return sorted(path.relative_to(PACKAGE_DIR) for path in PACKAGE_DIR.rglob("*.py"))


def module_name(relative: Path) -> str:
    """``recipes/digits.py`` -> ``bigbatch.recipes.digits``; a package's __init__ is the package."""
    parts = ("bigbatch", *relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(relative: Path) -> ast.Module:
    return ast.parse((PACKAGE_DIR / relative).read_text(encoding="utf-8"), str(relative))


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def runtime_imports(source: str, name: str, *, is_package: bool = False) -> set[str]:
    """Dotted names module ``name`` imports when it runs: ``from a import b`` gives a and a.b.

    Relative imports are resolved against the module's package; imports under
    ``if TYPE_CHECKING:`` are left out since they never run. Imports inside functions count.
    """
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_chains(start: str) -> dict[str, list[str]]:
    """Every name reachable from ``start`` through package modules, with the chain that gets there.

    The package's own ``__init__`` is not followed: ``from bigbatch import batches`` depends on
    ``batches``, and what ``bigbatch/__init__.py`` re-exports is not the importing module's choice.
    """
    files = {module_name(relative): relative for relative in module_files()}
    chains = {start: [start]}
    stack = [start]
    while stack:
        current = stack.pop()
        relative = files[current]
        source = (PACKAGE_DIR / relative).read_text(encoding="utf-8")
        for name in runtime_imports(source, current, is_package=relative.name == "__init__.py"):
            if name in chains:
                continue
            chains[name] = [*chains[current], name]
            if name in files and name != "bigbatch":
                stack.append(name)
    return chains


def test_the_package_is_found() -> None:
    names = {path.as_posix() for path in module_files()}
    assert {"plan.py", "engine.py", "__init__.py"} <= names
    assert any(name.startswith("recipes/") for name in names)  # recursive
    assert set(MAX_LINES_FOR) <= names, "MAX_LINES_FOR names a module that does not exist"


@pytest.mark.parametrize("relative", module_files(), ids=lambda path: path.as_posix())
def test_module_is_under_the_line_limit(relative: Path) -> None:
    key = relative.as_posix()
    limit = MAX_LINES_FOR.get(key, MAX_MODULE_LINES)
    lines = len((PACKAGE_DIR / relative).read_text(encoding="utf-8").splitlines())
    assert lines <= limit, (
        f"src/bigbatch/{key} has {lines} lines, the limit is {limit}: split it by concept "
        "(STYLE.md: one module per concept)"
    )


@pytest.mark.parametrize("relative", module_files(), ids=lambda path: path.as_posix())
def test_functions_are_under_the_line_limit(relative: Path) -> None:
    key = relative.as_posix()
    too_long = {
        f"{node.name} (line {node.lineno})": node.end_lineno - node.lineno + 1
        for node in functions(parse(relative))
        if node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not too_long, f"src/bigbatch/{key}: functions over {MAX_FUNCTION_LINES} lines {too_long}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_plan_imports_no_torch(module: str) -> None:
    torch_imports = {
        name: " -> ".join(chain)
        for name, chain in import_chains(module).items()
        if name == "torch" or name.startswith("torch.")
    }
    assert not torch_imports, f"{module} must not import torch: {torch_imports}"


def test_engine_imports_none_of_the_run_machinery() -> None:
    forbidden = {f"bigbatch.{name}" for name in ENGINE_MUST_NOT_IMPORT}
    found = {
        name: " -> ".join(chain)
        for name, chain in import_chains("bigbatch.engine").items()
        if name in forbidden or name.rpartition(".")[0] in forbidden
    }
    assert not found, f"bigbatch.engine must not import {sorted(forbidden)}: {found}"


def test_the_config_schema_does_not_import_its_loader() -> None:
    """config.py is the schema, configfile.py reads it: the arrow points one way, no cycle."""
    chains = import_chains("bigbatch.config")
    found = {name: " -> ".join(chain) for name, chain in chains.items() if "configfile" in name}
    assert not found, f"bigbatch.config must not import bigbatch.configfile: {found}"


def test_the_import_reader_sees_every_form() -> None:
    """The checks above are only as good as `runtime_imports`: every import form is seen."""
    source = (
        "from __future__ import annotations\n"
        "import torch.nn as nn\n"
        "from typing import TYPE_CHECKING\n"
        "from . import config\n"
        "from .metrics import MetricsLogger\n"
        "from bigbatch import checkpoint as checkpoints\n"
        "if TYPE_CHECKING:\n"
        "    from bigbatch.trainer import Trainer\n"
        "def late() -> None:\n"
        "    import bigbatch.report\n"
    )
    found = runtime_imports(source, "bigbatch.recipes.example")
    assert {"torch.nn", "bigbatch.checkpoint", "bigbatch.report"} <= found
    assert {"bigbatch.recipes.config", "bigbatch.recipes.metrics.MetricsLogger"} <= found
    assert not any("trainer" in name for name in found)  # TYPE_CHECKING only
