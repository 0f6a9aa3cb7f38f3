"""The global batch of every step, its plan, and the step's learning rate, in either batch unit.

`BatchPlanner` chooses the run's batch unit once from the config (`global_batch_tokens` set:
tokens, else samples; `bigbatch.planning.BatchUnit`) and answers every question of the run through
it: each step's global batch (a constant, `batch_size_schedule` stages or the adaptive
controller, all in the unit), the micro setting (given, or probed once for `auto`), the window
loader, the number of steps, and the learning rate: warm-up / decay by optimizer step in samples
(by samples when the batch adapts), by input tokens in tokens, so a global batch that changes does
not shift them. docs/tokens.md describes a run in tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import Dataset

from bigbatch.core.noise import NoiseScale
from bigbatch.data.loader import WindowLoader
from bigbatch.planning import Plan, TokenBudget, sample_lengths
from bigbatch.planning.unit import BatchUnit, SampleUnit, TokenUnit, global_batch_sizes
from bigbatch.train.config import Config
from bigbatch.train.schedules import (
    AdaptiveBatchSize,
    BatchSizeSchedule,
    adascale_gain,
    lr_factor,
    progress_factor,
    scale_learning_rate,
)
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

Probe = Callable[[BatchUnit], int]
"""``probe(unit)``: the micro setting (micro_batch_size or micro_batch_tokens) for ``auto``."""


def batch_unit(
    config: Config,
    world_size: int,
    dataset: Dataset[Any],
    first_global_batch: int,
    sample_length: Callable[[Any], int] | None = None,
) -> BatchUnit:
    """The run's batch unit, chosen once: tokens when global_batch_tokens is set, else samples."""
    if config.global_batch_tokens is None:
        micro, steps = config.micro_batch_size, config.gradient_accumulation_steps
        return SampleUnit(
            len(dataset),  # type: ignore[arg-type]
            world_size,
            micro if isinstance(micro, int) else None,
            gradient_accumulation_steps=steps if isinstance(steps, int) else None,
            first_global_batch=first_global_batch,
        )
    micro_tokens = config.micro_batch_tokens
    return TokenUnit(
        sample_lengths(dataset, sample_length),
        world_size,
        micro_tokens if isinstance(micro_tokens, int) else None,
        packing=config.packing,
    )


class BatchPlanner:
    """The global batch of every step, its plan, and the step's learning rate.

    Fixed stages (`batch_size_schedule` as a list, or none) or the adaptive controller, and one
    micro setting for every plan: given, derived, or probed once by ``probe`` (for ``auto``).
    A new global batch keeps the micro setting and changes the accumulation.

    Args:
        config: the run's configuration.
        world_size: number of ranks.
        dataset: the training set (its size; in tokens, its samples' lengths).
        sample_length: a sample's input tokens, for a dataset without ``lengths`` (tokens).
        probe: ``probe(unit)``, the micro setting for ``auto``; called at most once.
    """

    def __init__(
        self,
        config: Config,
        world_size: int,
        dataset: Dataset[Any],
        *,
        sample_length: Callable[[Any], int] | None = None,
        probe: Probe,
    ) -> None:
        self.config, self.world_size, self._probe = config, world_size, probe
        tokens = config.global_batch_tokens is not None
        first = config.global_batch_tokens if tokens else config.global_batch_size
        assert first is not None
        given = config.batch_size_schedule
        stages = list(given) if isinstance(given, list) else []
        if not stages or stages[0][0] != 0:
            stages.insert(0, (0, first))
        self.schedule = BatchSizeSchedule.from_value([list(stage) for stage in stages])
        self.first_global_batch = self.schedule.at(0)
        self.unit = batch_unit(config, world_size, dataset, self.first_global_batch, sample_length)
        self.adaptive: AdaptiveBatchSize | None = None  # built once the micro setting is known
        self._probed = False
        self._saved_adaptive: dict[str, Any] | None = None
        self._run_units: dict[int, int] = {}
        unit = self.unit
        bounds = getattr(config, unit.min_field), getattr(config, unit.max_field)
        if given != "adaptive" and any(bounds):
            logger.warning(
                "%s/%s only apply to batch_size_schedule adaptive", unit.min_field, unit.max_field
            )
        largest = max(size for _, size in self.schedule.stages)
        field = unit.global_field if len(self.schedule.stages) == 1 else "batch_size_schedule"
        unit.check_schedule(largest, field)

    def _ready(self) -> BatchUnit:
        """The unit with its micro setting known: probed once for ``auto``."""
        if not self._probed and getattr(self.config, self.unit.micro_field) == "auto":
            self.unit.micro = self._probe(self.unit)
            self._probed = True
        return self.unit

    def at(self, step: int) -> int:
        """The global batch of a 0-based step, in the unit (adaptive: recorded or current)."""
        return self.adaptive.at(step) if self.adaptive is not None else self.schedule.at(step)

    def plan_for(self, global_batch: int) -> Plan | TokenBudget:
        """What every step of this global batch shares (in tokens, each step's split follows its
        samples' lengths)."""
        return self._ready().describe(global_batch)

    @property
    def micro_batch_size(self) -> int:
        """Rows of a micro-batch of the first global batch (evaluation batches, BatchNorm's check;
        in tokens, rows of the longest sample)."""
        return self.plan_for(self.first_global_batch).micro_batch_size

    def start(self) -> Plan | TokenBudget:
        """The first step's description (probing memory once if auto); starts the adaptive
        controller, with the stages of a checkpoint loaded before."""
        first = self.plan_for(self.first_global_batch)
        config, unit = self.config, self.unit
        if config.batch_size_schedule == "adaptive" and self.adaptive is None:
            maximum = getattr(config, unit.max_field)
            assert maximum is not None
            self.adaptive = AdaptiveBatchSize(
                self.first_global_batch,
                getattr(config, unit.min_field) or self.first_global_batch,
                maximum,
                granularity=unit.granularity,
                adapt_every=config.adapt_every,
            )
            if self._saved_adaptive is not None:
                self.adaptive.load_state_dict(self._saved_adaptive)
        return first

    def total_steps(self) -> int:
        """Optimizer steps of the run (max_steps, or what `epochs` take; adaptive: an estimate).

        Raises:
            UsageError: the warm-up is longer than the run (the lr would never reach lr).
        """
        config, total = self.config, self.config.max_steps
        if total is None:
            assert config.epochs is not None
            stages = self.adaptive.stages if self.adaptive is not None else self.schedule.stages
            total = self.unit.count_steps(
                config.epochs, stages, seed=config.seed, drop_last=config.drop_last
            )
        if config.warmup_steps > total:
            raise UsageError(
                f"warmup_steps {config.warmup_steps} is longer than the run ({total} steps): "
                f"the learning rate would never reach lr; use warmup_steps <= {total}"
            )
        return total

    def finished(self, step: int, loader: WindowLoader, total_steps: int) -> bool:
        """All steps done; adaptive: all epochs done (the number of steps is not known ahead)."""
        if self.adaptive is None:
            return step >= total_steps
        assert self.config.epochs is not None
        return loader.sampler.next_epoch(self.at(step)) >= self.config.epochs

    def run_units(self, total_steps: int) -> int:
        """Units of the whole run: of its steps' global batches, or epochs x the dataset."""
        if self.adaptive is not None:
            return (self.config.epochs or 0) * self.unit.epoch_units()
        if total_steps not in self._run_units:
            config = self.config
            sizes = global_batch_sizes(
                self.unit, self.at, steps=total_steps, seed=config.seed, drop_last=config.drop_last
            )
            self._run_units[total_steps] = sum(units for _, units in sizes)
        return self._run_units[total_steps]

    def learning_rate(
        self,
        base_lr: float,
        step: int,
        total_steps: int,
        done_before: int,
        noise: NoiseScale | None,
        items_per_unit: float = 1.0,
    ) -> float:
        """base_lr x lr_scaling rule (or AdaScale's gain) x warm-up/decay, for one step.

        Warm-up and decay count optimizer steps in samples; they count units (done_before: the
        run's units before this step) in tokens and whenever the batch adapts: warm-up lasts
        warmup_steps x the first global batch, the decay the rest of the run. The scaling rule
        compares the step's global batch with lr_scaling.base_batch_size in the unit (auto: the
        first). AdaScale's tr S is that of the base batch's gradient: the per-item trace over the
        base batch's loss items (items_per_unit a unit).
        """
        config, global_batch = self.config, self.at(step)
        base = config.lr_scaling.base_batch_size
        base_batch = self.first_global_batch if base == "auto" else base
        if self.adaptive is not None or self.unit.lr_by_units:
            factor = progress_factor(
                done_before,
                global_batch,
                self.run_units(total_steps),
                config.warmup_steps * self.first_global_batch,
                config.lr_schedule,
            )
        else:
            factor = lr_factor(step, total_steps, config.warmup_steps, config.lr_schedule)
        rule = config.lr_scaling.rule
        if rule != "adascale":
            return scale_learning_rate(base_lr, global_batch, base_batch, rule) * factor
        gain = 1.0
        if noise is not None:
            base_items = base_batch * items_per_unit
            trace = noise.trace_covariance / base_items
            gain = adascale_gain(global_batch / base_batch, noise.gradient_sq_norm, trace)
        return base_lr * gain * factor

    def adapt(self, steps_done: int, noise: NoiseScale | None, items_per_unit: float) -> bool:
        """Adaptive schedule: let the controller decide; True when the global batch changed.

        The critical batch is measured in loss items and the global batch counts units:
        items_per_unit converts. No decision before the estimate has smoothed over a quarter of
        its window (an early, noisy estimate would move the batch only to move it back).
        """
        adaptive = self.adaptive
        if adaptive is None or noise is None or noise.critical_batch_size is None:
            return False
        settled = max(self.config.adapt_every, self.config.noise_smoothing_steps // 4)
        if noise.num_steps < settled:
            return False
        critical = noise.critical_batch_size / items_per_unit
        return adaptive.update(steps_done, critical) is not None

    def window_loader(
        self,
        dataset: Dataset[Any],
        *,
        rank: int,
        collate_fn: Callable[[list[Any]], Any] | None,
        collate_packed: Callable[[list[list[Any]]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_ignored_signals: Sequence[int] = (),
    ) -> WindowLoader:
        """This rank's windows of the run, from step 0 (load a checkpoint's position to resume)."""
        config = self.config
        if config.packing and collate_packed is None:
            raise UsageError(
                "packing: the recipe has no collate_packed, so its model cannot read packed rows "
                "(positions restarting and attention within each sequence); set packing false"
            )
        return WindowLoader(
            dataset,
            unit=self._ready(),
            global_batch_at=self.at,
            seed=config.seed,
            rank=rank,
            collate_fn=collate_fn,
            collate_packed=collate_packed if config.packing else None,
            drop_last=config.drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_ignored_signals=worker_ignored_signals,
        )

    def state_dict(self) -> dict[str, Any]:
        """The micro setting (a probed one is never probed again) and the adaptive stages."""
        unit = self._ready()
        state: dict[str, Any] = {"micro_batch_size": self.micro_batch_size}
        state["micro_batch_tokens"] = None
        state[unit.micro_field] = unit.micro
        state["adaptive"] = self.adaptive.state_dict() if self.adaptive is not None else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with a checkpoint's micro setting (no probe) and adaptive stages; before or
        after `start`."""
        unit = self.unit
        if getattr(self.config, unit.micro_field) == "auto":
            unit.micro = int(state[unit.micro_field])
            self._probed = True
        saved = state.get("adaptive")
        if not saved:
            return
        if self.adaptive is None:
            self._saved_adaptive = saved  # `start` builds the controller
            return
        self.adaptive.load_state_dict(saved)
        self.adaptive.granularity = unit.granularity  # of the restored micro setting
