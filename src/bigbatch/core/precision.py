"""Mixed precision for the engine: autocast, and fp16 loss scaling that survives summed losses.

bf16 and fp16 run the forward under autocast; fp16 also scales the loss with a GradScaler. The
engine backpropagates loss *sums*, which in fp16 would overflow where a mean would not, so fp16
divides each sum by a divisor before backward -- the previous step's items per rank, identical on
every rank because the count is all-reduced -- and the step's one normalisation multiplies it back.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from bigbatch.choices import Precision
from bigbatch.core import batches, distributed

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def autocast(precision: Precision, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The forward's autocast context: none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


class LossScaling:
    """The loss scale of one Accumulator: a GradScaler and a divisor under fp16, nothing otherwise.

    Args:
        precision: the Accumulator's precision.
        device_type: where the model lives.
        grad_scaler: a caller's GradScaler for fp16 (warned about and ignored otherwise).
    """

    def __init__(
        self, precision: str, device_type: str, grad_scaler: torch.amp.GradScaler | None
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if grad_scaler is not None and precision != "fp16":
            warnings.warn(
                f"grad_scaler has no effect with precision={precision!r}: only fp16 needs loss "
                "scaling",
                stacklevel=3,
            )
        self.grad_scaler = (
            (grad_scaler or torch.amp.GradScaler(device_type)) if precision == "fp16" else None
        )
        self.divisor: float | None = None

    def start(
        self, micro_batches: list[Any], device: torch.device, *, over_ranks: bool, world_size: int
    ) -> None:
        """Before the first fp16 backward: samples per rank stand in for the unknown items.

        Does nothing after the first step or outside fp16 (the samples are not even counted).
        """
        if self.grad_scaler is None or self.divisor is not None:
            return
        rows = float(sum(map(batches.num_rows, micro_batches)))
        if over_ranks:  # once per run, so every rank divides alike
            rows = float(distributed.all_reduce_sum(torch.tensor(rows, device=device)))
        self.divisor = max(rows / world_size, 1.0)

    def backward(self, loss_sum: torch.Tensor) -> None:
        if self.grad_scaler is None:
            loss_sum.backward()
        else:
            self.grad_scaler.scale(loss_sum / (self.divisor or 1.0)).backward()

    def _grad_scale(self, device: torch.device) -> torch.Tensor | None:
        # `scale` multiplies by the GradScaler's scale on the device, where `get_scale` would
        # read it back to the host: a sync.
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return None
        return self.grad_scaler.scale(torch.ones((), dtype=torch.float32, device=device))

    def backward_scale(self, device: torch.device) -> float | torch.Tensor:
        """What the loss sums were multiplied by before backward: 1 outside fp16, else a float64
        tensor on the device (no host read)."""
        divisor = self.divisor or 1.0
        grad_scale = self._grad_scale(device)
        return 1.0 / divisor if grad_scale is None else grad_scale.to(torch.float64) / divisor

    def total_norm(self, gradients: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Total norm of the gradients as `unscale_` leaves them (summed gradients / divisor).

        Taken on the scaled gradients and divided by the scale (a power of two: exact), since
        `unscale_` may run only once per step and the window may still be redone.
        """
        if not gradients:
            return torch.zeros((), device=device)
        norm = torch.nn.utils.get_total_norm(gradients)
        grad_scale = self._grad_scale(device)
        return norm if grad_scale is None else norm / grad_scale.to(norm.device)

    def next_divisor(self, num_items: int, world_size: int) -> float:
        """The divisor this step used; the next step divides by this step's items per rank."""
        used = self.divisor or 1.0
        if self.grad_scaler is not None and num_items > 0:
            self.divisor = num_items / world_size
        return used

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_scaler is None:
            optimizer.step()
        else:
            self.grad_scaler.step(optimizer)

    def update(self, *, back_off: bool = False) -> None:
        """Update the loss scale after a step.

        Args:
            back_off: the gradient was non-finite on some rank: back off here too, whatever this
                rank's own overflow check found (sharded gradients: each rank checks its shard).
        """
        if self.grad_scaler is None:
            return
        if back_off and self.grad_scaler.is_enabled():
            backed_off = self.grad_scaler.get_scale() * self.grad_scaler.get_backoff_factor()
            self.grad_scaler.update(new_scale=backed_off)
        else:
            self.grad_scaler.update()  # reads the overflow found by unscale_: backs off on inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "loss_divisor": self.divisor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.grad_scaler is not None and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        divisor = state.get("loss_divisor")
        self.divisor = None if divisor is None else float(divisor)
