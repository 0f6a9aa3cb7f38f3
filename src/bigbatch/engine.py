"""One exact optimizer step over a window of micro-batches.

`Accumulator.step(window, loss_fn)` runs forward and backward on every micro-batch of this rank's
window, backpropagating *unnormalised* loss sums, and scales the accumulated gradients once, at the
step, by world_size / (number of loss items of the whole window on every rank). The applied
gradient is then the gradient of (sum of every item's loss) / (number of items), exactly as one big
batch would give, whatever the split. Under DistributedDataParallel the gradients are all-reduced
once per step (every micro-step but the last runs under `no_sync`), plus one small all-reduce of
the loss sum and item count. The engine knows nothing of configs, files or the CLI.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from bigbatch import batches, distributed

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


class LossFn(Protocol):
    """Computes the loss of one micro-batch.

    Returns either ``(loss_sum, num_items)`` -- the sum of the per-item losses and how many items
    carry loss (an int or an integer-valued tensor) -- or a scalar mean loss, which counts as the
    mean over the micro-batch's samples (its leading dimension).
    """

    def __call__(
        self, model: torch.nn.Module, micro_batch: Any, /
    ) -> torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]: ...


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did.

    Attributes:
        loss: mean loss per item over the whole window on every rank (NaN when there were none).
        num_items: loss items of the window on every rank.
        grad_norm: total gradient norm before clipping (NaN when the step had no items).
        skipped: True when the optimizer step was not applied.
        skip_reason: why it was skipped, None otherwise.
        micro_batches: micro-batches of this rank's window.
        learning_rate: the learning rate of the first parameter group used for this step.
    """

    loss: float
    num_items: int
    grad_norm: float
    skipped: bool
    skip_reason: str | None
    micro_batches: int
    learning_rate: float


class Accumulator:
    """Applies one exact optimizer step per window of micro-batches, inside anyone's loop.

    Args:
        model: the module, optionally wrapped in DistributedDataParallel by the caller.
        optimizer: any torch optimizer over the model's parameters.
        lr_scheduler: stepped once per applied optimizer step (not per micro-batch).
        max_grad_norm: clip the total gradient norm to this value once per step; None: no clipping.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a GradScaler).
        grad_scaler: a GradScaler to use with fp16 instead of a new one.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> accumulator = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> window = [torch.randn(4, 3), torch.randn(2, 3)]  # uneven micro-batches
        >>> result = accumulator.step(window, lambda m, x: m(x).pow(2).mean())
        >>> result.num_items, result.skipped
        (6, False)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        lr_scheduler: Any = None,
        max_grad_norm: float | None = None,
        precision: Precision = "fp32",
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float))
            and not isinstance(max_grad_norm, bool)
            and max_grad_norm > 0
            and math.isfinite(max_grad_norm)
        ):
            raise ValueError(
                f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}"
            )
        if grad_scaler is not None and precision != "fp16":
            warnings.warn(
                f"grad_scaler has no effect with precision={precision!r}: only fp16 needs loss "
                "scaling",
                stacklevel=2,
            )
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.precision: Precision = precision
        self._is_ddp = distributed.is_ddp(model)
        self._world_size = distributed.get_world_size() if self._is_ddp else 1
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        if not self._parameters:
            raise ValueError("model has no parameter with requires_grad=True: nothing to train")
        self.device = self._parameters[0].device
        # Chosen once: every micro-step but the last skips DDP's gradient all-reduce.
        self._no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = (
            model.no_sync if self._is_ddp else contextlib.nullcontext  # type: ignore[assignment]
        )
        self.grad_scaler: torch.amp.GradScaler | None = None
        if precision == "fp16":
            self.grad_scaler = grad_scaler or torch.amp.GradScaler(self.device.type)
        # fp16 only: loss sums are divided by the previous step's items per rank before backward,
        # so gradients keep the magnitude of a mean (no overflow); the step's one normalisation
        # multiplies it back. The divisor is the same on every rank since the count is all-reduced.
        self._loss_divisor: float | None = None
        # Set after an out-of-memory error: later windows are re-split to at most this size.
        self.max_micro_batch_size: int | None = None

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward(
        self, micro_batch: Any, loss_fn: LossFn, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss sum (what backward runs on) and the item count of one micro-batch."""
        with self._autocast():
            output = loss_fn(self.model, micro_batch)
        if isinstance(output, (tuple, list)):
            if len(output) != 2:
                raise TypeError(
                    f"loss_fn must return a scalar mean loss or (loss_sum, num_items), got a "
                    f"{type(output).__name__} of length {len(output)}"
                )
            loss_sum, num_items = output
            count = _as_count(num_items, self.device)
        else:
            _check_scalar(output)
            loss_sum = output * rows  # a mean over samples: weigh by the number of samples
            count = torch.tensor(float(rows), dtype=torch.float64, device=self.device)
        _check_scalar(loss_sum)
        if loss_sum.dtype in (torch.float16, torch.bfloat16):
            loss_sum = loss_sum.float()  # sums of many items overflow or round badly in half types
        if rows == 0:
            # An empty micro-batch only runs so that this rank joins DDP's sync; a mean over no
            # rows is NaN, and nan_to_num's gradient is zero where its input is not finite.
            loss_sum = torch.nan_to_num(loss_sum * 0.0, nan=0.0, posinf=0.0, neginf=0.0)
        return loss_sum, count

    def _backward(self, loss_sum: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            assert self._loss_divisor is not None
            self.grad_scaler.scale(loss_sum / self._loss_divisor).backward()
        else:
            loss_sum.backward()

    def _accumulate(self, micro_batches: list[Any], loss_fn: LossFn) -> torch.Tensor:
        """Forward and backward over the window: local [loss sum, items, invalid, out of memory].

        Out-of-memory is caught per micro-step and flagged instead of raised, so that under DDP this
        rank still joins the one gradient sync (with an empty micro-batch) and no rank hangs.
        """
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        last = len(micro_batches) - 1
        for index, micro_batch in enumerate(micro_batches):
            rows = batches.num_rows(micro_batch)
            if rows == 0 and not (self._is_ddp and index == last):
                continue
            in_backward = False
            try:
                with self._no_sync() if index < last else contextlib.nullcontext():
                    loss_sum, count = self._forward(micro_batch, loss_fn, rows)
                    in_backward = True
                    self._backward(loss_sum)
            except torch.OutOfMemoryError:
                if self._is_ddp and index == last and in_backward:
                    raise _oom_during_sync(rows) from None
                totals[3] = 1.0
                break
            totals[0] += loss_sum.detach().to(torch.float64)
            totals[1] += count
            totals[2] += ((count < 0) | (count != torch.round(count))).to(torch.float64)
        if totals[3] and self._is_ddp:  # outside the except block, so the failed graph is freed
            self.model.zero_grad(set_to_none=True)
            empty = batches.narrow(micro_batches[0], 0, 0)
            self._backward(self._forward(empty, loss_fn, 0)[0])  # still join the one sync
        return totals

    def step(self, window: Iterable[Any], loss_fn: LossFn) -> StepResult:
        """Run forward/backward on every micro-batch of the window and apply one optimizer step.

        On `torch.OutOfMemoryError` the window's partial gradients are discarded and the same
        items are redone in micro-batches of half the size, which is kept for later steps.

        Args:
            window: this rank's micro-batches for one optimizer step (tensors or tuples, lists or
                dicts of tensors).
            loss_fn: ``loss_fn(model, micro_batch)``, see `LossFn`.
        """
        micro_batches = list(window)
        if not micro_batches:
            raise ValueError(
                "window is empty: pass this rank's micro-batches for one optimizer step"
            )
        self.model.zero_grad(set_to_none=True)
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        if self.grad_scaler is not None and self._loss_divisor is None:
            self._loss_divisor = self._first_loss_divisor(micro_batches)
        while True:
            if self.max_micro_batch_size is not None:
                micro_batches = _resplit(micro_batches, self.max_micro_batch_size)
            totals = self._accumulate(micro_batches, loss_fn)
            if self._is_ddp:
                distributed.all_reduce_sum(totals)  # the one small collective of the step
            loss_total, num_items_float, invalid, out_of_memory = totals.tolist()
            if not out_of_memory:
                break
            self._shrink_after_out_of_memory(micro_batches)
        if invalid:
            self.model.zero_grad(set_to_none=True)
            raise ValueError("loss_fn returned a negative or non-integer num_items")
        num_items = int(num_items_float)
        loss_divisor = self._loss_divisor or 1.0
        if self.grad_scaler is not None and num_items > 0:
            self._loss_divisor = num_items / self._world_size
        if num_items == 0:
            warnings.warn(
                "the window holds no loss items on any rank: optimizer step skipped", stacklevel=2
            )
            return self._finish(
                math.nan, 0, math.nan, "no loss items", len(micro_batches), learning_rate
            )
        return self._apply(
            loss_total / num_items, num_items, loss_divisor, len(micro_batches), learning_rate
        )

    def _shrink_after_out_of_memory(self, micro_batches: list[Any]) -> None:
        """Free the failed window and halve the micro-batch size, the same on every rank."""
        self.model.zero_grad(set_to_none=True)
        largest = torch.tensor(
            [float(max(batches.num_rows(micro_batch) for micro_batch in micro_batches))],
            device=self.device,
        )
        if self._is_ddp:
            distributed.all_reduce_max(largest)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        largest_rows = int(largest.item())
        if largest_rows <= 1:
            raise torch.OutOfMemoryError(
                "out of memory at micro_batch_size 1: a single sample does not fit. Use precision "
                "bf16, a shorter sequence or a smaller model, or a device with more memory"
            )
        self.max_micro_batch_size = (largest_rows + 1) // 2
        logger.warning(
            "out of memory with micro-batches of %d: redoing the window with micro_batch_size %d "
            "(kept for later steps)",
            largest_rows,
            self.max_micro_batch_size,
        )

    def _first_loss_divisor(self, micro_batches: list[Any]) -> float:
        """Samples per rank of the first window: a stand-in for items until a step has counted."""
        rows = torch.tensor(
            [float(sum(batches.num_rows(micro_batch) for micro_batch in micro_batches))],
            dtype=torch.float64,
            device=self.device,
        )
        if self._is_ddp:
            distributed.all_reduce_sum(rows)  # once per run, so every rank divides alike
        return max(float(rows) / self._world_size, 1.0)

    def _apply(
        self,
        loss: float,
        num_items: int,
        loss_divisor: float,
        micro_batches: int,
        learning_rate: float,
    ) -> StepResult:
        """Normalise, unscale, clip and apply the accumulated gradients: once per step."""
        gradients = [p.grad for p in self._parameters if p.grad is not None]
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        # The one normalisation: DDP averaged over ranks, so world_size / global items turns the
        # summed per-item gradients into their mean over the whole global batch.
        scale = self._world_size * loss_divisor / num_items
        if gradients:
            torch._foreach_mul_(gradients, scale)
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._parameters, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())
        grad_norm = float(norm)
        skip_reason = None
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):
            skip_reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
        if skip_reason is None:
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.grad_scaler is not None:
            self.grad_scaler.update()  # reads the overflow found by unscale_: backs off on inf
        if skip_reason is None and self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return self._finish(loss, num_items, grad_norm, skip_reason, micro_batches, learning_rate)

    def _finish(
        self,
        loss: float,
        num_items: int,
        grad_norm: float,
        skip_reason: str | None,
        micro_batches: int,
        learning_rate: float,
    ) -> StepResult:
        self.model.zero_grad(set_to_none=True)
        if skip_reason is not None:
            logger.warning("optimizer step skipped: %s", skip_reason)
        return StepResult(
            loss=loss,
            num_items=num_items,
            grad_norm=grad_norm,
            skipped=skip_reason is not None,
            skip_reason=skip_reason,
            micro_batches=micro_batches,
            learning_rate=learning_rate,
        )

    def state_dict(self) -> dict[str, Any]:
        """The engine's own state (the GradScaler's), for checkpoints."""
        return {
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "loss_divisor": self._loss_divisor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if self.grad_scaler is not None and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        divisor = state.get("loss_divisor")
        self._loss_divisor = None if divisor is None else float(divisor)


def _resplit(micro_batches: list[Any], max_rows: int) -> list[Any]:
    """The same items in the same order, in micro-batches of at most max_rows rows."""
    if all(batches.num_rows(micro_batch) <= max_rows for micro_batch in micro_batches):
        return micro_batches
    return [
        piece for micro_batch in micro_batches for piece in batches.chunk(micro_batch, max_rows)
    ]


def _oom_during_sync(rows: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"out of memory in the backward that synchronises gradients (DDP, micro-batch of {rows}): "
        "the other ranks are already in the all-reduce, so the window cannot be redone. Set a "
        "smaller micro_batch_size (or micro_batch_size: auto with a memory_budget)"
    )


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor loss, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar loss (or a scalar loss sum), got a tensor of shape "
            f"{tuple(loss.shape)}: reduce it with .sum() and return (loss_sum, num_items)"
        )


def _as_count(num_items: Any, device: torch.device) -> torch.Tensor:
    """The item count as a float64 tensor on the device, without a host sync."""
    if isinstance(num_items, bool) or not isinstance(num_items, (int, torch.Tensor)):
        raise TypeError(
            f"num_items must be an int or an integer tensor, got {type(num_items).__name__}"
        )
    if isinstance(num_items, int):
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        return torch.tensor(float(num_items), dtype=torch.float64, device=device)
    if num_items.numel() != 1:
        raise ValueError(
            f"num_items must hold one value, got a tensor of shape {tuple(num_items.shape)}"
        )
    return num_items.detach().reshape(()).to(device=device, dtype=torch.float64)
