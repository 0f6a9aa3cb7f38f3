"""The batch unit: budgets from a position, splits into rows, descriptions, step counts.

Expected values are built by hand or from the definitions written here (numpy's generator seeded
with (seed, epoch); in tokens the next samples until their tokens reach the budget), not from the
code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.planning import (
    EpochOrder,
    SampleUnit,
    TokenUnit,
    global_batch_sizes,
    locate,
    plan,
    stage_at,
)


def reference_run(lengths, seed, budget, epochs, drop_last=False):
    """(samples, tokens) of each global batch of `epochs` passes, by the definition."""
    n, sizes, epoch, position = len(lengths), [], 0, 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        left = sum(lengths[i] for i in order[position:])
        if position == n or (drop_last and left < budget):
            epoch, position = epoch + 1, 0
            order = np.random.default_rng([seed, epoch]).permutation(n)
        if epoch >= epochs:
            return sizes
        taken = tokens = 0
        while position < n and tokens < budget:
            tokens += lengths[order[position]]
            taken, position = taken + 1, position + 1
        sizes.append((taken, tokens))


def test_a_sample_budget_takes_that_many_from_the_position():
    unit, order = SampleUnit(10), EpochOrder(10, seed=0, epoch=0)
    assert [unit.num_taken(order, start, 4) for start in (0, 4, 8)] == [4, 4, 2]
    assert unit.num_units(order, 3, 7) == 4
    assert order._order is None  # a run in samples never draws the order to move on


def test_a_token_budget_takes_samples_until_their_tokens_reach_it():
    lengths = [5, 1, 7, 2, 3]
    unit, order = TokenUnit(lengths), EpochOrder(5, seed=2, epoch=0)
    in_order = [lengths[i] for i in np.random.default_rng([2, 0]).permutation(5)]
    taken = unit.num_taken(order, 1, 6)
    assert sum(in_order[1 : 1 + taken]) >= 6 > sum(in_order[1:taken])
    assert unit.num_units(order, 0, 5) == 18 == unit.epoch_units()


def test_a_sample_split_gives_each_rank_contiguous_rows():
    unit = SampleUnit(100, world_size=2, micro_batch_size=2)
    split = unit.split(8, np.arange(5))  # a short global batch: 5 of 8
    # 5 items over 2 ranks x 2 micro-steps, micro-step-major: rank 0 [2, 1], rank 1 [1, 1].
    assert split.plan.window(0) == (((0,), (1,)), ((2,),))
    assert split.plan.window(1) == (((3,),), ((4,),))
    assert (split.num_samples, split.num_tokens, split.num_padded_tokens) == (5, None, None)


def test_a_token_split_reports_its_figures():
    unit = TokenUnit([6, 4, 2, 9], world_size=2, micro_batch_tokens=9)
    split = unit.split(12, np.array([0, 1, 2]))
    assert split.num_samples == 3 and split.num_tokens == 12
    padded = sum(
        len(rows) * max((sum([6, 4, 2][p] for p in row) for row in rows), default=0)
        for rank in range(2)
        for rows in split.plan.window(rank)
    )
    assert split.num_padded_tokens == padded
    steps = {len(split.plan.window(rank)) for rank in range(2)}
    assert len(steps) == 1  # every rank the same number of micro-steps


def test_the_sample_micro_batch_holds_over_stages():
    """First global batch 64 over 2 ranks, micro 8: 4 micro-steps; a later 8 keeps micro <= 4."""
    unit = SampleUnit(1000, 2, 8, first_global_batch=64)
    assert unit.describe(64) == plan(64, 2, 8)
    assert unit.describe(8) == plan(8, 2, 4)
    assert unit.granularity == 16
    derived = SampleUnit(1000, 2, gradient_accumulation_steps=4, first_global_batch=64)
    assert derived.micro == 8 and derived.describe(64).gradient_accumulation_steps == 4
    derived.micro = 16  # a probed value replaces the derived one, and the plans made with it
    assert derived.describe(128) == plan(128, 2, 16)


def test_the_token_micro_setting_and_description():
    unit = TokenUnit([30, 2, 5], world_size=2, micro_batch_tokens=60, packing=True)
    budget = unit.describe(100)
    assert (budget.global_batch_tokens, budget.micro_batch_tokens, budget.longest) == (100, 60, 30)
    assert budget.packing and budget.micro_batch_size == 2  # 60 // 30 rows
    assert unit.granularity == 120
    assert TokenUnit([30, 2], world_size=3).granularity == 90  # unlimited: the longest sample
    with pytest.raises(ValueError, match="set micro_batch_tokens >= 30"):
        TokenUnit([30, 2], micro_batch_tokens=20)


def test_errors_keep_their_unit_names():
    with pytest.raises(TypeError, match="global_batch_size must be an integer"):
        SampleUnit(5).check_global_batch(2.0, drop_last=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="larger than the dataset"):
        SampleUnit(5).check_global_batch(6, drop_last=True)
    with pytest.raises(ValueError, match="batch_size_schedule: a global batch of 6"):
        SampleUnit(5).check_schedule(6, "batch_size_schedule")
    TokenUnit([3, 4]).check_schedule(7, "global_batch_tokens")  # the whole set: one step
    with pytest.raises(ValueError, match=r"global_batch_tokens: a global batch of 8 tokens is la"):
        TokenUnit([3, 4]).check_schedule(8, "global_batch_tokens")
    with pytest.raises(ValueError, match=r"\(7 tokens in 2 samples\): use at most 7"):
        TokenUnit([3, 4]).check_schedule(10**12, "batch_size_schedule")


def test_micro_batch_tokens_beyond_the_padded_set_is_refused():
    TokenUnit([3, 4], micro_batch_tokens=8).check_schedule(7, "global_batch_tokens")  # 2 x 4
    with pytest.raises(ValueError, match=r"micro_batch_tokens 9 .* = 8; 7 tokens unpadded"):
        TokenUnit([3, 4], micro_batch_tokens=9).check_schedule(7, "global_batch_tokens")


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    budget=st.integers(1, 80),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    drop_last=st.booleans(),
)
def test_token_steps_and_sizes_follow_the_definition(lengths, budget, epochs, seed, drop_last):
    budget = min(budget, sum(lengths)) if drop_last else budget
    expected = reference_run(lengths, seed, budget, epochs, drop_last)
    unit = TokenUnit(lengths)
    sizes = global_batch_sizes(
        unit, lambda step: budget, epochs=epochs, seed=seed, drop_last=drop_last
    )
    assert sizes == expected
    stages = [(0, budget)]
    assert unit.count_steps(epochs, stages, seed=seed, drop_last=drop_last) == len(expected)


def test_locate_moves_to_the_next_epoch_at_its_end():
    unit = SampleUnit(10)

    def order_at(epoch):
        return EpochOrder(10, 0, epoch)

    assert locate(unit, order_at, 0, 8, 4) == (0, 8, 10)
    assert locate(unit, order_at, 0, 8, 4, drop_last=True) == (1, 0, 4)
    assert locate(unit, order_at, 0, 10, 4) == (1, 0, 4)
    assert stage_at([(0, 4), (3, 8)], 2) == 4 and stage_at([(0, 4), (3, 8)], 3) == 8
