"""benchmarks/noise_scale.py: the smoke run prints its tables; its model check inverts the formula.

The figures themselves are timings and training curves, not tested; what is checked is that every
code path runs (three fits per recipe, the overhead timing, the plot) and that the B_noise it
infers from steps-to-target inverts McCandlish et al.'s S(B) = S_min (1 + B_noise / B).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "noise_scale.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_noise_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def table_rows(output: str) -> list[list[str]]:
    """Body rows of every markdown table in the output (header and separator rows dropped)."""

    def separator(line: str) -> bool:
        return line.startswith("|") and set(line) <= set("|-: ")

    lines = output.splitlines() + [""]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line, following in zip(lines, lines[1:])
        if line.startswith("|") and not separator(line) and not separator(following)
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_exits_0_and_prints_both_tables() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = table_rows(completed.stdout)
    runs = [row for row in rows if len(row) == 8]
    assert [(row[0], row[1].split()[0]) for row in runs] == [
        (task, arm) for task in ("digits", "tinylm") for arm in ("small", "large", "adaptive")
    ]
    for row in runs:  # steps of the run, final eval loss, time
        steps, final_loss = row[7].split(",")[:2]
        assert int(steps) >= 1 and float(final_loss) > 0
    overhead = [row for row in rows if len(row) == 6]
    assert {row[0] for row in overhead} == {"digits", "tinylm"}
    for row in overhead:
        assert float(row[5].split()[0]) > 0


@pytest.mark.parametrize("noise_scale", [40.0, 300.0])
def test_implied_noise_scale_inverts_the_step_model(noise_scale: float) -> None:
    script = load_script()
    minimum_steps, small, large = 50.0, 32, 512

    def arm(batch: int) -> object:
        steps = round(minimum_steps * (1 + noise_scale / batch) * 1000)  # S(B), scaled to ints
        train = [{"step": s, "global_batch_size": batch} for s in range(1, steps + 1)]
        return script.ArmResult("t", "x", train, [(steps, 0, 0.5)], 1.0, 0.0)

    implied = script.implied_noise_scale(arm(small), arm(large))
    assert implied == pytest.approx(noise_scale, rel=1e-3)


def test_implied_noise_scale_is_none_when_a_run_missed_the_target() -> None:
    script = load_script()
    train = [{"step": 1, "global_batch_size": 32}]
    reached = script.ArmResult("t", "small", train, [(1, 32, 0.5)], 1.0, 0.0)
    missed = script.ArmResult("t", "large", train, [(1, 32, 2.0)], 1.0, 0.0)
    assert script.implied_noise_scale(reached, missed) is None
