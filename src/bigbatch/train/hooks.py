"""What runs after every step: metrics, evaluation, checkpoints and stop signals.

Each hook is a small object with ``after_step(report)``; the loop calls them in order and knows
nothing of what they do. A hook's own state, if any, is a Stateful participant of the
checkpointer, not something the loop carries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigbatch.train import environment
from bigbatch.train import metrics as run_metrics
from bigbatch.train.checkpoint import checkpoint_name
from bigbatch.train.checkpointer import Checkpointer
from bigbatch.train.early_warning import EarlyWarning
from bigbatch.train.loop import StepReport
from bigbatch.train.preemption import StopSignals


class MetricsHook:
    """The early warning, then the step's record into metrics.jsonl, the trackers and the bar."""

    def __init__(
        self,
        metrics_logger: run_metrics.MetricsLogger,
        bar: run_metrics.ProgressBar,
        early_warning: EarlyWarning,
        device: torch.device,
        unit: str,
    ) -> None:
        self.metrics_logger, self.bar, self.early_warning = metrics_logger, bar, early_warning
        self.device, self.unit = device, unit

    def after_step(self, report: StepReport) -> int | None:
        result = report.result
        if not result.skipped:
            self.early_warning.observe(
                report.steps_done,
                result.loss,
                result.grad_norm,
                report.learning_rate,
                report.global_batch,
            )
        record = run_metrics.step_record(
            report.window,
            result,
            learning_rate=report.learning_rate,
            step_time_s=report.step_time_s,
            global_batch=report.global_batch,
            state=report.state,
            unit=self.unit,
        )
        record["peak_memory_bytes"] = environment.peak_memory_bytes(self.device)
        record["skipped_steps"] = report.state.skipped_steps
        self.metrics_logger.log_step(report.steps_done, record)
        self.bar.update(report.steps_done, record)
        return None


class EvaluationHook:
    """Evaluates every ``every`` steps (the end of the run evaluates on its own)."""

    def __init__(
        self,
        every: int,
        evaluate: Callable[[], dict[str, float]],
        metrics_logger: run_metrics.MetricsLogger,
    ) -> None:
        self.every, self.evaluate, self.metrics_logger = every, evaluate, metrics_logger

    def after_step(self, report: StepReport) -> int | None:
        if self.every and not report.finished and report.steps_done % self.every == 0:
            self.metrics_logger.log_eval(report.steps_done, self.evaluate())
        return None


class CheckpointHook:
    """The run's checkpoints: every ``every`` steps (not at the last one), and on demand at the
    end of the run or when it stops. Call on every rank (sharded saves write on each).

    With ``background``, the checkpoints of ``every`` are written in the background
    (`Checkpointer.save_in_background`): each step boundary learns whether the one in flight
    failed (one line on every rank) and the next waits for it. Those at a stop signal and at
    the end are complete before the call returns.

    Args:
        checkpointer: saves the weights, the optimizer, every participant and the RNG.
        every: steps between checkpoints; 0: only at the end.
        extra: ``extra(step)``, what the checkpoint of a step records besides the participants.
        background: write the checkpoints of ``every`` in the background.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        every: int,
        extra: Callable[[int], dict[str, Any]],
        *,
        saved_step: int | None = None,
        background: bool = False,
    ) -> None:
        self.checkpointer, self.every, self.extra = checkpointer, every, extra
        self.saved_step = saved_step  # the step of the newest checkpoint written or restored
        self.background = background
        if background and every:
            checkpointer.start_writer()  # its start overlaps the first steps, not a save

    def after_step(self, report: StepReport) -> int | None:
        self.checkpointer.poll()  # a background save that failed ends the run here
        step = report.steps_done
        if self.every and not report.finished and step % self.every == 0:
            self.saved_step = step
            saver = self.checkpointer
            (saver.save_in_background if self.background else saver.save)(step, self.extra(step))
        return None

    def save_unless_saved(self, step: int) -> Path:
        """The checkpoint of ``step``, complete on return: one still writing in the background
        is waited for, and one not yet written is written now."""
        self.checkpointer.wait()
        if self.saved_step != step:
            self.saved_step = step
            return self.checkpointer.save(step, self.extra(step))
        return self.checkpointer.directory / checkpoint_name(step)

    def close(self) -> None:
        """The end of a run, also on an error: wait for this rank's background write (no
        collective) and end the writer."""
        self.checkpointer.close()


class StopHook:
    """Stops the run at the end of a step once a stop signal arrived on any rank."""

    def __init__(self, stop: StopSignals) -> None:
        self.stop = stop

    def after_step(self, report: StepReport) -> int | None:
        # The last step: the run finishes first; `Trainer._fit` asks once its files are written.
        if report.finished or not self.stop.active:
            return None
        return self.stop.agreed() or None
