"""The token plan: micro-batches of similar lengths, packing, the length checks, the budget.

Every figure is checked against the lengths given here (padded sizes, positions, sums), not
against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from bigbatch.planning import TokenBudget, plan_tokens, sample_lengths


class Sequences:
    """A dataset of lists, with or without a ``lengths`` attribute."""

    def __init__(self, samples, lengths=None):
        self.samples = samples
        if lengths is not None:
            self.lengths = lengths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_micro_batches_group_similar_lengths_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.zipf(1.5, size=400) * 8, 256).tolist()
    plan = plan_tokens(lengths, world_size=2, micro_batch_tokens=512)
    order = np.random.default_rng(0).permutation(len(lengths))
    chunks = [order[i : i + 16] for i in range(0, len(order), 16)]  # fixed 16 rows, in order
    padded = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    fixed_padding = 1 - sum(lengths) / padded
    assert plan.padding_fraction < 0.05 < fixed_padding
    for window in plan.micro_batches:
        for rows in window:
            assert len(rows) * max((lengths[p] for (p,) in rows), default=0) <= 512


def test_packing_fills_rows_and_keeps_each_sample_whole():
    lengths = [30, 3, 4, 5, 25, 2, 2, 1, 30, 9]
    plan = plan_tokens(lengths, world_size=2, micro_batch_tokens=60, packing=True)
    for window in plan.micro_batches:
        for rows in window:
            fills = [sum(lengths[p] for p in row) for row in rows]
            assert all(fill <= 30 for fill in fills) and len(rows) * max(fills, default=0) <= 60
    positions = sorted(
        p for window in plan.micro_batches for rows in window for r in rows for p in r
    )
    assert positions == list(range(len(lengths)))
    unpacked = plan_tokens(lengths, 2, 60)
    assert plan.padding_fraction < 0.1
    assert plan.gradient_accumulation_steps < unpacked.gradient_accumulation_steps


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise micro_batch_tokens to at least 30"):
        plan_tokens([30, 2], micro_batch_tokens=20)
    with pytest.raises(ValueError, match="lengths"):
        sample_lengths(Sequences([[0, 0]]))
    with pytest.raises(ValueError, match="2 entries for 1 samples"):
        sample_lengths(Sequences([[0]], lengths=[1, 2]))


def test_lengths_from_the_hook_or_the_attribute():
    assert sample_lengths(Sequences([[0] * 3, [0], [0] * 4], [3, 1, 4])).tolist() == [3, 1, 4]
    samples = Sequences([[0] * 5, [0] * 2])
    assert sample_lengths(samples, lambda sample: len(sample) - 1).tolist() == [4, 1]


def test_the_budget_summary_states_the_arithmetic():
    text = str(TokenBudget(4096, world_size=2, micro_batch_tokens=512))
    assert "ceil(2048 / 512) = 4 micro-steps" in text


def test_a_rank_window_is_its_rows():
    plan = plan_tokens([6, 4, 2], world_size=2, micro_batch_tokens=6)
    assert [plan.window(rank) for rank in range(2)] == [(((0,),), ()), (((1,),), ((2,),))]
