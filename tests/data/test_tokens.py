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

from bigbatch.data.loader import WindowLoader
from bigbatch.data.sampler import GlobalBatchSampler, count_steps
from bigbatch.planning import TokenUnit

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


def token_sampler(lengths, seed, drop_last=False):
    return GlobalBatchSampler(len(lengths), seed=seed, drop_last=drop_last, unit=TokenUnit(lengths))


def loaders(lengths, world_size, micro, budget_at, *, packing=False, seed=0, **kwargs):
    dataset = SequenceDataset(lengths)
    return [
        WindowLoader(
            dataset,
            unit=TokenUnit(lengths, world_size, micro, packing=packing),
            global_batch_at=budget_at,
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
    unit = TokenUnit(lengths)
    num_steps = count_steps(len(lengths), 2, lambda step: budget, unit=unit, seed=seed)
    expected = reference_batches(lengths, seed, [budget] * num_steps)
    seen: dict[int, list[int]] = {}
    for step, windows in enumerate(itertools.islice(zip(*ranks), num_steps)):
        epoch, indices = expected[step]
        items = check_step(windows, lengths, micro)
        assert items == sorted(indices), f"step {step}"
        assert {w.epoch for w in windows} == {epoch}
        tokens = sum(lengths[i] for i in indices)
        assert windows[0].num_tokens == tokens
        assert {tuple(w.indices.tolist()) for w in windows} == {tuple(indices)}
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
    sampler = token_sampler(lengths, seed=4, drop_last=True)
    expected = reference_batches(lengths, 4, [budgets[t % 3] for t in range(40)], drop_last=True)
    for step in range(40):
        epoch = sampler.next_epoch(budgets[step % 3])
        indices = sampler.next_global_batch(budgets[step % 3])
        assert (epoch, indices) == expected[step]
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


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"lengths\[1\] is 0"):
        token_sampler([3, 0], seed=0)
    with pytest.raises(ValueError, match="drop_last"):
        token_sampler([3, 4], seed=0, drop_last=True).advance(8)
    with pytest.raises(ValueError, match="global_batch_tokens must be a positive integer"):
        token_sampler([3, 4], seed=0).advance(0)
    with pytest.raises(ValueError, match="one token count per sample"):
        GlobalBatchSampler(3, seed=0, unit=TokenUnit([3, 4]))
