"""The batch unit: what a global batch counts, samples or tokens, behind one interface.

A run's global batch is B units. The unit says how many of the epoch's next samples a global
batch of B takes from a position (samples: B; tokens: until their tokens reach B), how one step's
samples split over ranks and micro-batches (rows of positions, every rank the same number of
micro-steps, which keeps the step's one gradient sync in lockstep), the data-independent
description of a budget, and the figures a window reports. `SampleUnit` counts samples
(`bigbatch.planning.samples`), `TokenUnit` input tokens (`bigbatch.planning.tokens`). Both read
the epochs' seeded order of `EpochOrder`, so step t takes the same samples for any split
(docs/design.md, invariant 3). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bigbatch.planning.samples import Plan, count_steps_in_stages, plan, stage_at
from bigbatch.planning.tokens import (
    TokenBudget,
    TokenPlan,
    check_lengths,
    check_tokens,
    plan_tokens,
)
from bigbatch.units import UsageError


class EpochOrder:
    """The seeded order of one epoch's samples, drawn on first use, and what units derive from it.

    A run in samples never draws it to move on (its global batches follow from the position
    alone); a run in tokens keeps the cumulative tokens of the order here, one epoch at a time.
    """

    def __init__(self, num_samples: int, seed: int, epoch: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, epoch
        self._order: np.ndarray | None = None
        self._derived: dict[str, np.ndarray] = {}

    @property
    def order(self) -> np.ndarray:
        """The dataset indices in this epoch's order: a permutation seeded with (seed, epoch)."""
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.num_samples)
        return self._order

    def derived(self, key: str, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``compute(order)``, computed once per epoch."""
        if key not in self._derived:
            self._derived[key] = compute(self.order)
        return self._derived[key]


@dataclass(frozen=True)
class Split:
    """One step's global batch split over ranks, and the figures its windows report.

    Attributes:
        plan: the step's plan; ``plan.window(rank)`` is a rank's micro-batches as rows of
            positions in the global batch.
        num_samples: samples of the global batch, every rank together.
        num_tokens: its input tokens (None in a run in samples, which does not count them).
        num_padded_tokens: padded tokens (rows x longest row) of every micro-batch of every rank.
    """

    plan: Plan | TokenPlan
    num_samples: int
    num_tokens: int | None = None
    num_padded_tokens: int | None = None


class BatchUnit(Protocol):
    """What a global batch counts: the seam between a run in samples and a run in tokens.

    Attributes:
        name: "samples" or "tokens", for messages and reports.
        global_field, micro_field, min_field, max_field: the config fields in this unit.
        lr_by_units: warm-up and decay count the unit (tokens) rather than optimizer steps
            (samples, which count samples only when the global batch adapts).
        num_samples: samples of the dataset.
        world_size: ranks a global batch splits over.
    """

    name: str
    global_field: str
    micro_field: str
    min_field: str
    max_field: str
    lr_by_units: bool
    num_samples: int
    world_size: int

    @property
    def micro(self) -> int | None:
        """The micro setting (micro_batch_size or micro_batch_tokens); None: not limited."""

    @micro.setter
    def micro(self, value: int | None) -> None: ...

    @property
    def granularity(self) -> int:
        """The adaptive global batch moves in multiples of it (full windows)."""

    def epoch_units(self) -> int:
        """Units of one epoch of the dataset."""

    def num_units(self, order: EpochOrder, start: int, stop: int) -> int:
        """Units of the samples at positions [start, stop) of an epoch's order."""

    def num_taken(self, order: EpochOrder, start: int, global_batch: int) -> int:
        """How many of the epoch's next samples, from start, a global batch of this size takes."""

    def check_global_batch(self, global_batch: int, *, drop_last: bool) -> None:
        """Refuse a global batch that is not a positive integer, or one drop_last always drops."""

    def check_schedule(self, largest: int, field: str) -> None:
        """Refuse a schedule whose largest global batch cannot be taken from the dataset, and a
        micro setting no micro-batch can reach."""

    def count_steps(
        self, epochs: int, stages: Sequence[tuple[int, int]], *, seed: int, drop_last: bool
    ) -> int:
        """Steps that `epochs` passes take under ``(start_step, global_batch)`` stages."""

    def describe(self, global_batch: int) -> Plan | TokenBudget:
        """The data-independent description of a global batch (what every such step shares)."""

    def split(self, global_batch: int, indices: np.ndarray) -> Split:
        """The plan of one step whose global batch of this size took these dataset indices."""


class SampleUnit:
    """Global batches in samples: B samples a step, split by `bigbatch.planning.plan`.

    Every plan uses one micro-batch size (given, probed, or derived from the first global batch
    and gradient_accumulation_steps, else a rank's share of it); a later global batch keeps it
    (at most its rank share) and changes the accumulation. The first global batch with
    gradient_accumulation_steps given is planned from them, as configured.

    Args:
        num_samples: samples of the dataset.
        world_size: ranks.
        micro_batch_size: the micro setting; None: derived as above.
        gradient_accumulation_steps: for the first global batch; None: follows.
        first_global_batch: the schedule's first global batch; None: each plan on its own.
    """

    name = "samples"
    global_field, micro_field = "global_batch_size", "micro_batch_size"
    min_field, max_field = "min_global_batch_size", "max_global_batch_size"
    lr_by_units = False

    def __init__(
        self,
        num_samples: int,
        world_size: int = 1,
        micro_batch_size: int | None = None,
        *,
        gradient_accumulation_steps: int | None = None,
        first_global_batch: int | None = None,
    ) -> None:
        self.num_samples, self.world_size = num_samples, world_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.first_global_batch = first_global_batch
        self._given = self._micro = micro_batch_size
        self._plans: dict[int, Plan] = {}

    @property
    def micro(self) -> int | None:
        """The micro-batch size of every plan: set, or derived from the first global batch."""
        if self._micro is not None or self.first_global_batch is None:
            return self._micro
        first, steps = self.first_global_batch, self.gradient_accumulation_steps
        if steps is not None:
            return plan(first, self.world_size, self._given, steps).micro_batch_size
        return math.ceil(first / self.world_size)

    @micro.setter
    def micro(self, value: int | None) -> None:
        self._micro = value
        self._plans.clear()

    @property
    def granularity(self) -> int:
        return (self.micro or 1) * self.world_size

    def epoch_units(self) -> int:
        return self.num_samples

    def num_units(self, order: EpochOrder, start: int, stop: int) -> int:
        return stop - start

    def num_taken(self, order: EpochOrder, start: int, global_batch: int) -> int:
        return min(self.num_samples, start + global_batch) - start

    def check_global_batch(self, global_batch: int, *, drop_last: bool) -> None:
        if isinstance(global_batch, bool) or not isinstance(global_batch, int):
            raise TypeError(f"global_batch_size must be an integer, got {global_batch!r}")
        if global_batch < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch}")
        if drop_last and global_batch > self.num_samples:
            raise UsageError(
                f"global_batch_size {global_batch} is larger than the dataset "
                f"({self.num_samples} items) with drop_last: every batch would be dropped; "
                "use drop_last false or a smaller global_batch_size"
            )

    def check_schedule(self, largest: int, field: str) -> None:
        if largest > self.num_samples:
            # Every step would be a short global batch of the whole set (and a huge one a window
            # of countless empty micro-batches).
            raise UsageError(
                f"{field}: a global batch of {largest} is larger than the training set "
                f"({self.num_samples} samples): use at most {self.num_samples}"
            )

    def count_steps(
        self, epochs: int, stages: Sequence[tuple[int, int]], *, seed: int, drop_last: bool
    ) -> int:
        # The position alone decides: arithmetic, whatever the number of epochs.
        return count_steps_in_stages(self.num_samples, epochs, stages, drop_last=drop_last)

    def describe(self, global_batch: int) -> Plan:
        if global_batch not in self._plans:
            self._plans[global_batch] = self._plan(global_batch)
        return self._plans[global_batch]

    def _plan(self, global_batch: int) -> Plan:
        steps, first = self.gradient_accumulation_steps, self.first_global_batch
        if steps is not None and (first is None or global_batch == first):
            return plan(global_batch, self.world_size, self._given, steps)
        micro = self.micro
        if micro is not None and global_batch != first:
            micro = min(micro, math.ceil(global_batch / self.world_size))  # a later, smaller stage
        return plan(global_batch, self.world_size, micro)

    def split(self, global_batch: int, indices: np.ndarray) -> Split:
        num_samples = len(indices)
        return Split(self.describe(global_batch).for_items(num_samples), num_samples)


class TokenUnit:
    """Global batches in tokens: the next samples until their input tokens reach B, split by
    `bigbatch.planning.plan_tokens` (ranks balanced by tokens, micro-batches by padded size).

    Args:
        lengths: input tokens of every sample of the dataset, in index order.
        world_size: ranks.
        micro_batch_tokens: padded tokens a micro-batch may hold; None: a rank's whole share.
        packing: rows hold several samples (rows of the longest sample's length).
    """

    name = "tokens"
    global_field, micro_field = "global_batch_tokens", "micro_batch_tokens"
    min_field, max_field = "min_global_batch_tokens", "max_global_batch_tokens"
    lr_by_units = True

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        world_size: int = 1,
        micro_batch_tokens: int | None = None,
        *,
        packing: bool = False,
    ) -> None:
        self.lengths = check_lengths(lengths)
        self.num_samples, self.world_size, self.packing = len(self.lengths), world_size, packing
        self.longest, self.num_tokens = int(self.lengths.max()), int(self.lengths.sum())
        if micro_batch_tokens is not None and micro_batch_tokens < self.longest:
            raise UsageError(
                f"micro_batch_tokens {micro_batch_tokens} is below the longest training sample "
                f"({self.longest} tokens), which must fit one micro-batch: set micro_batch_tokens "
                f">= {self.longest} (or auto), or shorten the longest samples"
            )
        self.micro = micro_batch_tokens

    @property
    def granularity(self) -> int:
        return (self.micro or self.longest) * self.world_size

    def epoch_units(self) -> int:
        return self.num_tokens

    def _cumulative(self, order: EpochOrder) -> np.ndarray:
        """Tokens of the first i + 1 samples of the epoch's order, for every i."""
        return order.derived("cumulative_tokens", lambda indices: np.cumsum(self.lengths[indices]))

    def num_units(self, order: EpochOrder, start: int, stop: int) -> int:
        cumulative = self._cumulative(order)
        return int(cumulative[stop - 1]) - (int(cumulative[start - 1]) if start else 0)

    def num_taken(self, order: EpochOrder, start: int, global_batch: int) -> int:
        cumulative = self._cumulative(order)
        before = int(cumulative[start - 1]) if start else 0
        last = int(np.searchsorted(cumulative, before + global_batch, side="left"))
        return min(last + 1, self.num_samples) - start

    def check_global_batch(self, global_batch: int, *, drop_last: bool) -> None:
        check_tokens("global_batch_tokens", global_batch)
        if drop_last and global_batch > self.num_tokens:
            raise UsageError(
                f"global_batch_tokens {global_batch} is more than the dataset's {self.num_tokens} "
                "tokens with drop_last: every batch would be dropped; use drop_last false or a "
                "smaller global_batch_tokens"
            )

    def check_schedule(self, largest: int, field: str) -> None:
        if largest > self.num_tokens:
            # Every step would be a short global batch of the whole set, in one micro-batch
            # when micro_batch_tokens is unset.
            raise UsageError(
                f"{field}: a global batch of {largest} tokens is larger than the training set "
                f"({self.num_tokens} tokens in {self.num_samples} samples): use at most "
                f"{self.num_tokens}"
            )
        self._check_micro()

    def _check_micro(self) -> None:
        """Refuse a micro_batch_tokens that no micro-batch of this set can ever reach."""
        micro_batch_tokens = self.micro
        padded = self.num_samples * self.longest  # every sample of the set, each a full row
        if micro_batch_tokens is not None and micro_batch_tokens > padded:
            # As a micro_batch_size above a rank's share: no micro-batch can ever be that large.
            raise UsageError(
                f"micro_batch_tokens {micro_batch_tokens} is more than the whole training set "
                f"padded to its longest sample ({self.num_samples} samples x {self.longest} "
                f"tokens = {padded}; "
                f"{self.num_tokens} tokens unpadded): no micro-batch is ever that large; use at "
                f"most {padded}, or leave it unset for a rank's share in one micro-batch"
            )

    def count_steps(
        self, epochs: int, stages: Sequence[tuple[int, int]], *, seed: int, drop_last: bool
    ) -> int:
        # How the epoch's samples fall into budgets follows their order, hence the seed.
        sizes = global_batch_sizes(
            self, lambda step: stage_at(stages, step), epochs=epochs, seed=seed, drop_last=drop_last
        )
        return len(sizes)

    def describe(self, global_batch: int) -> TokenBudget:
        return TokenBudget(global_batch, self.world_size, self.micro, self.packing, self.longest)

    def split(self, global_batch: int, indices: np.ndarray) -> Split:
        token_plan = plan_tokens(
            self.lengths[indices].tolist(),
            self.world_size,
            self.micro,
            packing=self.packing,
            row_tokens=self.longest if self.packing else None,
            global_batch_tokens=global_batch,
        )
        return Split(
            token_plan,
            token_plan.num_samples,
            token_plan.num_tokens,
            token_plan.num_padded_tokens,
        )


def locate(
    unit: BatchUnit,
    order_at: Callable[[int], EpochOrder],
    epoch: int,
    position: int,
    global_batch: int,
    *,
    drop_last: bool = False,
) -> tuple[int, int, int]:
    """(epoch, start, stop) of the next global batch from a position: the next samples of the
    epoch's order that the unit's budget takes, or the rest of the epoch (the short last global
    batch, dropped with drop_last when its units stay below the budget)."""
    unit.check_global_batch(global_batch, drop_last=drop_last)
    order = order_at(epoch)
    if position == unit.num_samples or (
        drop_last and unit.num_units(order, position, unit.num_samples) < global_batch
    ):
        epoch, position = epoch + 1, 0
        order = order_at(epoch)
    return epoch, position, position + unit.num_taken(order, position, global_batch)


def global_batch_sizes(
    unit: BatchUnit,
    global_batch_at: Callable[[int], int],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> list[tuple[int, int]]:
    """(samples, units) of each global batch of a run of `epochs` passes or `steps` steps."""
    orders: dict[int, EpochOrder] = {}

    def order_at(epoch: int) -> EpochOrder:
        if epoch not in orders:
            orders.clear()  # one epoch at a time
            orders[epoch] = EpochOrder(unit.num_samples, seed, epoch)
        return orders[epoch]

    epoch, position = 0, 0
    sizes: list[tuple[int, int]] = []
    while steps is None or len(sizes) < steps:
        where = locate(
            unit, order_at, epoch, position, global_batch_at(len(sizes)), drop_last=drop_last
        )
        if epochs is not None and where[0] >= epochs:
            break
        epoch, start, position = where
        sizes.append((position - start, unit.num_units(order_at(epoch), start, position)))
    return sizes
