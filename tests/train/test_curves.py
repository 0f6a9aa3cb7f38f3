"""The run's curves read right: integer step ticks, a zero-based memory axis, equal series once.

The figure's axes are read back (tick values, limits, lines), not its pixels.
"""

from __future__ import annotations

import pytest

from bigbatch.train.curves import draw_run

pytest.importorskip("matplotlib")

MIB = 2**20


def train_records(num_steps: int, **series) -> list[dict]:
    """Train records of steps 1..num_steps; each series a function of the step."""
    return [
        {"step": step, "kind": "train", **{key: f(step) for key, f in series.items()}}
        for step in range(1, num_steps + 1)
    ]


def panel(figure, title: str):
    (ax,) = [ax for ax in figure.axes if ax.get_ylabel() == title]
    return ax


@pytest.mark.parametrize("num_steps", [3, 7, 12])
def test_step_ticks_are_whole_steps(num_steps):
    figure = draw_run(train_records(num_steps, loss=lambda step: 1.0 / step))
    for ax in figure.axes:
        figure.canvas.draw()
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert len(ticks) >= 2
        assert all(float(tick).is_integer() for tick in ticks), ticks


def test_a_memory_wobble_of_one_mib_reads_flat():
    """2 GiB give or take 1 MiB: the axis starts at zero, so the line spans under 0.1% of it."""
    records = train_records(
        10, loss=lambda s: 1.0 / s, peak_memory_bytes=lambda s: 2**31 + (s % 2) * MIB
    )
    ax = panel(draw_run(records), "peak memory (MiB)")
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top >= 2048 + 1
    (line,) = ax.get_lines()
    low, high = min(line.get_ydata()), max(line.get_ydata())
    assert (low, high) == (2048, 2049)
    assert (high - low) / (top - bottom) < 0.001


def test_samples_and_items_equal_at_every_step_are_one_line():
    speed = {"samples_per_s": lambda s: 100.0 + s, "items_per_s": lambda s: 100.0 + s}
    ax = panel(draw_run(train_records(8, **speed)), "throughput (per s)")
    assert [line.get_label() for line in ax.get_lines()] == ["samples = items"]
    speed["items_per_s"] = lambda s: 3 * (100.0 + s)  # a sample of three items
    ax = panel(draw_run(train_records(8, **speed)), "throughput (per s)")
    assert [line.get_label() for line in ax.get_lines()] == ["samples", "items"]
    assert list(ax.get_lines()[1].get_ydata()) == [3 * (100.0 + s) for s in range(1, 9)]
