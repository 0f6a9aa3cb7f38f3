"""benchmarks/batchnorm.py: the smoke run exits 0 and prints its table; the table's figures.

The accuracies themselves are not tested (they are measurements); what is checked is that the
smoke run trains through `bigbatch.fit` without littering runs/, and that steps to 95% and the
table are read off the evaluation curve as a hand computation says.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "batchnorm.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_batchnorm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_exits_0_prints_a_table_and_writes_nothing_here(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--results-dir", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # a run directory left behind would appear here as runs/
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    assert header.split("|")[1].strip() == "micro-batch" and set(rule) <= set("|-")
    assert len(rows) == 1 and len(rows[0].split("|")) == len(header.split("|"))
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    micro, accumulation = int(cells[0]), int(cells[1])
    assert micro * accumulation == 256
    for accuracy, reached in zip(cells[2::2], cells[3::2]):
        assert accuracy.endswith("%") and 0.0 <= float(accuracy[:-1]) <= 100.0
        assert reached == "-" or int(reached) >= 1
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # smoke writes no results
    assert "%|" not in completed.stderr  # no progress bar


def test_steps_to_target_is_the_first_evaluated_step_at_or_above_95_percent() -> None:
    bench = load_script()
    curve = ((2, 0.50), (4, 0.9499), (6, 0.95), (8, 0.93), (10, 0.97))
    assert bench.Cell(4, "keep", curve, 0.1, 1.0).steps_to_target == 6
    never = bench.Cell(4, "keep", ((2, 0.5), (4, 0.94)), 0.1, 1.0)
    assert never.steps_to_target is None and never.final_accuracy == 0.94


def test_table_has_a_row_per_micro_batch_and_two_columns_per_policy() -> None:
    bench = load_script()
    cells = [
        bench.Cell(2, "keep", ((2, 0.9), (4, 0.96)), 0.1, 1.0),
        bench.Cell(2, "freeze", ((2, 0.8), (4, 0.9)), 0.1, 1.0),
        bench.Cell(64, "keep", ((2, 0.951), (4, 0.99)), 0.1, 1.0),
    ]
    lines = bench.table(cells).splitlines()
    assert lines[0] == (
        "| micro-batch | accumulation | keep acc | keep steps to 95% | freeze acc "
        "| freeze steps to 95% |"
    )
    assert lines[2] == "| 2 | 128 | 96.0% | 4 | 90.0% | - |"
    assert lines[3] == "| 64 | 4 | 99.0% | 2 |  |  |"
