"""Early warning: the first steps of a run watched for a diverging loss or a gradient spike.

Both usually mean a learning rate too high for the global batch, or a warm-up too short; the
warning says so once, with the figures, and its state is checkpointed so a resumed run warns as
the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

logger = logging.getLogger(__name__)


class EarlyWarning:
    """Watches the first steps of a run and warns once when it starts to diverge.

    Two triggers, checked for ``window_steps`` steps: the mean loss of the last 3 steps (fewer at
    the start) rises above ``loss_factor`` x the loss of the first step (for a loss that starts
    positive), or the gradient norm exceeds ``grad_factor`` x the running median of the earlier
    steps' norms. The first step alone is the baseline, so a blow-up at step 2 is not averaged
    into it.
    Both usually mean a learning rate too high for this global batch or a warm-up too short;
    the warning says so with the figures. Non-finite values are left to the non-finite handling.

    Args:
        window_steps: how many steps from the start are watched.
        loss_factor: the loss rise that warns.
        grad_factor: the gradient-norm spike that warns.
    """

    def __init__(
        self, window_steps: int = 50, loss_factor: float = 1.5, grad_factor: float = 10.0
    ) -> None:
        self.window_steps, self.loss_factor, self.grad_factor = (
            window_steps,
            loss_factor,
            grad_factor,
        )
        self.first_loss: tuple[int, float] | None = None  # (step, loss) of the first finite loss
        self.recent_losses: list[float] = []
        self.grad_norms: list[float] = []
        self.fired = False

    def observe(
        self, step: int, loss: float, grad_norm: float, lr: float, global_batch_size: int
    ) -> str | None:
        """Add one applied step (1-based ``step``); the warning's text when it fires, else None."""
        if self.fired or step > self.window_steps:
            return None
        reason = None
        if math.isfinite(loss):
            self.recent_losses = [*self.recent_losses[-2:], loss]
            if self.first_loss is None:
                self.first_loss = (step, loss)
            first_step, first = self.first_loss
            recent = sum(self.recent_losses) / len(self.recent_losses)
            if first > 0 and step > first_step and recent > self.loss_factor * first:
                reason = (
                    f"the loss rose from {first:.4g} at step {first_step} to {loss:.4g} (mean of "
                    f"the last {len(self.recent_losses)} steps {recent:.4g}, above "
                    f"{self.loss_factor:g} x the first)"
                )
        if math.isfinite(grad_norm):
            median = statistics.median(self.grad_norms) if len(self.grad_norms) >= 3 else None
            if reason is None and median and grad_norm > self.grad_factor * median:
                reason = (
                    f"the gradient norm spiked to {grad_norm:.4g}, above {self.grad_factor:g} x "
                    f"its running median {median:.4g}"
                )
            self.grad_norms.append(grad_norm)
        if reason is None:
            return None
        self.fired = True
        message = (
            f"early warning at step {step}: {reason} (loss {loss:.4g}, grad norm "
            f"{grad_norm:.4g}, lr {lr:.3g}, global batch {global_batch_size}). Likely causes: "
            "the learning rate is too high for this global batch (check lr and lr_scaling), or "
            "the warm-up is too short (raise warmup_steps)"
        )
        # One channel, the log (as every warning of a run): a `warnings.warn` beside it printed the
        # message a second time, in Python's format, under the command line's log line.
        logger.warning(message)
        return message

    def state_dict(self) -> dict[str, Any]:
        """Plain values for checkpoints, so a resumed run warns as the uninterrupted one."""
        return {
            "first_losses": [] if self.first_loss is None else [list(self.first_loss)],
            "recent_losses": list(self.recent_losses),
            "grad_norms": list(self.grad_norms),
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        first = state["first_losses"]
        # A checkpoint of an earlier version kept up to 3 losses, without their step.
        if not first:
            self.first_loss = None
        elif isinstance(first[0], list | tuple):
            self.first_loss = (int(first[0][0]), float(first[0][1]))
        else:
            self.first_loss = (1, float(first[0]))
        self.recent_losses = [float(v) for v in state["recent_losses"]]
        self.grad_norms = [float(v) for v in state["grad_norms"]]
        self.fired = bool(state["fired"])
