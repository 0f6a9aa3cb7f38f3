"""What a loss function returns, and how the engine reads it.

`loss_fn(model, micro_batch)` returns either ``(loss_sum, num_items)`` -- the sum of the per-item
losses and how many items carry loss -- or a scalar mean over the micro-batch's samples. Both
become one (loss sum, item count) pair here, so the engine normalises once by the true count.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class LossFn(Protocol):
    """Computes the loss of one micro-batch.

    Returns either ``(loss_sum, num_items)`` -- the sum of the per-item losses and how many items
    carry loss (an int or an integer-valued tensor) -- or a scalar mean loss, which counts as the
    mean over the micro-batch's samples (its leading dimension).
    """

    def __call__(
        self, model: torch.nn.Module, micro_batch: Any, /
    ) -> torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]: ...


def read_loss_output(
    output: Any, rows: int, device: torch.device
) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(loss sum to backpropagate, item count) from what loss_fn returned.

    A count known on the host (an int, or the rows of a mean loss) stays a Python number: no
    tensor, no copy to the device. A tensor count becomes a float64 scalar on the device, without
    a host sync; it is validated later, once per step (`invalid_count`).

    Raises:
        TypeError, ValueError: a loss that is not a scalar tensor, or a malformed count.
    """
    if isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise TypeError(
                f"loss_fn must return a scalar mean loss or (loss_sum, num_items), got a "
                f"{type(output).__name__} of length {len(output)}"
            )
        loss_sum, num_items = output
        count = _as_count(num_items, device)
    else:
        _check_scalar(output)
        loss_sum = output * rows  # a mean over samples: weigh by the number of samples
        count = float(rows)
    _check_scalar(loss_sum)
    if loss_sum.dtype in (torch.float16, torch.bfloat16):
        loss_sum = loss_sum.float()  # sums of many items overflow or round badly in half types
    if rows == 0:
        # An empty micro-batch only runs so that this rank joins DDP's sync; a mean over no rows
        # is NaN, and nan_to_num's gradient is zero where its input is not finite.
        loss_sum = torch.nan_to_num(loss_sum * 0.0, nan=0.0, posinf=0.0, neginf=0.0)
    return loss_sum, count


def invalid_count(count: torch.Tensor) -> torch.Tensor:
    """1.0 where a count is negative or not an integer, else 0.0 (on the device, no sync)."""
    return ((count < 0) | (count != torch.round(count))).to(torch.float64)


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor loss, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar loss (or a scalar loss sum), got a tensor of shape "
            f"{tuple(loss.shape)}: reduce it with .sum() and return (loss_sum, num_items)"
        )


def _as_count(num_items: Any, device: torch.device) -> float | torch.Tensor:
    """The item count: an int as a float, a tensor as a float64 scalar on the device (no sync)."""
    if isinstance(num_items, bool) or not isinstance(num_items, (int, torch.Tensor)):
        raise TypeError(
            f"num_items must be an int or an integer tensor, got {type(num_items).__name__}"
        )
    if isinstance(num_items, int):
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        return float(num_items)
    if num_items.numel() != 1:
        raise ValueError(
            f"num_items must hold one value, got a tensor of shape {tuple(num_items.shape)}"
        )
    return num_items.detach().reshape(()).to(device=device, dtype=torch.float64)
