"""The training loop: a window, one exact step, then the hooks, until the run's last step.

`Loop.run` reads in the order a step happens: this rank's window from the loader, the step's
learning rate, `Accumulator.step` (one exact optimizer step, docs/design.md invariant 1), the
run's counters, the adaptive batch's decision, then every hook (metrics, evaluation, checkpoint,
stop signals) with a `StepReport`. Everything counts optimizer steps (invariant 4).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bigbatch.core import batches
from bigbatch.core.engine import Accumulator, LossFn, StepResult
from bigbatch.train.config import Config
from bigbatch.train.state import SessionFigures, TrainState


class NonFiniteError(RuntimeError):
    """The loss or the gradients were not finite for too many steps in a row."""


@dataclass(frozen=True)
class StepReport:
    """What the hooks learn of one step.

    Attributes:
        steps_done: optimizer steps completed, this one included.
        window: this rank's window of the step (its plan, epoch and figures).
        result: what the engine did.
        learning_rate: the learning rate of the first parameter group for this step.
        step_time_s: seconds since the previous step ended (waiting for data included).
        global_batch: the step's global batch, in the run's unit.
        finished: this was the run's last step.
        state: the run's counters after this step.
    """

    steps_done: int
    window: Any
    result: StepResult
    learning_rate: float
    step_time_s: float
    global_batch: int
    finished: bool
    state: TrainState


class StepHook(Protocol):
    """Something the loop runs after every step: metrics, evaluation, checkpoints, signals."""

    def after_step(self, report: StepReport) -> int | None:
        """Act on one step; a signal number stops the run after it, None goes on."""


@dataclass
class Loop:
    """Steps from the loader's position to the end of the run.

    Attributes:
        accumulator: the engine.
        planner: the run's global batch of every step and its learning rate.
        loss_fn: ``loss_fn(model, micro_batch)``.
        optimizer: whose groups' learning rates are set every step.
        device: where micro-batches go.
        config: the run's configuration (non-finite limits).
        unit: the unit of the global batch, ``"samples"`` or ``"tokens"``.
    """

    accumulator: Accumulator
    planner: Any
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    device: torch.device
    config: Config
    unit: str

    def run(
        self,
        loader: Any,
        total_steps: int,
        state: TrainState,
        figures: SessionFigures,
        hooks: Sequence[StepHook],
    ) -> int:
        """Train to the end; 0 at the end of the run, or the number of the signal that stopped
        it (every rank agrees on it at the end of a step)."""
        self.accumulator.model.train()
        windows: Iterator[Any] = iter(loader)
        tick = time.perf_counter()
        try:
            while not self.planner.finished(loader.step, loader, total_steps):
                window = next(windows)
                learning_rate = self._set_learning_rate(window.step, total_steps, state)
                micro_batches = [batches.to_device(m, self.device) for m in window.micro_batches]
                result = self.accumulator.step(micro_batches, self.loss_fn)
                step_time_s = time.perf_counter() - tick
                self._count(window, result, step_time_s, state, figures)
                changed = self.planner.adapt(
                    loader.step, result.noise_scale, state.progress(self.unit)[1]
                )
                report = StepReport(
                    steps_done=loader.step,
                    window=window,
                    result=result,
                    learning_rate=learning_rate,
                    step_time_s=step_time_s,
                    global_batch=self.planner.at(window.step),
                    finished=self.planner.finished(loader.step, loader, total_steps),
                    state=state,
                )
                for hook in hooks:
                    if stopped_by := hook.after_step(report):
                        return stopped_by
                if changed:  # prefetched micro-batches were cut for the old size: start afresh
                    windows.close()  # type: ignore[attr-defined]
                    windows = iter(loader)
                tick = time.perf_counter()
        finally:
            windows.close()  # type: ignore[attr-defined]
        return 0

    def _set_learning_rate(self, step: int, total_steps: int, state: TrainState) -> float:
        """Every group's lr for this step: base x scaling rule x warm-up/decay."""
        noise = self.accumulator.noise_scale()
        done, items_per_unit = state.progress(self.unit)
        for group in self.optimizer.param_groups:
            group["lr"] = self.planner.learning_rate(
                group["initial_lr"], step, total_steps, done, noise, items_per_unit
            )
        return float(self.optimizer.param_groups[0]["lr"])

    def _count(
        self,
        window: Any,
        result: StepResult,
        step_time_s: float,
        state: TrainState,
        figures: SessionFigures,
    ) -> None:
        """Count one step into the run's state and this session's figures; stop after too many
        non-finite steps in a row (on_nonfinite stop)."""
        state.skipped_steps += int(result.skipped)
        nonfinite = result.skipped and (result.skip_reason or "").startswith("non-finite")
        state.nonfinite_in_row = state.nonfinite_in_row + 1 if nonfinite else 0
        state.samples_done += window.num_samples
        state.items_done += result.num_items
        state.tokens_done += window.num_tokens or 0
        figures.add(window, result, step_time_s)
        limit = self.config.max_nonfinite_in_row
        if self.config.on_nonfinite == "stop" and state.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"{result.skip_reason} for {limit} optimizer steps in a row (last: step "
                f"{window.step + 1}); weights were not updated with it. Check: the learning rate "
                f"(lr {self.optimizer.param_groups[0]['lr']:.3g} after lr_scaling), NaN/Inf in "
                "the data, max_grad_norm, and precision (fp16 overflows: try bf16)"
            )
