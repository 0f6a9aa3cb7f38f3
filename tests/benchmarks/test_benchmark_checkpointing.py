"""benchmarks/checkpointing.py: the smoke run prints every row; its peak tracker sees every
allocation, live until freed.
"""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.test_benchmarks import load, run_smoke, table_rows


def test_live_bytes_counts_what_ops_allocate_until_it_is_freed() -> None:
    checkpointing = load("checkpointing")
    held = torch.ones(250)  # a parameter, say: among the resident bytes
    tracker = checkpointing.LiveBytes(resident=100)
    with tracker:
        transposed = held.view(10, 25).t()  # a view of a resident storage allocates nothing
        held.mul_(2)  # nor does an in-place update of it
        first = torch.ones(1000, dtype=torch.float64)  # 8,000 bytes
        second = first * 2  # 8,000 more while both live
        view = second[10:]  # a view allocates nothing
        del first
        third = torch.zeros(500, dtype=torch.float32)  # 2,000 after the first was freed
    assert tracker.peak == 100 + 16_000
    assert tracker.live == 100 + 8_000 + 2_000
    assert view.shape == (990,) and third.shape == (500,) and transposed.shape == (25, 10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_prints_every_row() -> None:
    rows = table_rows(run_smoke("checkpointing.py", timeout=240))
    labels = [row[1] for row in rows]
    assert labels == ["none", "every_2", "full", "auto (memory)", "auto (throughput)"]
    steps = {row[1]: int(row[4]) for row in rows}
    assert steps["auto (memory)"] == min(steps[p] for p in ("none", "every_2", "full"))
