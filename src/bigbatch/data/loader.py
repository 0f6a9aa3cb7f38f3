"""This rank's windows: each global batch of the sampler cut by the step's plan into micro-batches.

`WindowLoader` takes the items of every step from `bigbatch.data.sampler.GlobalBatchSampler`
(split-invariant, docs/design.md invariant 3) and cuts each global batch
with the step's plan into this rank's window of collated micro-batches, through a
`torch.utils.data.DataLoader` (workers, prefetching across steps), and resumes at an exact position.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from bigbatch.core import batches
from bigbatch.data.sampler import GlobalBatchSampler
from bigbatch.plan import Plan

logger = logging.getLogger(__name__)


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
            plan = plan.for_items(len(indices))
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
        worker_ignored_signals: signals the workers ignore, left to the main process (which
            stops the run and then the workers): a Ctrl-C reaches every process of a terminal's
            group, a launcher's SIGTERM every process of the worker's.
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
        worker_ignored_signals: Sequence[int] = (),
    ) -> None:
        self.dataset = dataset
        self.plan_for = plan_for
        self.global_batch_size_at = global_batch_size_at
        self.rank = rank
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_ignored_signals = tuple(int(number) for number in worker_ignored_signals)
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
            worker_init_fn=functools.partial(_ignore_signals, self.worker_ignored_signals),
            # Its own generator: creating the iterator must not draw from torch's global RNG,
            # which would shift the run's random stream after a resume.
            generator=torch.Generator().manual_seed(self.sampler.seed + self.step),
        )
        micro_batches = iter(loader)
        while True:
            plan = self.plan_for(self.global_batch_size_at(self.step))
            epoch, start, stop = self.sampler.advance(plan.global_batch_size)
            plan = plan.for_items(stop - start)
            window = [next(micro_batches) for _ in range(plan.gradient_accumulation_steps)]
            self.step += 1
            yield Window(self.step - 1, epoch, plan, window, stop - start)


def _ignore_signals(numbers: tuple[int, ...], worker_id: int) -> None:
    """A worker's start: the given signals are the main process's to act on."""
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)


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


def first_samples(
    dataset: Dataset[Any], collate_fn: Callable[[list[Any]], Any] | None = None
) -> Callable[[int], Any]:
    """``make_batch(n)``: the first n samples of the dataset (cycled), collated as training does.

    What the memory probe measures a micro-batch size with.
    """
    collate = collate_fn or default_collate
    length = len(dataset)  # type: ignore[arg-type]

    def make_batch(size: int) -> Any:
        return collate([dataset[index % length] for index in range(size)])

    return make_batch
