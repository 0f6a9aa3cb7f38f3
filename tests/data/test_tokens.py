"""Global batches in tokens: the budget, every sample once per epoch, the split, resume.

The reference global batches are written here from their definition (numpy's generator seeded
with (seed, epoch); the next samples until their tokens reach the budget), and every figure of the
micro-batches is read from the collated tensors, not from the plan under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bigbatch.data.token_loader import TokenWindowLoader
from bigbatch.data.token_plan import TokenBudget, plan_tokens
from bigbatch.data.tokens import TokenBatchSampler, count_token_steps, sample_lengths

PAD = -1


def reference_batches(lengths, seed, budgets, drop_last=False):
    """(epoch, indices) of each step by the definition, independently of the code under test."""
    n, steps, epoch, position = len(lengths), [], 0, 0
    for budget in budgets:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        left = sum(lengths[i] for i in order[position:])
        if position == n or (drop_last and left < budget):
            epoch, position = epoch + 1, 0
            order = np.random.default_rng([seed, epoch]).permutation(n)
        taken, tokens = [], 0
        while position < n and tokens < budget:
            taken.append(int(order[position]))
            tokens += lengths[order[position]]
            position += 1
        steps.append((epoch, taken))
    return steps


class SequenceDataset(torch.utils.data.Dataset):
    """Sample i is a sequence of lengths[i] tokens, each the sample's index."""

    def __init__(self, lengths):
        self.lengths = list(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        return torch.full((self.lengths[index],), index)


def pad_collate(samples):
    length = max(len(s) for s in samples)
    padded = torch.full((len(samples), length), PAD)
    for row, sample in enumerate(samples):
        padded[row, : len(sample)] = sample
    return padded


def pack_collate(rows):
    return pad_collate([torch.cat(row) for row in rows])


def loaders(lengths, world_size, micro, budget_at, *, packing=False, seed=0, **kwargs):
    dataset = SequenceDataset(lengths)
    longest = max(lengths)

    def plan_for(budget, batch_lengths):
        return plan_tokens(
            batch_lengths,
            world_size,
            micro,
            packing=packing,
            row_tokens=longest if packing else None,
            global_batch_tokens=budget,
        )

    return [
        TokenWindowLoader(
            dataset,
            lengths=lengths,
            plan_for=plan_for,
            global_batch_tokens_at=budget_at,
            seed=seed,
            rank=rank,
            collate_fn=pad_collate,
            collate_packed=pack_collate if packing else None,
            **kwargs,
        )
        for rank in range(world_size)
    ]


def micro_batch_items(micro_batch):
    """The sample indices in a collated micro-batch, as many times as their tokens appear."""
    values = micro_batch[micro_batch != PAD].tolist()
    return values


def check_step(windows, lengths, micro):
    """One step over every rank: its items (each once), read from the tensors; checks shapes."""
    counts = {len(window.micro_batches) for window in windows}
    assert len(counts) == 1, f"ranks run different numbers of micro-steps: {counts}"
    items, rank_tokens = [], []
    for window in windows:
        tokens = 0
        for micro_batch in window.micro_batches:
            rows, length = micro_batch.shape
            if micro is not None:
                assert rows * length <= micro, (rows, length, micro)
            values = micro_batch_items(micro_batch)
            for index in set(values):
                assert values.count(index) == lengths[index]  # a whole sample, once
            items += sorted(set(values))
            tokens += len(values)
        rank_tokens.append(tokens)
    assert max(rank_tokens) - min(rank_tokens) <= max(lengths)  # balanced by tokens
    return sorted(items)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    budget=st.integers(1, 200),
    world_size=st.integers(1, 4),
    extra_micro=st.one_of(st.none(), st.integers(0, 60)),
    packing=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_every_sample_once_per_epoch_whatever_the_split(
    lengths, budget, world_size, extra_micro, packing, seed
):
    micro = None if extra_micro is None else max(lengths) + extra_micro
    ranks = loaders(lengths, world_size, micro, lambda step: budget, packing=packing, seed=seed)
    num_steps = count_token_steps(lengths, 2, lambda step: budget, seed=seed)
    expected = reference_batches(lengths, seed, [budget] * num_steps)
    seen: dict[int, list[int]] = {}
    for step, windows in enumerate(itertools.islice(zip(*ranks), num_steps)):
        epoch, indices = expected[step]
        items = check_step(windows, lengths, micro)
        assert items == sorted(indices), f"step {step}"
        assert {w.epoch for w in windows} == {epoch}
        tokens = sum(lengths[i] for i in indices)
        assert windows[0].num_tokens == tokens
        last_of_epoch = step + 1 == num_steps or expected[step + 1][0] != epoch
        if not last_of_epoch:  # the budget, to within one sequence
            assert budget <= tokens < budget + lengths[indices[-1]]
        seen.setdefault(epoch, []).extend(items)
    assert sorted(seen) == [0, 1]
    for items in seen.values():
        assert sorted(items) == list(range(len(lengths)))


def test_a_changing_budget_and_drop_last_follow_the_definition():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 50, size=57).tolist()
    budgets = [100, 250, 60]
    sampler = TokenBatchSampler(lengths, seed=4, drop_last=True)
    expected = reference_batches(lengths, 4, [budgets[t % 3] for t in range(40)], drop_last=True)
    for step in range(40):
        epoch = sampler.next_epoch_tokens(budgets[step % 3])
        indices = sampler.next_global_batch_tokens(budgets[step % 3])
        assert (epoch, indices.tolist()) == expected[step]
        assert sum(lengths[i] for i in indices) >= budgets[step % 3]  # nothing short is kept


def test_resume_continues_the_same_windows():
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    first = loaders(lengths, 2, 40, lambda step: 90 + 20 * (step % 2))[1]
    straight = [w.micro_batches for w in itertools.islice(first, 12)]
    second = loaders(lengths, 2, 40, lambda step: 90 + 20 * (step % 2))[1]
    head = list(itertools.islice(second, 5))
    state = second.state_dict()
    resumed = loaders(lengths, 2, 40, lambda step: 90 + 20 * (step % 2))[1]
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 7))
    assert [w.step for w in tail] == list(range(5, 12))
    for expected, actual in zip(straight, [w.micro_batches for w in head + tail]):
        assert len(expected) == len(actual)
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))


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
        sample_lengths([torch.zeros(2)])
    with pytest.raises(ValueError, match=r"lengths\[1\] is 0"):
        TokenBatchSampler([3, 0], seed=0)
    with pytest.raises(ValueError, match="drop_last"):
        TokenBatchSampler([3, 4], seed=0, drop_last=True).advance_tokens(8)


def test_lengths_from_the_hook_or_the_attribute():
    dataset = SequenceDataset([3, 1, 4])
    assert sample_lengths(dataset).tolist() == [3, 1, 4]
    samples = [torch.zeros(5), torch.zeros(2)]
    assert sample_lengths(samples, lambda sample: len(sample) - 1).tolist() == [4, 1]


def test_the_budget_summary_states_the_arithmetic():
    text = str(TokenBudget(4096, world_size=2, micro_batch_tokens=512))
    assert "ceil(2048 / 512) = 4 micro-steps" in text
