"""The user's own code: found from the current directory, and its errors keep their traceback.

The recipe is the example of docs/recipes.md, taken from the page. It runs under a stand-in for
the `bigbatch` console script (a script in another directory, so the current directory is not on
the path as it is under ``python -m``). An exception in the user's loss_fn or module shows its
traceback with exit code 1; bigbatch's own one-line errors show theirs only with --debug.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = "import re, sys\nfrom bigbatch.cli import main\nsys.exit(main())\n"
BROKEN_LOSS = """
from mypkg.tasks import build as build_regression


def build(config):
    recipe = build_regression(config)

    def loss_fn(model, micro_batch):
        raise ValueError("my loss_fn cannot read this micro-batch")

    recipe.loss_fn = loss_fn
    return recipe
"""
BROKEN_IMPORT = "import a_package_nobody_installed\n\ndef build(config):\n    pass\n"


def docs_example() -> str:
    text = (ROOT / "docs" / "recipes.md").read_text()
    match = re.search(r"```python\n(# mypkg/tasks.py.*?)```", text, re.DOTALL)
    assert match, "docs/recipes.md lost its example recipe"
    return match.group(1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A project directory with the docs' recipe, a broken one, and the console script apart."""
    work = tmp_path_factory.mktemp("project")
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "tasks.py").write_text(docs_example())
    (work / "broken.py").write_text(BROKEN_LOSS)
    (work / "broken_import.py").write_text(BROKEN_IMPORT)
    (work / "regression.yaml").write_text("recipe: mypkg.tasks:build\n")
    (work / ".bin").mkdir()  # the console script's own directory, as pip installs it
    (work / ".bin" / "bigbatch").write_text(CONSOLE_SCRIPT)
    return work


def console_script(work: Path, *argv: str, cwd: Path | None = None):
    """``bigbatch ARGV`` as the installed console script runs it: sys.path[0] is its directory."""
    script = work / ".bin" / "bigbatch"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), *argv],
        cwd=cwd or work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_docs_recipe_runs_from_the_current_directory_under_the_console_script(work, tmp_path):
    done = console_script(
        work, "train", "regression.yaml", "--set", "max_steps=5", "--no-progress",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: 5 steps" in done.stdout and (tmp_path / "run" / "final.safetensors").exists()
    # From elsewhere, the module is not found: one line saying where it looked.
    elsewhere = console_script(
        work, "train", str(work / "regression.yaml"), "--out", str(tmp_path / "x"), cwd=tmp_path
    )
    lines = elsewhere.stderr.strip().splitlines()
    assert elsewhere.returncode == 2 and len(lines) == 1, elsewhere.stderr[-2000:]
    assert "no module named 'mypkg'" in lines[0] and str(tmp_path) in lines[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("recipe", "shown"),
    [
        ("broken:build", ['broken.py", line 9, in loss_fn', "ValueError: my loss_fn cannot read"]),
        ("broken_import:build", ["ModuleNotFoundError", "a_package_nobody_installed"]),
    ],
    ids=["loss_fn raises", "module imports what is missing"],
)
def test_an_error_in_user_code_keeps_its_traceback(work, tmp_path, recipe, shown):
    done = console_script(
        work, "train", "--set", f"recipe={recipe}", "--set", "max_steps=2", "--no-progress",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr
    for fragment in shown:
        assert fragment in done.stderr, done.stderr[-3000:]
    assert "bigbatch train: error:" not in done.stderr


def test_debug_shows_the_traceback_of_a_usage_error_too(capsys):
    assert main(["train", "--set", "lr=-1", "--no-progress"]) == 2
    quiet = capsys.readouterr().err
    assert quiet.count("\n") == 1 and "Traceback" not in quiet
    for argv in (["--debug", "train", "--set", "lr=-1"], ["train", "--set", "lr=-1", "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "UsageError" in err
        assert err.strip().splitlines()[-1] == quiet.strip()
