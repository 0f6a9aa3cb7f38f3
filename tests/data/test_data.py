"""Split-invariant data: same items per step for any split, each item once per epoch, resume.

The reference order is written here from its definition (numpy's generator seeded with
(seed, epoch), consecutive slices), not taken from the code under test.
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
from bigbatch.planning import SampleUnit, count_steps_in_stages, stage_at


def reference_steps(num_samples, seed, sizes, drop_last=False):
    """Indices of each step by the definition: per-epoch permutation, consecutive slices."""
    steps, epoch, position = [], 0, 0
    for size in sizes:
        left = num_samples - position
        if left == 0 or (drop_last and left < size):
            epoch, position = epoch + 1, 0
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
        steps.append((epoch, sorted(order[position : position + size].tolist())))
        position = min(num_samples, position + size)
    return steps


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is its own index, as a variable-length sequence to exercise padding."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.full((index % 3 + 1,), index)


def pad_collate(samples):
    length = max(len(s) for s in samples)
    padded = torch.full((len(samples), length), -1)
    for row, sample in enumerate(samples):
        padded[row, : len(sample)] = sample
    return padded


def window_items(window):
    return sorted(int(m[row, 0]) for m in window.micro_batches for row in range(m.shape[0]))


def loader(n, sizes, world_size, rank, micro, seed=3, **kwargs):
    return WindowLoader(
        IndexDataset(n),
        unit=SampleUnit(n, world_size, micro),
        global_batch_at=lambda step: sizes[step % len(sizes)],
        seed=seed,
        rank=rank,
        collate_fn=pad_collate,
        **kwargs,
    )


def steps_over_ranks(n, sizes, world_size, micro, num_steps, **kwargs):
    per_rank = [
        list(itertools.islice(loader(n, sizes, world_size, rank, micro, **kwargs), num_steps))
        for rank in range(world_size)
    ]
    return [
        (windows[0].epoch, sorted(sum((window_items(w) for w in windows), [])))
        for windows in zip(*per_rank)
    ]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    sizes=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    world_size=st.integers(1, 3),
    micro=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_items_of_each_step_do_not_depend_on_the_split(n, sizes, world_size, micro, seed):
    sizes = [max(size, world_size) for size in sizes]
    num_steps = 6
    expected = reference_steps(n, seed, [sizes[t % len(sizes)] for t in range(num_steps)])
    assert steps_over_ranks(n, sizes, world_size, micro, num_steps, seed=seed) == expected


def test_every_item_once_per_epoch_under_a_changing_batch():
    n, sizes = 37, [4, 9, 16]
    sampler = GlobalBatchSampler(n, seed=5)
    seen: dict[int, list[int]] = {}
    step = 0
    while sampler.next_epoch(sizes[step % 3]) < 3:
        epoch = sampler.next_epoch(sizes[step % 3])
        seen.setdefault(epoch, []).extend(sampler.next_global_batch(sizes[step % 3]))
        step += 1
    assert sorted(seen) == [0, 1, 2]
    for indices in seen.values():
        assert sorted(indices) == list(range(n))
    assert count_steps(n, 3, lambda t: sizes[t % 3]) == step


def test_drop_last_skips_the_short_batch():
    sampler = GlobalBatchSampler(10, seed=1, drop_last=True)
    batches = [sampler.next_global_batch(4) for _ in range(4)]
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert sampler.epoch == 1
    assert count_steps(10, 2, lambda t: 4, drop_last=True) == 4
    assert count_steps(10, 2, lambda t: 4) == 6
    with pytest.raises(ValueError, match="drop_last"):
        GlobalBatchSampler(3, seed=0, drop_last=True).next_global_batch(4)


def test_a_window_records_the_global_batch_it_took():
    """indices: every rank's samples of the step, the definition's, the same on every rank."""
    n, sizes = 23, [6, 11]
    expected = reference_steps(n, 3, [sizes[t % 2] for t in range(5)])
    for rank in range(2):
        windows = list(itertools.islice(loader(n, sizes, 2, rank, 2), 5))
        assert [(w.epoch, sorted(w.indices.tolist())) for w in windows] == expected
        assert [w.num_tokens for w in windows] == [None] * 5  # a run in samples counts none


def test_empty_micro_batches_have_zero_rows_and_the_structure():
    # 5 items over 4 ranks x micro 1: 2 micro-steps; most slots are empty.
    windows = [next(iter(loader(5, [5], world_size=4, rank=rank, micro=1))) for rank in range(4)]
    rows = [[m.shape[0] for m in w.micro_batches] for w in windows]
    assert rows == [[1, 1], [1, 0], [1, 0], [1, 0]]
    empty = windows[3].micro_batches[1]
    assert empty.dim() == 2 and empty.dtype == torch.int64


def test_dataloader_workers_and_exact_resume():
    sizes = [6, 11]
    full = list(itertools.islice(loader(23, sizes, 2, 1, 2, num_workers=2), 9))
    first = loader(23, sizes, 2, 1, 2, num_workers=2)
    head = list(itertools.islice(iter(first), 4))  # workers prefetch beyond step 4
    state = first.state_dict()
    assert state["step"] == 4
    resumed = loader(23, sizes, 2, 1, 2, num_workers=2)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 5))
    assert [w.step for w in head + tail] == list(range(9))
    for expected, actual in zip(full, head + tail):
        assert len(expected.micro_batches) == len(actual.micro_batches)
        for a, b in zip(expected.micro_batches, actual.micro_batches):
            assert torch.equal(a, b)
    padded = [m for w in full for m in w.micro_batches if m.shape[0] > 1]
    assert any((m == -1).any() for m in padded)  # padding happened per micro-batch


@given(
    st.integers(1, 60),
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 70)), min_size=1, max_size=4),
    st.booleans(),
)
def test_counting_steps_in_stages_matches_the_step_by_step_count(num_samples, epochs, raw, drop):
    # Stages at increasing steps; sizes within the dataset when drop_last needs it.
    stages, start = [], 0
    for gap, size in raw:
        stages.append((start, min(size, num_samples) if drop else size))
        start += gap
    expected = count_steps(num_samples, epochs, lambda step: stage_at(stages, step), drop_last=drop)
    assert count_steps_in_stages(num_samples, epochs, stages, drop_last=drop) == expected


def test_counting_many_epochs_is_arithmetic():
    assert count_steps_in_stages(1437, 10**15, [(0, 64)]) == 10**15 * 23
