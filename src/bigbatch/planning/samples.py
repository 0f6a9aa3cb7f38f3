"""The plan: how one global batch splits into ranks x windows x micro-batches.

`plan()` turns any two of (global batch, micro-batch, accumulation steps) plus the world size into a
frozen `Plan`. Items spread so that micro-batch sizes differ by at most one over every rank and
micro-step, and every rank runs the same number of micro-steps, which keeps the one gradient sync
per step in lockstep. This module needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bigbatch.units import MAX_COUNT, UsageError, UsageTypeError, shorten

MAX_WORLD_SIZE = 2**20
"""The most ranks a plan takes (a million processes: more than any cluster runs)."""
_MAX_LISTED = 2**16
"""`Plan.to_dict` lists every micro-batch up to this many in all, and runs of sizes beyond."""

Rows = tuple[tuple[int, ...], ...]
"""One micro-batch: its rows, each the positions (in the global batch) of the samples it holds."""


def check_count(
    name: str, value: object, *, allow_none: bool = False, maximum: int = MAX_COUNT
) -> int | None:
    """Validate a positive integer argument; booleans, floats and impossible sizes are refused.

    Raises:
        UsageTypeError: not an integer (a TypeError).
        UsageError: not in [1, maximum] (a ValueError).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageTypeError(
            f"{name} must be a positive integer, got {shorten(value)} ({type(value).__name__})"
        )
    if value <= 0:
        raise UsageError(f"{name} must be a positive integer (>= 1), got {shorten(value)}")
    if value > maximum:
        limit = "2**63 - 1" if maximum == MAX_COUNT else f"{maximum:,}"
        raise UsageError(
            f"{name} {shorten(value)} is impossible: the most bigbatch takes is {limit}"
        )
    return value


@dataclass(frozen=True)
class Plan:
    """The split of one global batch over ranks and micro-steps.

    Items spread over the world_size x gradient_accumulation_steps slots so that sizes differ by
    at most one: the first ``global % slots`` slots, in micro-step-major order (step 0 on every
    rank, then step 1, ...), hold one item more. The sizes are derived, never stored, so a plan
    takes the same memory for any global batch.

    Attributes:
        global_batch_size: items of one optimizer step, over all ranks.
        world_size: number of ranks (processes).
        gradient_accumulation_steps: micro-batches per rank per optimizer step (the window length).

    Example:
        >>> p = plan(224, world_size=16, micro_batch_size=7)
        >>> p.gradient_accumulation_steps, p.micro_batch_size, p.micro_batch_sizes(0)
        (2, 7, [7, 7])
    """

    global_batch_size: int
    world_size: int
    gradient_accumulation_steps: int

    @property
    def _base_extra(self) -> tuple[int, int]:
        """Every slot holds ``base`` items, the first ``extra`` slots one more."""
        return divmod(self.global_batch_size, self.world_size * self.gradient_accumulation_steps)

    def _num_larger(self, rank: int) -> int:
        """How many of a rank's micro-batches hold base + 1 items (the first ones of its window).

        Slot (step, rank) is larger when step x world_size + rank < extra.
        """
        extra = self._base_extra[1]
        return min(self.gradient_accumulation_steps, max(0, -(-(extra - rank) // self.world_size)))

    @property
    def micro_batch_size(self) -> int:
        """The largest micro-batch of the plan (what one forward must fit in memory)."""
        base, extra = self._base_extra
        return base + (extra > 0)

    @property
    def is_even(self) -> bool:
        """True when every micro-batch holds the same number of items."""
        return self._base_extra[1] == 0

    @property
    def sizes(self) -> tuple[tuple[int, ...], ...]:
        """``sizes[rank][micro_step]``: every micro-batch's items (built on demand, O(ranks x
        steps); `micro_batch_sizes` gives one rank's)."""
        return tuple(tuple(self.micro_batch_sizes(rank)) for rank in range(self.world_size))

    def micro_batch_sizes(self, rank: int = 0) -> list[int]:
        """The micro-batch sizes of one rank's window, in the order they run."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size - 1}], got {rank!r}")
        return [size for size, count in self._runs(rank) for _ in range(count)]

    def _runs(self, rank: int) -> list[tuple[int, int]]:
        """One rank's window as (size, count) runs: the larger micro-batches, then the others."""
        base, larger = self._base_extra[0], self._num_larger(rank)
        runs = ((base + 1, larger), (base, self.gradient_accumulation_steps - larger))
        return [(size, count) for size, count in runs if count]

    def rank_offsets(self) -> list[int]:
        """Where each rank's slice starts inside the global batch (ranks take contiguous slices)."""
        base_total = self._base_extra[0] * self.gradient_accumulation_steps
        offsets, start = [], 0
        for rank in range(self.world_size):
            offsets.append(start)
            start += base_total + self._num_larger(rank)
        return offsets

    def window(self, rank: int) -> tuple[Rows, ...]:
        """One rank's micro-batches as rows of positions in the global batch, a sample a row.

        Ranks take contiguous slices, each cut in order; an empty micro-batch is ``()``.

        Example:
            >>> plan(5, world_size=2, micro_batch_size=2).window(1)  # sizes [1, 1] from position 3
            (((3,),), ((4,),))
        """
        start, rows = self.rank_offsets()[rank], []
        for size in self.micro_batch_sizes(rank):
            rows.append(tuple((position,) for position in range(start, start + size)))
            start += size
        return tuple(rows)

    def for_items(self, num_items: int) -> Plan:
        """The plan of a short global batch: the same window length, items spread as evenly.

        Micro-batches never grow; some may be empty (e.g. fewer items than ranks).

        Example:
            >>> plan(8, world_size=2, micro_batch_size=2).for_items(5).sizes
            ((2, 1), (1, 1))
        """
        if num_items == self.global_batch_size:
            return self
        return Plan(num_items, self.world_size, self.gradient_accumulation_steps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description of the plan.

        ``micro_batch_sizes`` lists every micro-batch per rank; a plan of more than 65,536
        micro-batches gives ``micro_batch_size_runs`` instead: per rank, ``[size, count]`` pairs.
        """
        described: dict[str, Any] = {
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "micro_batch_size": self.micro_batch_size,
        }
        if self.world_size * self.gradient_accumulation_steps <= _MAX_LISTED:
            described["micro_batch_sizes"] = [list(rank_sizes) for rank_sizes in self.sizes]
        else:
            described["micro_batch_size_runs"] = [
                [list(run) for run in self._runs(rank)] for rank in range(self.world_size)
            ]
        return described

    def __str__(self) -> str:
        lines = [
            f"global batch {self.global_batch_size} = "
            + (
                f"{self.micro_batch_size} (micro) x {self.world_size} (ranks) x "
                f"{self.gradient_accumulation_steps} (accumulation)"
                if self.is_even
                else f"{self.world_size} ranks x {self.gradient_accumulation_steps} micro-steps, "
                f"uneven micro-batches of at most {self.micro_batch_size}"
            ),
            f"{'rank':>6}  {'items':>6}  micro-batch sizes",
        ]
        many = self.world_size > 8
        shown = [*range(4), *range(self.world_size - 2, self.world_size)] if many else None
        base_total = self._base_extra[0] * self.gradient_accumulation_steps
        for index, rank in enumerate(shown if shown is not None else range(self.world_size)):
            if many and index == 4:
                lines.append(f"{'...':>6}")
            items = base_total + self._num_larger(rank)
            lines.append(f"{rank:>6}  {items:>6}  {self._describe_window(rank)}")
        return "\n".join(lines)

    def _describe_window(self, rank: int) -> str:
        """`7 7 7 6` for short windows, `7 x 30, 6 x 2` for long ones."""
        if self.gradient_accumulation_steps <= 12:
            return " ".join(str(size) for size in self.micro_batch_sizes(rank))
        return ", ".join(f"{size} x {count}" for size, count in self._runs(rank))


def spread(global_batch_size: int, world_size: int, steps: int) -> tuple[tuple[int, ...], ...]:
    """Spread items over world_size x steps slots, sizes differing by at most one.

    The extra items go to the first slots in micro-step-major order (step 0 on every rank, then
    step 1, ...), so rank totals also differ by at most one and any empty micro-batches sit at
    the end of a window. (`Plan.sizes`; kept for callers of the function.)
    """
    return Plan(global_batch_size, world_size, steps).sizes


def _mismatch_message(global_batch_size: int, world_size: int, micro: int, steps: int) -> str:
    per_step = world_size * micro
    exact = global_batch_size / per_step
    lower = max(1, global_batch_size // per_step)
    choices = sorted({lower * per_step, (lower + 1) * per_step})
    if exact == int(exact):
        fix = f"set gradient_accumulation_steps={int(exact)}"
    else:
        fix = (
            f"use global_batch_size {' or '.join(map(str, choices))}, or leave "
            "gradient_accumulation_steps out so bigbatch spreads the items unevenly"
        )
    return (
        f"global_batch_size {global_batch_size} over world_size {world_size} with micro_batch_size "
        f"{micro} needs gradient_accumulation_steps = "
        f"{global_batch_size} / ({world_size} x {micro})"
        f" = {exact:g}, got {steps}: {fix}"
    )


def plan(
    global_batch_size: int | None,
    world_size: int = 1,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
) -> Plan:
    """Split a global batch into world_size ranks x accumulation steps x micro-batches.

    Any two of global batch, micro-batch and accumulation steps determine the third:

    - global and micro: accumulation = ceil(global / (world_size x micro)); items spread evenly,
      no micro-batch exceeds micro.
    - global and accumulation: micro = ceil(global / (world_size x accumulation)).
    - micro and accumulation: global = micro x accumulation x world_size.
    - all three: they must satisfy global = micro x accumulation x world_size (DeepSpeed's rule).
    - global alone: one micro-batch per rank.

    Raises:
        UsageTypeError: an argument is not an integer (booleans included); a TypeError.
        UsageError: an argument is not positive or impossibly large (above 2**63 - 1, or more
            than 2**20 ranks), or the three do not fit together; a ValueError.

    Example:
        >>> plan(10, world_size=2, micro_batch_size=3).sizes
        ((3, 2), (3, 2))
    """
    world_size = check_count("world_size", world_size, maximum=MAX_WORLD_SIZE)  # type: ignore[assignment]
    micro = check_count("micro_batch_size", micro_batch_size, allow_none=True)
    steps = check_count("gradient_accumulation_steps", gradient_accumulation_steps, allow_none=True)
    if global_batch_size is None:
        if micro is None or steps is None:
            raise UsageError(
                "global_batch_size is required unless both micro_batch_size and "
                "gradient_accumulation_steps are given"
            )
        global_batch_size = micro * steps * world_size
    total = check_count("global_batch_size", global_batch_size)
    assert total is not None
    if world_size > total:
        raise UsageError(
            f"world_size {world_size} is larger than global_batch_size {total}: every rank needs "
            f"at least one item; use at most {total} ranks or a global_batch_size of at least "
            f"{world_size}"
        )
    share = math.ceil(total / world_size)
    if micro is not None and micro > share:
        raise UsageError(
            f"micro_batch_size {micro} is larger than a rank's share of the global batch: "
            f"ceil({total} / {world_size}) = {share}; use micro_batch_size <= {share}"
        )
    if steps is not None and steps > share:
        raise UsageError(
            f"gradient_accumulation_steps {steps} leaves empty micro-batches: a rank's share is "
            f"ceil({total} / {world_size}) = {share} items; "
            f"use gradient_accumulation_steps <= {share}"
        )
    if micro is not None and steps is not None:
        if micro * steps * world_size != total:
            raise UsageError(_mismatch_message(total, world_size, micro, steps))
    elif micro is not None:
        steps = math.ceil(total / (world_size * micro))
    elif steps is None:
        steps = 1
    return Plan(total, world_size, steps)


def count_steps_in_stages(
    num_samples: int,
    epochs: int,
    stages: Sequence[tuple[int, int]],
    *,
    drop_last: bool = False,
) -> int:
    """Steps that `epochs` passes take under a piecewise-constant global batch in samples.

    In arithmetic: O(stages), not O(steps).

    ``stages`` holds ``(start_step, global_batch_size)`` pairs, the first at step 0, starts
    increasing; the last stage lasts to the end. Within a stage whole epochs are counted at once,
    so any number of epochs is answered at once.

    Example:
        >>> count_steps_in_stages(10, 2, [(0, 4)])  # 3 steps (4, 4, 2) an epoch
        6
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


def stage_at(stages: Sequence[tuple[int, int]], step: int) -> int:
    """The value of the last ``(start_step, value)`` stage that has started by ``step``."""
    value = stages[0][1]
    for start, stage_value in stages:
        if start > step:
            break
        value = stage_value
    return value
