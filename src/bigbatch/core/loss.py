"""What a loss function returns, and how the engine reads it.

`loss_fn(model, micro_batch)` returns either ``(loss_sum, num_items)`` -- the sum of the per-item
losses and how many items carry loss -- or a scalar mean over the micro-batch's samples. Both
become one (loss sum, item count) pair here, so the engine normalises once by the true count.
`MeanLossCheck` warns when a scalar mean hides ignored tokens (a Hugging Face model's `.loss`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100
"""The label that carries no loss: PyTorch's cross_entropy default and Hugging Face's convention."""


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


class MeanLossCheck:
    """Warns once when loss_fn returns a scalar mean for a micro-batch whose labels ignore items.

    A scalar mean is counted as the mean over the micro-batch's samples. When the micro-batch's
    ``labels`` are token-level (two or more dimensions) and hold ignored (-100) entries, the
    mean was taken over a number of tokens that varies from micro-batch to micro-batch (what a
    Hugging Face model's ``.loss`` is), and weighing it by samples is the textbook accumulation
    error. Sample-level labels (shape ``[rows]``, e.g. classification) are never flagged.

    Reading the labels is a host sync for labels on an accelerator, so at most ``max_checks``
    micro-batches are examined; labels on the CPU are always examined until the warning fires.

    The engine calls it with each micro-batch's loss_fn output, right after loss_fn.

    Args:
        max_checks: micro-batches with accelerator labels to examine before giving up.

    Example:
        >>> check = MeanLossCheck()
        >>> labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     check(torch.tensor(1.5), {"labels": labels})
        ...     check(torch.tensor(1.5), {"labels": labels})
        >>> len(caught)
        1
    """

    def __init__(self, max_checks: int = 32) -> None:
        self.max_checks = max_checks
        self.warned = False
        self._device_checks = 0

    def __call__(self, output: Any, micro_batch: Any) -> None:
        """Look at one micro-batch's loss_fn output and labels; warn the first time it is wrong."""
        if self.warned or isinstance(output, (tuple, list)):
            return
        labels = micro_batch.get("labels") if isinstance(micro_batch, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.is_floating_point():
            return
        if labels.device.type != "cpu":
            if self._device_checks >= self.max_checks:
                return
            self._device_checks += 1
        if not bool((labels == IGNORE_INDEX).any()):
            return
        self.warned = True
        warnings.warn(
            "loss_fn returned a scalar mean loss for a micro-batch whose labels hold ignored "
            f"({IGNORE_INDEX}) entries: a mean is weighed by the micro-batch's samples, so "
            "micro-batches with different numbers of loss tokens are weighed wrongly (the "
            "textbook accumulation error). Return (loss_sum, num_items) instead, e.g. "
            "loss_fn=bigbatch.integrations.huggingface.causal_lm_loss (or masked_lm_loss) for a "
            "Hugging Face model",
            UserWarning,
            stacklevel=6,  # the caller of step (step, _run_window, _accumulate, _micro_step)
        )
