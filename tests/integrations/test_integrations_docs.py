"""docs/integrations.md: every python example on the page runs as written (nothing downloaded)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("lightning")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_its_examples():
    assert len(EXAMPLES) == 5


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(PAGE.parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
