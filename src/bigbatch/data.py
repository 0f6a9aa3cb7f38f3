"""Split-invariant data: global batches from a seeded per-epoch permutation, cut into windows.

`GlobalBatchSampler` decides which items every optimizer step consumes, independently of the
world size, micro-batch or accumulation (DESIGN invariant 3). `WindowLoader` cuts each global batch
with the step's plan into this rank's window of collated micro-batches, through a
`torch.utils.data.DataLoader` (workers, prefetching across steps), and resumes at an exact position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from bigbatch import batches
from bigbatch.plan import Plan

logger = logging.getLogger(__name__)


class GlobalBatchSampler:
    """The indices of each global batch: the next items of a seeded permutation per epoch.

    The permutation of epoch e is drawn from a generator seeded with (seed, e). Each call takes the
    next global_batch_size items of the current epoch; the last global batch of an epoch is short
    unless drop_last, then the next epoch starts. The size may change from call to call
    (batch-size schedules), and every item is used exactly once per epoch.

    Example:
        >>> sampler = GlobalBatchSampler(5, seed=0)
        >>> [len(sampler.next_global_batch(2)) for _ in range(4)], sampler.epoch
        ([2, 2, 1, 2], 1)
    """

    def __init__(self, num_samples: int, *, seed: int, drop_last: bool = False) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._permutation: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the items in one epoch."""
        if self._permutation is None or self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def advance(self, global_batch_size: int) -> tuple[int, int, int]:
        """Move past the next global batch without drawing it: (epoch, start, stop)."""
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
            raise TypeError(f"global_batch_size must be an integer, got {global_batch_size!r}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if self.drop_last and global_batch_size > self.num_samples:
            raise ValueError(
                f"global_batch_size {global_batch_size} is larger than the dataset "
                f"({self.num_samples} items) with drop_last: every batch would be dropped; "
                "use drop_last false or a smaller global_batch_size"
            )
        remaining = self.num_samples - self.position
        if remaining == 0 or (self.drop_last and remaining < global_batch_size):
            self.epoch += 1
            self.position = 0
        start = self.position
        self.position = min(self.num_samples, start + global_batch_size)
        return self.epoch, start, self.position

    def next_epoch(self, global_batch_size: int) -> int:
        """The epoch the next global batch of this size would come from (state unchanged)."""
        remaining = self.num_samples - self.position
        return self.epoch + int(
            remaining == 0 or (self.drop_last and remaining < global_batch_size)
        )

    def next_global_batch(self, global_batch_size: int) -> list[int]:
        """The dataset indices of the next global batch."""
        epoch, start, stop = self.advance(global_batch_size)
        return [int(index) for index in self.permutation(epoch)[start:stop]]

    def state_dict(self) -> dict[str, int]:
        """The position, as plain ints: the epoch and the items of it already used."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by `state_dict`."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_samples:
            raise ValueError(
                f"data position epoch {epoch}, position {position} does not fit a dataset of "
                f"{self.num_samples} items"
            )
        self.epoch, self.position = epoch, position


def count_steps(
    num_samples: int,
    epochs: int,
    global_batch_size_at: Callable[[int], int],
    *,
    drop_last: bool = False,
) -> int:
    """How many optimizer steps `epochs` passes take under a (possibly changing) global batch."""
    sampler = GlobalBatchSampler(num_samples, seed=0, drop_last=drop_last)
    step = 0
    while sampler.next_epoch(global_batch_size_at(step)) < epochs:
        sampler.advance(global_batch_size_at(step))
        step += 1
    return step


def window_plan(plan: Plan, num_items: int) -> Plan:
    """The plan of a short global batch: the same window length, items spread as evenly.

    Micro-batches never grow; some may be empty (e.g. fewer items than ranks).
    """
    if num_items == plan.global_batch_size:
        return plan
    steps, world_size = plan.gradient_accumulation_steps, plan.world_size
    base, extra = divmod(num_items, world_size * steps)
    sizes = tuple(
        tuple(base + (step * world_size + rank < extra) for step in range(steps))
        for rank in range(world_size)
    )
    return Plan(num_items, world_size, steps, sizes)


@dataclass(frozen=True)
class Window:
    """One rank's micro-batches for one optimizer step.

    Attributes:
        step: the 0-based optimizer step.
        epoch: the epoch its items come from.
        plan: the plan of this step (for a short last global batch: of its items).
        micro_batches: the collated micro-batches; some may hold 0 rows.
        num_samples: items of the global batch on every rank together.
    """

    step: int
    epoch: int
    plan: Plan
    micro_batches: list[Any]
    num_samples: int


class _Keyed(Dataset[Any]):
    """Reads (index, keep) keys: keep False marks a stand-in sample for an empty micro-batch."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:  # type: ignore[override]
        return self.dataset[key[0]], key[1]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _Collate:
    """Collates a micro-batch; a stand-in sample becomes a 0-row batch of the right structure."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, keyed: list[tuple[Any, bool]]) -> Any:
        collated = self.collate_fn([sample for sample, _ in keyed])
        if not keyed[0][1]:
            return batches.narrow(collated, 0, 0)
        return collated


class _MicroBatchIndices:
    """The DataLoader's batch sampler: each micro-batch's keys, step after step, for one rank."""

    def __init__(self, loader: WindowLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        # Snapshot the position now, not at the first next(): the consumer moves on meanwhile.
        return self._keys(self.loader.new_sampler(), self.loader.step)

    def _keys(self, sampler: GlobalBatchSampler, step: int) -> Iterator[list[tuple[int, bool]]]:
        loader = self.loader
        while True:
            plan = loader.plan_for(loader.global_batch_size_at(step))
            indices = sampler.next_global_batch(plan.global_batch_size)
            plan = window_plan(plan, len(indices))
            start = plan.rank_offsets()[loader.rank]
            for size in plan.micro_batch_sizes(loader.rank):
                if size == 0:
                    yield [(indices[0], False)]
                else:
                    yield [(index, True) for index in indices[start : start + size]]
                start += size
            step += 1


class WindowLoader:
    """Yields this rank's `Window` for each optimizer step, from a given step and data position.

    The DataLoader may prefetch micro-batches of later steps; `state_dict` counts only the windows
    handed out, so a checkpoint resumes exactly after the last step that ran.

    Args:
        dataset: a map-style dataset.
        plan_for: the plan of a global batch size (same for every step with that size).
        global_batch_size_at: the global batch size of a (0-based) step.
        seed: seeds the per-epoch permutations.
        rank: this process's rank in the plans.
        collate_fn: turns a list of samples into one micro-batch (padding per micro-batch).
        drop_last: drop each epoch's short last global batch.
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader page-locked memory (for CUDA).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        plan_for: Callable[[int], Plan],
        global_batch_size_at: Callable[[int], int],
        seed: int,
        rank: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.plan_for = plan_for
        self.global_batch_size_at = global_batch_size_at
        self.rank = rank
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Advanced only as windows are handed out (no permutation drawn): the resume position.
        self.sampler = GlobalBatchSampler(len(dataset), seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        self.step = 0

    def new_sampler(self) -> GlobalBatchSampler:
        """A sampler at the current position, for the DataLoader's (prefetching) side."""
        sampler = GlobalBatchSampler(
            self.sampler.num_samples, seed=self.sampler.seed, drop_last=self.sampler.drop_last
        )
        sampler.load_state_dict(self.sampler.state_dict())
        return sampler

    def state_dict(self) -> dict[str, int]:
        """The next step and the data position after the last window handed out."""
        return {"step": self.step, **self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a position from `state_dict` (before iterating)."""
        self.sampler.load_state_dict(state)
        self.step = int(state["step"])

    def __iter__(self) -> Iterator[Window]:
        loader = DataLoader(
            _Keyed(self.dataset),
            batch_sampler=_MicroBatchIndices(self),  # type: ignore[arg-type]
            collate_fn=_Collate(self.collate_fn),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from torch's global RNG,
            # which would shift the run's random stream after a resume.
            generator=torch.Generator().manual_seed(self.sampler.seed + self.step),
        )
        micro_batches = iter(loader)
        while True:
            plan = self.plan_for(self.global_batch_size_at(self.step))
            epoch, start, stop = self.sampler.advance(plan.global_batch_size)
            plan = window_plan(plan, stop - start)
            window = [next(micro_batches) for _ in range(plan.gradient_accumulation_steps)]
            self.step += 1
            yield Window(self.step - 1, epoch, plan, window, stop - start)


def eval_batches(
    dataset: Dataset[Any],
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
) -> Iterator[Any]:
    """This rank's share of an evaluation set (a contiguous slice), in micro-batches.

    Rank 0 always gets items when there are any; later ranks may get none.
    """
    num_samples = len(dataset)  # type: ignore[arg-type]
    share = -(-num_samples // world_size)
    indices: Sequence[int] = range(
        min(num_samples, rank * share), min(num_samples, (rank + 1) * share)
    )
    if not indices:
        return iter(())
    loader = DataLoader(
        torch.utils.data.Subset(dataset, list(indices)),
        batch_size=micro_batch_size,
        shuffle=False,
        collate_fn=collate_fn or default_collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)
