"""Early warning: the first steps of a run watched for a diverging loss or a gradient spike.

Both usually mean a learning rate too high for the global batch, or a warm-up too short; the
warning says so once, with the figures, and its state is checkpointed so a resumed run warns as
the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import statistics
import warnings
from typing import Any

logger = logging.getLogger(__name__)


class EarlyWarning:
    """Watches the first steps of a run and warns once when it starts to diverge.

    Two triggers, checked for ``window_steps`` steps: the mean loss of the last 3 steps rises
    above ``loss_factor`` x the mean of the first 3 (for a loss that starts positive), or the
    gradient norm exceeds ``grad_factor`` x the running median of the earlier steps' norms.
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
        self.first_losses: list[float] = []
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
            start = sum(self.first_losses) / 3 if len(self.first_losses) == 3 else 0.0
            recent = sum(self.recent_losses) / len(self.recent_losses)
            if start > 0 and recent > self.loss_factor * start:
                reason = (
                    f"the loss rose to {recent:.4g} (mean of the last 3 steps), above "
                    f"{self.loss_factor:g} x its starting value {start:.4g} (mean of the first 3)"
                )
            if len(self.first_losses) < 3:
                self.first_losses.append(loss)
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
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        return message

    def state_dict(self) -> dict[str, Any]:
        """Plain values for checkpoints, so a resumed run warns as the uninterrupted one."""
        return {
            "first_losses": list(self.first_losses),
            "recent_losses": list(self.recent_losses),
            "grad_norms": list(self.grad_norms),
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.first_losses = [float(v) for v in state["first_losses"]]
        self.recent_losses = [float(v) for v in state["recent_losses"]]
        self.grad_norms = [float(v) for v in state["grad_norms"]]
        self.fired = bool(state["fired"])
