"""The plan: how one global batch splits into ranks x windows x micro-batches.

`plan()` turns any two of (global batch, micro-batch, accumulation steps) plus the world size into a
frozen `Plan`. Items spread so that micro-batch sizes differ by at most one over every rank and
micro-step, and every rank runs the same number of micro-steps, which keeps the one gradient sync
per step in lockstep. This module needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def check_count(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """Validate a positive integer argument; booleans and floats are refused by name."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a positive integer, got {value!r} ({type(value).__name__})"
        )
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value}")
    return value


@dataclass(frozen=True)
class Plan:
    """The split of one global batch over ranks and micro-steps.

    Attributes:
        global_batch_size: items of one optimizer step, over all ranks.
        world_size: number of ranks (processes).
        gradient_accumulation_steps: micro-batches per rank per optimizer step (the window length).
        sizes: ``sizes[rank][micro_step]`` is the number of items of that micro-batch.

    Example:
        >>> p = plan(224, world_size=16, micro_batch_size=7)
        >>> p.gradient_accumulation_steps, p.micro_batch_size, p.micro_batch_sizes(0)
        (2, 7, [7, 7])
    """

    global_batch_size: int
    world_size: int
    gradient_accumulation_steps: int
    sizes: tuple[tuple[int, ...], ...]

    @property
    def micro_batch_size(self) -> int:
        """The largest micro-batch of the plan (what one forward must fit in memory)."""
        return max(max(rank_sizes) for rank_sizes in self.sizes)

    @property
    def is_even(self) -> bool:
        """True when every micro-batch holds the same number of items."""
        return len({size for rank_sizes in self.sizes for size in rank_sizes}) == 1

    def micro_batch_sizes(self, rank: int = 0) -> list[int]:
        """The micro-batch sizes of one rank's window, in the order they run."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size - 1}], got {rank!r}")
        return list(self.sizes[rank])

    def rank_offsets(self) -> list[int]:
        """Where each rank's slice starts inside the global batch (ranks take contiguous slices)."""
        offsets, start = [], 0
        for rank_sizes in self.sizes:
            offsets.append(start)
            start += sum(rank_sizes)
        return offsets

    def for_items(self, num_items: int) -> Plan:
        """The plan of a short global batch: the same window length, items spread as evenly.

        Micro-batches never grow; some may be empty (e.g. fewer items than ranks).

        Example:
            >>> plan(8, world_size=2, micro_batch_size=2).for_items(5).sizes
            ((2, 1), (1, 1))
        """
        if num_items == self.global_batch_size:
            return self
        steps = self.gradient_accumulation_steps
        return Plan(num_items, self.world_size, steps, spread(num_items, self.world_size, steps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description of the plan."""
        return {
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "micro_batch_size": self.micro_batch_size,
            "micro_batch_sizes": [list(rank_sizes) for rank_sizes in self.sizes],
        }

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
        shown = self.sizes if self.world_size <= 8 else self.sizes[:4] + self.sizes[-2:]
        for index, rank_sizes in enumerate(shown):
            rank = index if self.world_size <= 8 or index < 4 else self.world_size - 6 + index
            if self.world_size > 8 and index == 4:
                lines.append(f"{'...':>6}")
            lines.append(f"{rank:>6}  {sum(rank_sizes):>6}  {_compact(rank_sizes)}")
        return "\n".join(lines)


def _compact(sizes: tuple[int, ...]) -> str:
    """`7 7 7 6` for short windows, `7 x 30, 6 x 2` for long ones."""
    if len(sizes) <= 12:
        return " ".join(str(size) for size in sizes)
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return ", ".join(f"{size} x {count}" for size, count in runs)


def spread(global_batch_size: int, world_size: int, steps: int) -> tuple[tuple[int, ...], ...]:
    """Spread items over world_size x steps slots, sizes differing by at most one.

    The extra items go to the first slots in micro-step-major order (step 0 on every rank, then
    step 1, ...), so rank totals also differ by at most one and any empty micro-batches sit at
    the end of a window.
    """
    slots = world_size * steps
    base, extra = divmod(global_batch_size, slots)
    return tuple(
        tuple(base + (step * world_size + rank < extra) for step in range(steps))
        for rank in range(world_size)
    )


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
        TypeError: an argument is not an integer (booleans included).
        ValueError: an argument is not positive, or the three do not fit together.

    Example:
        >>> plan(10, world_size=2, micro_batch_size=3).sizes
        ((3, 2), (3, 2))
    """
    world_size = check_count("world_size", world_size)  # type: ignore[assignment]
    micro = check_count("micro_batch_size", micro_batch_size, allow_none=True)
    steps = check_count("gradient_accumulation_steps", gradient_accumulation_steps, allow_none=True)
    if global_batch_size is None:
        if micro is None or steps is None:
            raise ValueError(
                "global_batch_size is required unless both micro_batch_size and "
                "gradient_accumulation_steps are given"
            )
        global_batch_size = micro * steps * world_size
    total = check_count("global_batch_size", global_batch_size)
    assert total is not None
    if world_size > total:
        raise ValueError(
            f"world_size {world_size} is larger than global_batch_size {total}: every rank needs "
            f"at least one item; use at most {total} ranks or a global_batch_size of at least "
            f"{world_size}"
        )
    share = math.ceil(total / world_size)
    if micro is not None and micro > share:
        raise ValueError(
            f"micro_batch_size {micro} is larger than a rank's share of the global batch: "
            f"ceil({total} / {world_size}) = {share}; use micro_batch_size <= {share}"
        )
    if steps is not None and steps > share:
        raise ValueError(
            f"gradient_accumulation_steps {steps} leaves empty micro-batches: a rank's share is "
            f"ceil({total} / {world_size}) = {share} items; "
            f"use gradient_accumulation_steps <= {share}"
        )
    if micro is not None and steps is not None:
        if micro * steps * world_size != total:
            raise ValueError(_mismatch_message(total, world_size, micro, steps))
    elif micro is not None:
        steps = math.ceil(total / (world_size * micro))
    elif steps is None:
        steps = 1
    return Plan(total, world_size, steps, spread(total, world_size, steps))
