"""Which samples each optimizer step takes: a seeded order per epoch, cut into global batches.

`GlobalBatchSampler` decides the samples of global step t independently of the world size,
micro-batch or accumulation (docs/design.md, invariant 3), in samples or in tokens: its batch
unit (`bigbatch.planning.BatchUnit`) says how many of the epoch's next samples a global batch
takes. It resumes from a position of two integers. No torch is needed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bigbatch.planning.unit import BatchUnit, EpochOrder, SampleUnit, global_batch_sizes, locate

_KEPT_EPOCHS = 3
"""Epoch orders a sampler and its copies keep: the consumer's, the prefetcher's ahead of it, and
the next one either may look at."""


class GlobalBatchSampler:
    """The indices of each global batch: the next samples of a seeded order per epoch.

    The order of epoch e is a permutation drawn from a generator seeded with (seed, e). Each call
    takes the next samples of the current epoch that a global batch of the unit holds (samples:
    that many; tokens: until their tokens reach it); the last global batch of an epoch is short
    unless drop_last, then the next epoch starts. The size may change from call to call
    (batch-size schedules), and every sample is used exactly once per epoch.

    Args:
        num_samples: samples of the dataset.
        seed: seeds the epochs' orders.
        drop_last: drop each epoch's last global batch when its units stay below the size.
        unit: what a global batch counts; None: samples.

    Example:
        >>> sampler = GlobalBatchSampler(5, seed=0)
        >>> [len(sampler.next_global_batch(2)) for _ in range(4)], sampler.epoch
        ([2, 2, 1, 2], 1)
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        drop_last: bool = False,
        unit: BatchUnit | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.unit: BatchUnit = SampleUnit(num_samples) if unit is None else unit
        if self.unit.num_samples != num_samples:
            raise ValueError(
                f"the {self.unit.name} unit knows {self.unit.num_samples} samples for a dataset "
                f"of {num_samples}: it needs one token count per sample"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._orders: dict[int, EpochOrder] = {}  # shared with copies: one draw per epoch

    def copy(self) -> GlobalBatchSampler:
        """A sampler of the same unit at the same position (for a prefetching reader), sharing
        the epochs' orders, so that an epoch's permutation is drawn and held once."""
        sampler = GlobalBatchSampler(
            self.num_samples, seed=self.seed, drop_last=self.drop_last, unit=self.unit
        )
        sampler.load_state_dict(self.state_dict())
        sampler._orders = self._orders
        return sampler

    def order(self, epoch: int) -> EpochOrder:
        """One epoch's order (the latest few epochs are kept)."""
        order = self._orders.get(epoch)
        if order is None:
            order = self._orders[epoch] = EpochOrder(self.num_samples, self.seed, epoch)
            for old in sorted(self._orders)[:-_KEPT_EPOCHS]:
                del self._orders[old]
        return order

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset indices in one epoch's order."""
        return self.order(epoch).order

    def locate(self, global_batch: int) -> tuple[int, int, int]:
        """(epoch, start, stop) of the next global batch of this size; the state is unchanged."""
        return locate(
            self.unit, self.order, self.epoch, self.position, global_batch, drop_last=self.drop_last
        )

    def advance(self, global_batch: int) -> tuple[int, int, int]:
        """Move past the next global batch (in samples without drawing it): (epoch, start, stop)."""
        epoch, start, stop = self.locate(global_batch)
        self.epoch, self.position = epoch, stop
        return epoch, start, stop

    def next_epoch(self, global_batch: int) -> int:
        """The epoch the next global batch of this size would come from (state unchanged)."""
        return self.locate(global_batch)[0]

    def next_global_batch(self, global_batch: int) -> list[int]:
        """The dataset indices of the next global batch."""
        epoch, start, stop = self.advance(global_batch)
        return [int(index) for index in self.permutation(epoch)[start:stop]]

    def state_dict(self) -> dict[str, int]:
        """The position, as plain ints: the epoch and the samples of it already used."""
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
    global_batch_at: Callable[[int], int],
    *,
    drop_last: bool = False,
    unit: BatchUnit | None = None,
    seed: int = 0,
) -> int:
    """How many optimizer steps `epochs` passes take under a (possibly changing) global batch,
    step by step (in tokens the count follows the order, hence the seed)."""
    chosen = SampleUnit(num_samples) if unit is None else unit
    sizes = global_batch_sizes(
        chosen, global_batch_at, epochs=epochs, seed=seed, drop_last=drop_last
    )
    return len(sizes)
