"""`bigbatch bench`'s quick measurements against what they must show, by counting."""

from __future__ import annotations

import pytest

from bigbatch.tools import bench


def test_activation_memory_falls_as_micro_over_global():
    rows = bench.measure_memory(64, (1, 8, 32, 64))
    for row in rows:
        assert row.full_batch_fraction == pytest.approx(row.micro_batch_size / 64, abs=0.01)
    assert [row.gradient_accumulation_steps for row in rows] == [64, 8, 2, 1]
    assert "| 8 x 8 |" in bench.format_memory(rows, 64)


@pytest.mark.slow
def test_ddp_counts_one_all_reduce_per_step_against_k():
    rows = bench.measure_ddp((1, 3), steps=1, width=32)
    counts = {
        (row.gradient_accumulation_steps, row.method): row.all_reduces_per_step for row in rows
    }
    assert counts == {
        (1, "sync every micro-batch"): 1,
        (1, "bigbatch"): 1,
        (3, "sync every micro-batch"): 3,
        (3, "bigbatch"): 1,
    }
    assert "gradient all-reduces per step" in bench.format_ddp(rows)
