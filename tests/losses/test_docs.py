"""docs/losses.md: both loops run as written and print what the page shows.

Numbers are compared to 1e-3 (a CPU with other vector units may round the last digit apart);
everything else on every line must match.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
TEXT = PAGE.read_text(encoding="utf-8")
EXAMPLES = re.findall(r"```python\n(.*?)```\n\nOutput:\n\n```text\n(.*?)```", TEXT, flags=re.S)
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def test_the_page_has_its_two_loops():
    assert len(EXAMPLES) == 2
    assert "dpo_loss" in EXAMPLES[0][0] and "policy_gradient_loss" in EXAMPLES[1][0]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_the_loop_prints_what_the_page_shows(index, tmp_path):
    code, shown = EXAMPLES[index]
    environment = {**os.environ, "PYTHONPATH": str(PAGE.parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed, expected = done.stdout.splitlines(), shown.splitlines()
    assert len(printed) == len(expected), done.stdout
    for line, page_line in zip(printed, expected, strict=True):
        assert NUMBER.sub("#", line) == NUMBER.sub("#", page_line), (line, page_line)
        for got, want in zip(NUMBER.findall(line), NUMBER.findall(page_line), strict=True):
            assert float(got) == pytest.approx(float(want), abs=1e-3), (line, page_line)
