"""This rank's windows in a token run: each global batch in tokens cut by its `TokenPlan`.

`TokenWindowLoader` is `bigbatch.data.loader.WindowLoader` for global batches in tokens: the
items of every step come from `bigbatch.data.tokens.TokenBatchSampler` (split-invariant,
docs/design.md invariant 3), the step's `TokenPlan` (the same on every rank, from the lengths
alone) gives this rank's micro-batches, each collated unpacked or packed; an empty micro-batch
becomes a 0-row batch so that every rank runs the same number of micro-steps. It resumes at an
exact position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from bigbatch.core import batches
from bigbatch.data.token_plan import TokenPlan
from bigbatch.data.tokens import TokenBatchSampler

PlanTokens = Callable[[int, Sequence[int]], TokenPlan]
"""``plan_for(global_batch_tokens, lengths)``: the plan of a global batch of these lengths."""


@dataclass(frozen=True)
class TokenWindow:
    """One rank's micro-batches for one optimizer step of a token run.

    Attributes:
        step: the 0-based optimizer step.
        epoch: the epoch its samples come from.
        plan: the step's plan (every rank's micro-batches).
        micro_batches: this rank's collated micro-batches; some may hold 0 rows.
        num_samples: samples of the global batch on every rank together.
        num_tokens: input tokens of the global batch.
        num_padded_tokens: padded tokens (rows x longest row) of every micro-batch of every rank.
    """

    step: int
    epoch: int
    plan: TokenPlan
    micro_batches: list[Any]
    num_samples: int
    num_tokens: int
    num_padded_tokens: int


class _RowKeyed(Dataset[Any]):
    """Reads (index, keep, row) keys: keep False marks the stand-in of an empty micro-batch."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, bool, int]) -> tuple[Any, bool, int]:  # type: ignore[override]
        return self.dataset[key[0]], key[1], key[2]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _RowCollate:
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

    def __init__(self, loader: TokenWindowLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[list[tuple[int, bool, int]]]:
        # Snapshot the position now, not at the first next(): the consumer moves on meanwhile.
        return self._keys(self.loader.new_sampler(), self.loader.step)

    def _keys(self, sampler: TokenBatchSampler, step: int) -> Iterator[list[tuple[int, bool, int]]]:
        while True:
            _, indices, plan = self.loader.next_plan(sampler, step)
            for rows in plan.micro_batches[self.loader.rank]:
                if not rows:
                    yield [(int(indices[0]), False, 0)]
                else:
                    yield [(int(indices[p]), True, r) for r, row in enumerate(rows) for p in row]
            step += 1


class TokenWindowLoader:
    """Yields this rank's `TokenWindow` for each optimizer step, from a given step and position.

    The DataLoader may prefetch micro-batches of later steps; `state_dict` counts only the windows
    handed out, so a checkpoint resumes exactly after the last step that ran.

    Args:
        dataset: a map-style dataset.
        lengths: input tokens of every sample of the dataset, in index order.
        plan_for: ``plan_for(global_batch_tokens, lengths)``, the plan of one global batch.
        global_batch_tokens_at: the token budget of a (0-based) step.
        seed: seeds the per-epoch permutations (the same order as a run in samples).
        rank: this process's rank in the plans.
        collate_fn: a list of samples -> one micro-batch (padded to its longest sample).
        collate_packed: rows of samples -> one packed micro-batch; given, rows are packed.
        drop_last: drop each epoch's last global batch when its tokens stay below the budget.
        num_workers: DataLoader worker processes.
        pin_memory: DataLoader page-locked memory (for CUDA).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        lengths: Sequence[int] | np.ndarray,
        plan_for: PlanTokens,
        global_batch_tokens_at: Callable[[int], int],
        seed: int,
        rank: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        collate_packed: Callable[[list[list[Any]]], Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.plan_for = plan_for
        self.global_batch_tokens_at = global_batch_tokens_at
        self.rank = rank
        self.collate = _RowCollate(collate_fn, collate_packed)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Advanced only as windows are handed out: the resume position.
        self.sampler = TokenBatchSampler(lengths, seed=seed, drop_last=drop_last)
        if len(self.sampler.lengths) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(
                f"lengths has {len(self.sampler.lengths)} entries for "
                f"{len(dataset)} samples: one token count per sample"  # type: ignore[arg-type]
            )
        self.step = 0

    def new_sampler(self) -> TokenBatchSampler:
        """A sampler at the current position, for the DataLoader's (prefetching) side."""
        sampler = TokenBatchSampler(
            self.sampler.lengths, seed=self.sampler.seed, drop_last=self.sampler.drop_last
        )
        sampler.load_state_dict(self.sampler.state_dict())
        return sampler

    def next_plan(self, sampler: TokenBatchSampler, step: int) -> tuple[int, np.ndarray, TokenPlan]:
        """Advance a sampler past step's global batch: (epoch, its dataset indices, its plan)."""
        budget = self.global_batch_tokens_at(step)
        epoch, start, stop = sampler.advance_tokens(budget)
        indices = sampler.permutation(epoch)[start:stop]
        return epoch, indices, self.plan_for(budget, sampler.lengths[indices].tolist())

    def state_dict(self) -> dict[str, int]:
        """The next step and the data position after the last window handed out."""
        return {"step": self.step, **self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at a position from `state_dict` (before iterating)."""
        self.sampler.load_state_dict(state)
        self.step = int(state["step"])

    def __iter__(self) -> Iterator[TokenWindow]:
        loader = DataLoader(
            _RowKeyed(self.dataset),
            batch_sampler=_MicroBatchKeys(self),  # type: ignore[arg-type]
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from torch's global RNG.
            generator=torch.Generator().manual_seed(self.sampler.seed + self.step),
        )
        micro_batches = iter(loader)
        while True:
            epoch, _, plan = self.next_plan(self.sampler, self.step)
            window = [next(micro_batches) for _ in range(plan.gradient_accumulation_steps)]
            self.step += 1
            yield TokenWindow(
                self.step - 1,
                epoch,
                plan,
                window,
                plan.num_samples,
                plan.num_tokens,
                plan.num_padded_tokens,
            )
