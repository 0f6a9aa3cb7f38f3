"""Which items each optimizer step takes: a seeded permutation per epoch, cut into global batches.

`GlobalBatchSampler` decides the items of global step t independently of the world size,
micro-batch or accumulation (docs/design.md, invariant 3), so a run is the same however it is
split, and resumes from a position of two integers. No torch is needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bigbatch.units import UsageError


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
            raise UsageError(
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


def count_steps_in_stages(
    num_samples: int,
    epochs: int,
    stages: Sequence[tuple[int, int]],
    *,
    drop_last: bool = False,
) -> int:
    """`count_steps` for a piecewise-constant global batch, in arithmetic: O(stages), not O(steps).

    ``stages`` holds ``(start_step, global_batch_size)`` pairs, the first at step 0, starts
    increasing; the last stage lasts to the end. Within a stage whole epochs are counted at once,
    so any number of epochs is answered at once.

    Example:
        >>> count_steps_in_stages(10, 2, [(0, 4)]), count_steps(10, 2, lambda step: 4)
        (6, 6)
    """
    epoch, position, step = 0, 0, 0
    for index, (_, size) in enumerate(stages):
        end = stages[index + 1][0] if index + 1 < len(stages) else None
        per_epoch = num_samples // size if drop_last else -(-num_samples // size)
        while end is None or step < end:
            remaining = num_samples - position
            if remaining == 0 or (drop_last and remaining < size):
                epoch, position, remaining = epoch + 1, 0, num_samples
            if epoch >= epochs:
                return step
            in_epoch = remaining // size if drop_last else -(-remaining // size)
            if end is not None and end - step < in_epoch:  # the stage ends inside this epoch
                position += (end - step) * size
                step = end
                break
            step += in_epoch
            position = min(num_samples, position + in_epoch * size)
            whole = epochs - epoch - 1  # epochs after this one, each per_epoch steps
            if end is not None:
                whole = min(whole, (end - step) // per_epoch)
            if whole > 0:
                step += whole * per_epoch
                epoch += whole
                position = min(num_samples, per_epoch * size)
    return step
