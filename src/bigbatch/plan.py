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
from typing import Any, Literal


def _check_count(name: str, value: object, *, allow_none: bool = False) -> int | None:
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


def _spread(global_batch_size: int, world_size: int, steps: int) -> tuple[tuple[int, ...], ...]:
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
    world_size = _check_count("world_size", world_size)  # type: ignore[assignment]
    micro = _check_count("micro_batch_size", micro_batch_size, allow_none=True)
    steps = _check_count(
        "gradient_accumulation_steps", gradient_accumulation_steps, allow_none=True
    )
    if global_batch_size is None:
        if micro is None or steps is None:
            raise ValueError(
                "global_batch_size is required unless both micro_batch_size and "
                "gradient_accumulation_steps are given"
            )
        global_batch_size = micro * steps * world_size
    total = _check_count("global_batch_size", global_batch_size)
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
    return Plan(total, world_size, steps, _spread(total, world_size, steps))


LrScalingRule = Literal["linear", "sqrt", "none"]
LR_SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")


def scale_learning_rate(
    base_lr: float, global_batch_size: int, base_batch_size: int, rule: LrScalingRule
) -> float:
    """The learning rate for a global batch, scaled from one tuned at base_batch_size.

    linear: lr = base_lr x global / base (Goyal et al. 2017, for SGD); sqrt: lr = base_lr x
    sqrt(global / base) (for adaptive optimizers such as Adam); none: base_lr.

    Example:
        >>> scale_learning_rate(0.1, 1024, 256, "linear")
        0.4
        >>> scale_learning_rate(1e-3, 1024, 256, "sqrt")
        0.002
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(
            f"lr_scaling.rule must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}"
        )
    _check_count("global_batch_size", global_batch_size)
    _check_count("lr_scaling.base_batch_size", base_batch_size)
    ratio = global_batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


def stage_at(stages: Sequence[tuple[int, int]], step: int) -> int:
    """The value of the last ``(start_step, value)`` stage that has started by ``step``."""
    value = stages[0][1]
    for start, stage_value in stages:
        if start > step:
            break
        value = stage_value
    return value


@dataclass(frozen=True)
class BatchSizeSchedule:
    """A piecewise-constant global batch over optimizer steps.

    ``stages`` holds ``(start_step, global_batch_size)`` pairs, the first at step 0, starts
    increasing. Steps count from 0. A ramp-up (small to large), or fewer accumulation steps late
    in training (large to small), are both schedules.

    Example:
        >>> schedule = BatchSizeSchedule.from_value([[0, 64], [100, 256]])
        >>> schedule.at(99), schedule.at(100)
        (64, 256)
    """

    stages: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(
                "batch_size_schedule needs at least one [step, global_batch_size] stage"
            )
        starts = [start for start, _ in self.stages]
        if starts[0] != 0:
            raise ValueError(
                f"batch_size_schedule must start at step 0, got first step {starts[0]}"
            )
        if any(later <= earlier for earlier, later in zip(starts, starts[1:])):
            raise ValueError(f"batch_size_schedule steps must increase, got {starts}")
        for start, size in self.stages:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"batch_size_schedule step must be an integer >= 0, got {start!r}")
            _check_count("batch_size_schedule global_batch_size", size)

    @classmethod
    def constant(cls, global_batch_size: int) -> BatchSizeSchedule:
        """The same global batch for every step."""
        return cls(((0, global_batch_size),))

    @classmethod
    def from_value(cls, value: int | Sequence[Sequence[int]]) -> BatchSizeSchedule:
        """From an int (constant) or a list of ``[start_step, global_batch_size]`` pairs."""
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.constant(value)
        try:
            stages = tuple((int(start), int(size)) for start, size in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(
                "batch_size_schedule must be a global batch size or a list of "
                f"[step, global_batch_size] pairs, got {value!r}"
            ) from None
        return cls(stages)

    def at(self, step: int) -> int:
        """The global batch size of (0-based) optimizer step ``step``."""
        return stage_at(self.stages, step)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form: ``{"stages": [[step, global_batch_size], ...]}``."""
        return {"stages": [list(stage) for stage in self.stages]}
