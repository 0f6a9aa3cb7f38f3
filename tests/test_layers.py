"""The layers of docs/design.md kept honest: imports point down, through `__init__` too.

core <- data <- tools <- train <- cli; recipes and integrations import the core only; `planning`,
`choices` and `units` (the base) import nothing of the package above them. The package face
(`bigbatch` itself, its `__init__`) sits at the top beside the command line: no lower layer takes
a name from it. The package is read with `ast` (nothing is imported, so imports inside functions
count too); importing a module runs the `__init__` of every package above it, so those count as
imports of the importer, except the face's, which runs on the way to every module and loads only
the base (see `test_plan_loads_no_torch`). A few checks run Python to see which modules an import
really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "bigbatch"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
# The top level: __init__, __main__ and at most four loose modules.
MAX_LOOSE_MODULES = 4

# What each layer may import (itself included). The package face may import anything, `cli` all
# but `integrations`; no lower layer may import the face.
FACE = "bigbatch"
BASE = {"bigbatch.planning", "bigbatch.choices", "bigbatch.units"}
# Packages of the core layer that sit at the top for their public name (`bigbatch.losses`).
CORE_AT_THE_TOP = {"bigbatch.losses"}
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "core": {"base", "core"},
    "recipes": {"base", "core", "recipes"},
    "integrations": {"base", "core", "integrations"},
    "data": {"base", "core", "data"},
    "tools": {"base", "core", "data", "recipes", "tools"},
    "train": {"base", "core", "data", "recipes", "tools", "train"},
    "cli": {"base", "core", "data", "recipes", "tools", "train", "cli", "face"},
    "face": {"base", "core", "data", "recipes", "integrations", "tools", "train", "cli", "face"},
}


def module_files() -> list[Path]:
    """Every .py file of the package, recursively, as paths relative to src/bigbatch."""
    return sorted(path.relative_to(PACKAGE_DIR) for path in PACKAGE_DIR.rglob("*.py"))


def module_name(relative: Path) -> str:
    """``recipes/digits.py`` -> ``bigbatch.recipes.digits``; a package's __init__ is the package."""
    parts = ("bigbatch", *relative.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    """The layer of a module of the package; ``face`` for the package face ``bigbatch`` itself."""
    if name == FACE:
        return "face"
    if name in BASE or any(name.startswith(f"{base}.") for base in BASE):
        return "base"
    if name in ("bigbatch.cli", "bigbatch.__main__"):
        return "cli"
    if name in CORE_AT_THE_TOP or any(name.startswith(f"{core}.") for core in CORE_AT_THE_TOP):
        return "core"
    return name.split(".")[1]


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def runtime_imports(source: str, name: str, *, is_package: bool = False) -> set[str]:
    """Dotted names module ``name`` imports when it runs: ``from a import b`` gives a.b.

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
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imported_modules(
    source: str, name: str, modules: set[str], *, is_package: bool = False
) -> set[str]:
    """The package's modules that running ``source`` (module ``name``) imports.

    ``from bigbatch.core import batches`` names ``bigbatch.core.batches`` (a module) and runs
    ``bigbatch/core/__init__.py``; ``from bigbatch.core.engine import Accumulator`` names a
    module and a class, of which only the module is kept. The face's ``__init__`` runs on the way
    to every module, so it counts only where a name is taken from it: ``import bigbatch`` or
    ``from bigbatch import __version__``, not ``from bigbatch import recipes``.
    """
    targets: set[str] = set()
    for imported in runtime_imports(source, name, is_package=is_package):
        parts = imported.split(".")
        prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
        found = [prefix for prefix in prefixes if prefix in modules]  # each runs its __init__
        targets.update(prefix for prefix in found if prefix != FACE or prefix == found[-1])
    return targets - {name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules that importing it runs, `__init__` of their packages too."""
    modules = {module_name(relative): relative for relative in module_files()}
    return {
        name: imported_modules(
            (PACKAGE_DIR / relative).read_text(encoding="utf-8"),
            name,
            set(modules),
            is_package=relative.name == "__init__.py",
        )
        for name, relative in modules.items()
    }


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every chain by which a module reaches a layer it may not import, through any __init__."""
    violations = []
    for start in sorted(graph):
        layer = layer_of(start)
        chains = {start: [start]}
        stack = [start]
        while stack:
            current = stack.pop()
            for target in sorted(graph.get(current, ())):
                if target in chains:
                    continue
                chains[target] = [*chains[current], target]
                stack.append(target)
                if layer_of(target) not in ALLOWED[layer]:
                    violations.append(f"{layer}: {' -> '.join(chains[target])}")
    return violations


def test_the_layers_are_found() -> None:
    layers = {layer_of(module_name(relative)) for relative in module_files()}
    assert layers == set(ALLOWED), "a module sits in no known layer: add it to ALLOWED"


def test_imports_point_down_the_layers() -> None:
    violations = layer_violations(import_graph())
    assert not violations, "lower layers import higher ones:\n" + "\n".join(violations)


def test_a_violation_through_an_init_is_caught() -> None:
    """The check above can fail: an arrow up, straight or hidden in a package's __init__."""
    straight = {"bigbatch.core.engine": {"bigbatch.train.config"}}
    assert layer_violations(straight) == ["core: bigbatch.core.engine -> bigbatch.train.config"]
    through_init = {
        "bigbatch.recipes.digits": {"bigbatch.core"},
        "bigbatch.core": {"bigbatch.data.loader"},
    }
    assert layer_violations(through_init) == [
        "core: bigbatch.core -> bigbatch.data.loader",
        "recipes: bigbatch.recipes.digits -> bigbatch.core -> bigbatch.data.loader",
    ]
    at_the_top = {"bigbatch.losses.policy": {"bigbatch.train.config"}}  # core, though at the top
    assert layer_violations(at_the_top) == ["core: bigbatch.losses.policy -> bigbatch.train.config"]
    graph = import_graph()  # and the graph reader sees __init__ files on the way
    assert "bigbatch.core" in graph["bigbatch.data.loader"]


def test_a_lower_layer_taking_a_name_from_the_package_face_is_caught() -> None:
    """The face loads the trainer lazily: a lower layer importing it climbs to the top."""
    up = {"bigbatch.train.report": {"bigbatch"}, "bigbatch": {"bigbatch.planning"}}
    assert layer_violations(up) == ["train: bigbatch.train.report -> bigbatch"]
    modules = {FACE, "bigbatch.recipes", "bigbatch.train", "bigbatch.train.report"}
    name = "bigbatch.train.report"
    for climbs in ("from bigbatch import __version__", "import bigbatch", "import bigbatch as bb"):
        assert FACE in imported_modules(climbs, name, modules), climbs
    for passes in ("from bigbatch import recipes", "import bigbatch.recipes", "from . import x"):
        assert FACE not in imported_modules(passes, name, modules), passes


def test_the_top_level_keeps_few_loose_modules() -> None:
    loose = [
        path.name
        for path in PACKAGE_DIR.glob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    ]
    assert len(loose) <= MAX_LOOSE_MODULES, f"loose modules at the top: {sorted(loose)}"


@pytest.mark.parametrize("relative", module_files(), ids=lambda path: path.as_posix())
def test_functions_are_under_the_line_limit(relative: Path) -> None:
    tree = ast.parse((PACKAGE_DIR / relative).read_text(encoding="utf-8"))
    too_long = {
        f"{node.name} (line {node.lineno})": node.end_lineno - node.lineno + 1
        for node in functions(tree)
        if node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not too_long, f"{relative}: functions over {MAX_FUNCTION_LINES} lines {too_long}"


@pytest.mark.parametrize("relative", module_files(), ids=lambda path: path.as_posix())
def test_modules_are_under_the_line_limit(relative: Path) -> None:
    """One concept a module: a module past the limit holds two (docs/design.md, layers)."""
    lines = len((PACKAGE_DIR / relative).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{relative}: {lines} lines, over {MAX_MODULE_LINES}"


@pytest.mark.parametrize("relative", module_files(), ids=lambda path: path.as_posix())
def test_every_module_says_what_it_owns(relative: Path) -> None:
    tree = ast.parse((PACKAGE_DIR / relative).read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{relative} has no module docstring"


def test_the_import_reader_sees_every_form() -> None:
    """The checks above are only as good as `runtime_imports`: every import form is seen."""
    source = (
        "from __future__ import annotations\n"
        "import torch.nn as nn\n"
        "from typing import TYPE_CHECKING\n"
        "from . import config\n"
        "from .metrics import MetricsLogger\n"
        "from bigbatch.train import checkpoint as checkpoints\n"
        "if TYPE_CHECKING:\n"
        "    from bigbatch.train.trainer import Trainer\n"
        "def late() -> None:\n"
        "    import bigbatch.train.report\n"
    )
    found = runtime_imports(source, "bigbatch.recipes.example")
    assert {"torch.nn", "bigbatch.train.checkpoint", "bigbatch.train.report"} <= found
    assert {"bigbatch.recipes.config", "bigbatch.recipes.metrics.MetricsLogger"} <= found
    assert not any("trainer" in name for name in found)  # TYPE_CHECKING only


def loaded_modules(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_plan_loads_no_torch() -> None:
    loaded = loaded_modules("from bigbatch.planning import plan; plan(224, 16, 7)")
    assert "torch" not in loaded
    assert "numpy" not in loaded  # the sample plan alone: the token names load on first use
    loaded = loaded_modules("import bigbatch.planning as p; p.TokenUnit([3]); p.plan_tokens([3])")
    assert "torch" not in loaded
    assert "bigbatch.planning.unit" in loaded


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_accumulator_loads_nothing_of_the_run_machinery() -> None:
    torch_alone = loaded_modules("import torch")
    loaded = loaded_modules("from bigbatch import Accumulator")
    extra = top_level(loaded - torch_alone)
    heavy = {"pydantic", "yaml", "tqdm", "tensorboard", "matplotlib", "safetensors", "sklearn"}
    assert not extra & heavy, f"from bigbatch import Accumulator loads {sorted(extra & heavy)}"
    ours = {name for name in loaded if name.startswith("bigbatch.")}
    assert {"bigbatch.core.engine"} <= ours
    assert not {name for name in ours if name.split(".")[1] in ("train", "tools", "data", "cli")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_public_names_stay() -> None:
    loaded = loaded_modules(
        "import bigbatch\n"
        "assert bigbatch.plan(224, 16, 7).gradient_accumulation_steps == 2\n"
        "names = [bigbatch.Accumulator, bigbatch.Trainer, bigbatch.fit, bigbatch.WindowLoader,\n"
        "         bigbatch.GlobalBatchSampler, bigbatch.BatchSizeSchedule, bigbatch.StepResult,\n"
        "         bigbatch.LossFn, bigbatch.Plan, bigbatch.scale_learning_rate]\n"
        "assert sorted(bigbatch.__all__) == sorted(n for n in dir(bigbatch) if n in\n"
        "    bigbatch.__all__)\n"
    )
    assert "bigbatch.train.trainer" in loaded
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import bigbatch

        _ = bigbatch.Nope  # type: ignore[attr-defined]


def test_bigbatch_plan_on_the_command_line_loads_no_torch() -> None:
    loaded = loaded_modules(
        "import contextlib, io\n"
        "from bigbatch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    code = main(['plan', '--global-batch-size', '224', '--world-size', '16',\n"
        "                 '--micro-batch-size', '7'])\n"
        "assert code == 0, code\n"
    )
    assert "torch" not in loaded


def test_the_integrations_load_no_framework():
    """The adapters need none of the frameworks to import: the user's objects bring them."""
    loaded = loaded_modules(
        "import bigbatch.integrations.huggingface, bigbatch.integrations.accelerate\n"
        "import bigbatch.integrations.lightning\n"
    )
    frameworks = {"transformers", "accelerate", "lightning", "pytorch_lightning"}
    assert not top_level(loaded) & frameworks
