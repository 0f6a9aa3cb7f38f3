"""This rank's windows: each step's global batch, split by the batch unit, as micro-batches.

`WindowLoader` takes the samples of every step from `bigbatch.data.sampler.GlobalBatchSampler`
(split-invariant, docs/design.md invariant 3), in samples or in tokens alike: the batch unit
(`bigbatch.planning.BatchUnit`) splits each global batch into every rank's micro-batches, rows of
samples (several a row when packed), the same plan on every rank; this rank's are collated
through a `torch.utils.data.DataLoader` (workers, prefetching across steps). An empty micro-batch
becomes a 0-row batch, so every rank runs the same number of micro-steps. It resumes at an exact
position.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from bigbatch.core import batches
from bigbatch.data.sampler import GlobalBatchSampler
from bigbatch.planning.samples import Plan
from bigbatch.planning.tokens import TokenPlan
from bigbatch.planning.unit import BatchUnit, Split

logger = logging.getLogger(__name__)

Key = tuple[int, bool, int]
"""What the DataLoader reads: (dataset index, keep, row); keep False marks the stand-in sample of
an empty micro-batch."""


@dataclass(frozen=True)
class Window:
    """One rank's micro-batches for one optimizer step.

    Attributes:
        step: the 0-based optimizer step.
        epoch: the epoch its samples come from.
        plan: the step's plan, every rank's micro-batches (for a short last global batch: of its
            samples); a `bigbatch.planning.Plan` or `TokenPlan`.
        micro_batches: this rank's collated micro-batches; some may hold 0 rows.
        num_samples: samples of the global batch on every rank together.
        num_tokens: input tokens of the global batch (None in a run in samples).
        num_padded_tokens: padded tokens (rows x longest row) of every micro-batch of every rank
            (None in a run in samples).
        indices: the dataset indices of the whole global batch, every rank's, in epoch order
            (for auditing).
    """

    step: int
    epoch: int
    plan: Plan | TokenPlan
    micro_batches: list[Any]
    num_samples: int
    num_tokens: int | None
    num_padded_tokens: int | None
    indices: np.ndarray


class _Keyed(Dataset[Any]):
    """Reads `Key`s: the sample, whether it is kept, and its row."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: Key) -> tuple[Any, bool, int]:  # type: ignore[override]
        return self.dataset[key[0]], key[1], key[2]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _Collate:
    """Collates a micro-batch: samples, or rows of samples when packed; a stand-in has 0 rows."""

    def __init__(
        self,
        collate_fn: Callable[[list[Any]], Any] | None,
        collate_packed: Callable[[list[list[Any]]], Any] | None,
    ) -> None:
        self.collate_fn = collate_fn or default_collate
        self.collate_packed = collate_packed

    def __call__(self, keyed: list[tuple[Any, bool, int]]) -> Any:
        if self.collate_packed is None:
            collated = self.collate_fn([sample for sample, _, _ in keyed])
        else:
            rows: dict[int, list[Any]] = {}
            for sample, _, row in keyed:
                rows.setdefault(row, []).append(sample)
            collated = self.collate_packed([rows[row] for row in sorted(rows)])
        return collated if keyed[0][1] else batches.narrow(collated, 0, 0)


class _MicroBatchKeys:
    """The DataLoader's batch sampler: each micro-batch's keys, step after step, for one rank."""

    def __init__(self, loader: WindowLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[Key]]:
        # Snapshot the position now, not at the first next(): the consumer moves on meanwhile.
        return self._keys(self.loader.sampler.copy(), self.loader.step)

    def _keys(self, sampler: GlobalBatchSampler, step: int) -> Iterator[list[Key]]:
        rank = self.loader.rank
        while True:
            _, indices, split = self.loader.next_split(sampler, step)
            for rows in split.plan.window(rank):
                if not rows:
                    yield [(int(indices[0]), False, 0)]
                else:
                    yield [(int(indices[p]), True, r) for r, row in enumerate(rows) for p in row]
            step += 1


class WindowLoader:
    """Yields this rank's `Window` for each optimizer step, from a given step and data position.

    The DataLoader may prefetch micro-batches of later steps; `state_dict` counts only the windows
    handed out, so a checkpoint resumes exactly after the last step that ran.

    Args:
        dataset: a map-style dataset.
        unit: what a global batch counts and how it splits (`bigbatch.planning.SampleUnit` or
            `TokenUnit`, with the run's world size and micro setting).
        global_batch_at: the global batch of a (0-based) step, in the unit.
        seed: seeds the epochs' orders (the same order in samples and in tokens).
        rank: this process's rank in the plans.
        collate_fn: a list of samples -> one micro-batch (padding per micro-batch).
        collate_packed: rows of samples -> one packed micro-batch; given, micro-batches are
            collated by rows (the unit packs them).
        drop_last: drop each epoch's last global batch when its units stay below the size.
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
        unit: BatchUnit,
        global_batch_at: Callable[[int], int],
        seed: int,
        rank: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        collate_packed: Callable[[list[list[Any]]], Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_ignored_signals: Sequence[int] = (),
    ) -> None:
        self.dataset = dataset
        self.unit = unit
        self.global_batch_at = global_batch_at
        self.rank = rank
        self.collate = _Collate(collate_fn, collate_packed)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.worker_ignored_signals = tuple(int(number) for number in worker_ignored_signals)
        # Advanced only as windows are handed out: the resume position.
        num_samples = len(dataset)  # type: ignore[arg-type]
        self.sampler = GlobalBatchSampler(num_samples, seed=seed, drop_last=drop_last, unit=unit)
        self.step = 0

    def next_split(self, sampler: GlobalBatchSampler, step: int) -> tuple[int, np.ndarray, Split]:
        """Advance a sampler past step's global batch: its epoch, dataset indices and split."""
        global_batch = self.global_batch_at(step)
        epoch, start, stop = sampler.advance(global_batch)
        indices = sampler.permutation(epoch)[start:stop]
        indices.flags.writeable = False  # the window's record of what the step consumed
        return epoch, indices, self.unit.split(global_batch, indices)

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
            batch_sampler=_MicroBatchKeys(self),  # type: ignore[arg-type]
            collate_fn=self.collate,
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
            epoch, indices, split = self.next_split(self.sampler, self.step)
            plan = split.plan
            window = [next(micro_batches) for _ in range(plan.gradient_accumulation_steps)]
            self.step += 1
            yield Window(
                self.step - 1,
                epoch,
                plan,
                window,
                split.num_samples,
                split.num_tokens,
                split.num_padded_tokens,
                indices,
            )


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
