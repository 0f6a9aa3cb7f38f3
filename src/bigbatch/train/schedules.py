"""The pure rules of a run's global batch and learning rate (`bigbatch.train.planner` applies them).

`scale_learning_rate` scales a tuned lr to a global batch. `lr_factor` is the warm-up / decay
multiplier by optimizer step; `progress_factor` the same by samples (or tokens), so a global batch
that changes mid-run does not shift the schedule. `adascale_gain` is AdaScale's gain
(Johnson et al. 2020); `AdaptiveBatchSize` moves the global batch toward the measured critical
batch size, with hysteresis and an exact, resumable history.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bigbatch.planning import check_count, stage_at
from bigbatch.units import UsageError

__all__ = [
    "STATIC_RULES",
    "AdaptiveBatchSize",
    "BatchSizeSchedule",
    "adascale_gain",
    "lr_factor",
    "progress_factor",
    "scale_learning_rate",
    "stage_at",
]

logger = logging.getLogger(__name__)


# The rules that depend on the global batch alone (adascale also needs the measured noise).
STATIC_RULES: tuple[str, ...] = ("linear", "sqrt", "none")


def scale_learning_rate(
    base_lr: float, global_batch_size: int, base_batch_size: int, rule: str
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
    if rule not in STATIC_RULES:
        raise UsageError(f"lr_scaling.rule must be one of {', '.join(STATIC_RULES)}, got {rule!r}")
    check_count("global_batch_size", global_batch_size)
    check_count("lr_scaling.base_batch_size", base_batch_size)
    ratio = global_batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


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
            raise UsageError(
                "batch_size_schedule needs at least one [step, global_batch_size] stage"
            )
        starts = [start for start, _ in self.stages]
        if starts[0] != 0:
            raise UsageError(
                f"batch_size_schedule must start at step 0, got first step {starts[0]}"
            )
        if any(later <= earlier for earlier, later in zip(starts, starts[1:])):
            raise UsageError(f"batch_size_schedule steps must increase, got {starts}")
        for start, size in self.stages:
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise UsageError(f"batch_size_schedule step must be an integer >= 0, got {start!r}")
            check_count("batch_size_schedule global_batch_size", size)

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
            raise UsageError(
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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The schedule's multiplier of the learning rate at a 0-based step.

    Linear warm-up to 1 over warmup_steps, then constant, or a cosine / linear decay that would
    reach 0 one step after the run's last.

    Example:
        >>> lr_factor(0, 10, 2, "constant"), lr_factor(2, 10, 2, "linear")
        (0.5, 1.0)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return _decay((step - warmup_steps) / max(1, total_steps - warmup_steps), schedule)


def _decay(progress: float, schedule: str) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def progress_factor(
    samples_before: int,
    step_samples: int,
    total_samples: int,
    warmup_samples: int,
    schedule: str,
) -> float:
    """`lr_factor` counted in samples instead of steps, for a global batch that changes.

    The warm-up ends after warmup_samples samples and the decay runs over the rest of
    total_samples, whatever the global batch of each step. With a constant global batch B and
    warmup_samples = W x B, total_samples = T x B, it equals ``lr_factor(step, T, W, schedule)``
    for samples_before = step x B.

    Args:
        samples_before: samples consumed by the run before this step.
        step_samples: samples of this step's global batch.
        total_samples: samples of the whole run.
        warmup_samples: samples of the warm-up.
        schedule: "constant", "cosine" or "linear".
    """
    if samples_before < warmup_samples:
        return min(1.0, (samples_before + step_samples) / warmup_samples)
    progress = (samples_before - warmup_samples) / max(1, total_samples - warmup_samples)
    return _decay(min(1.0, progress), schedule)


def adascale_gain(scale: float, gradient_sq_norm: float, trace_covariance: float) -> float:
    """AdaScale's gain r = (tr S + |G|^2) / (tr S / s + |G|^2) for a global batch s x the base.

    Johnson et al. 2020 ("AdaScale SGD"): r is s when the gradient is all noise (|G|^2 = 0), 1
    when it is noiseless, in between otherwise. The smoothed estimates may be slightly negative
    or missing early in a run: they are clipped at 0, and without any signal the gain is 1.

    Example:
        >>> adascale_gain(4.0, 1.0, 3.0)  # (3 + 1) / (3 / 4 + 1)
        2.2857142857142856
    """
    if not (math.isfinite(gradient_sq_norm) and math.isfinite(trace_covariance)):
        return 1.0
    gradient_sq, trace = max(0.0, gradient_sq_norm), max(0.0, trace_covariance)
    if gradient_sq + trace == 0.0:
        return 1.0
    return (trace + gradient_sq) / (trace / scale + gradient_sq)


class AdaptiveBatchSize:
    """The global batch of each step, moved toward the measured critical batch size.

    Every ``adapt_every`` steps, the target is the critical batch size clamped to
    [minimum, maximum] and rounded to a multiple of ``granularity`` (micro_batch_size x
    world_size, so windows stay full). The global batch changes only when the target differs from
    the current one by more than ``hysteresis`` (a factor), so a noisy estimate does not make it
    flap. A change applies from the next step on; `at` answers for any step, past ones included,
    from the recorded stages, which `state_dict` saves for an exact resume.

    Args:
        initial: the global batch of step 0.
        minimum: the smallest global batch.
        maximum: the largest global batch.
        granularity: targets are rounded to multiples of it (within the bounds).
        adapt_every: steps between decisions.
        hysteresis: the factor by which the target must differ from the current global batch.

    Example:
        >>> controller = AdaptiveBatchSize(64, 32, 1024, granularity=32, adapt_every=10)
        >>> controller.update(10, 300.0), controller.at(9), controller.at(10)
        (288, 64, 288)
    """

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        *,
        granularity: int = 1,
        adapt_every: int = 50,
        hysteresis: float = 1.5,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise UsageError(
                f"the adaptive global batch needs 1 <= min_global_batch_size <= "
                f"global_batch_size <= max_global_batch_size, got {minimum}, {initial}, {maximum}"
            )
        if granularity < 1 or adapt_every < 1 or hysteresis < 1.0:
            raise UsageError(
                f"granularity and adapt_every must be >= 1 and hysteresis >= 1, got "
                f"{granularity}, {adapt_every}, {hysteresis}"
            )
        self.minimum, self.maximum = minimum, maximum
        self.granularity, self.adapt_every, self.hysteresis = granularity, adapt_every, hysteresis
        self.stages: list[tuple[int, int]] = [(0, initial)]

    @property
    def global_batch_size(self) -> int:
        """The global batch of the latest stage (of every step from its start on)."""
        return self.stages[-1][1]

    def at(self, step: int) -> int:
        """The global batch of a 0-based step."""
        return stage_at(self.stages, step)

    def target(self, critical_batch_size: float) -> int:
        """The critical batch size clamped to the bounds and rounded to the granularity."""
        rounded = max(1, round(critical_batch_size / self.granularity)) * self.granularity
        return int(min(self.maximum, max(self.minimum, rounded)))

    def update(self, steps_done: int, critical_batch_size: float | None) -> int | None:
        """Decide after ``steps_done`` steps; the new global batch when it changes, else None.

        Decides only every ``adapt_every`` steps and when an estimate exists.
        """
        if steps_done % self.adapt_every or critical_batch_size is None:
            return None
        if not math.isfinite(critical_batch_size) or critical_batch_size <= 0:
            return None
        current, target = self.global_batch_size, self.target(critical_batch_size)
        if max(target / current, current / target) <= self.hysteresis:
            return None
        if steps_done <= self.stages[-1][0]:
            raise ValueError(f"steps_done {steps_done} is not after the last change")
        self.stages.append((steps_done, target))
        logger.info(
            "adaptive global batch: %d -> %d from step %d (critical batch size %.0f, bounds "
            "[%d, %d], multiple of %d)",
            current,
            target,
            steps_done,
            critical_batch_size,
            self.minimum,
            self.maximum,
            self.granularity,
        )
        return target

    def state_dict(self) -> dict[str, Any]:
        """The stages so far, as plain ints, for checkpoints."""
        return {"stages": [list(stage) for stage in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the stages of `state_dict`."""
        self.stages = [(int(start), int(size)) for start, size in state["stages"]]
