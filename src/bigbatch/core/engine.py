"""One exact optimizer step per window: run the window, reduce, scale, apply (invariant 1).

`Accumulator.step` backpropagates every micro-batch's *unnormalised* loss sum, sums the window's
totals over ranks in one small all-reduce read once with the gradient norm, and scales the
gradients once by gradient_ranks / (items on every rank) before one optimizer step. What depends
on the replication (one process, DDP, FSDP2) is asked of the `replication` strategy chosen once.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.choices import AccumulationDtype, GradientSync, Precision
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core import recovery, replication
from bigbatch.core.accumulation import WindowGradients
from bigbatch.core.loss import LossFn
from bigbatch.core.microsteps import MicroSteps
from bigbatch.core.noise import NoiseScale
from bigbatch.core.precision import LossScaling
from bigbatch.core.statistics import StepStatistics
from bigbatch.core.window import WindowRead, local_totals, reduce_and_read

logger = logging.getLogger(__name__)

__all__ = ["Accumulator", "LossFn", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did.

    Attributes:
        loss: mean loss per item over the whole window on every rank (NaN when there were none).
        num_items: loss items of the window on every rank.
        grad_norm: total gradient norm before clipping (NaN when the step had no items).
        skipped: True when the optimizer step was not applied.
        skip_reason: why it was skipped, None otherwise.
        micro_batches: micro-batches this rank ran (more than given after an out-of-memory split).
        learning_rate: the learning rate of the first parameter group used for this step.
        noise_scale: the smoothed gradient noise scale when measured, else None.
    """

    loss: float
    num_items: int
    grad_norm: float
    skipped: bool
    skip_reason: str | None
    micro_batches: int
    learning_rate: float
    noise_scale: NoiseScale | None = None


class Accumulator:
    """Applies one exact optimizer step per window of micro-batches, inside anyone's loop.

    Args:
        model: the module, optionally wrapped in DistributedDataParallel or sharded with FSDP2's
            ``fully_shard`` (its blocks and its root) by the caller.
        optimizer: any torch optimizer over the model's parameters.
        lr_scheduler: stepped once per applied optimizer step (not per micro-batch).
        max_grad_norm: clip the total gradient norm to this value once per step; None: no clipping.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a GradScaler).
        grad_scaler: a GradScaler to use with fp16 instead of a new one.
        batchnorm: ``"keep"`` (warn once when BatchNorm meets micro-batches below 16),
            ``"freeze"`` (running statistics, affine parameters train) or ``"window"`` (running
            statistics updated once per step from the inputs each BatchNorm saw in the window:
            one full-batch forward's update for a BatchNorm with no train-mode BatchNorm before
            it, the pooled statistics of its per-micro-batch-normalised inputs behind one). For
            ``"sync"`` and ``"groupnorm"`` call `bigbatch.core.batchnorm.apply_policy` before
            wrapping the model in DDP and building the optimizer.
        measure_noise_scale: estimate the gradient noise scale (critical batch size) every step.
        noise_smoothing_steps: the estimate's moving-average window, in steps.
        gradient_sync: ``"step_end"`` (one gradient collective per step: DDP's ``no_sync`` or
            FSDP's ``set_requires_gradient_sync(False)`` on every micro-step but the last; FSDP
            then holds an unsharded gradient per rank), ``"every_micro_batch"`` (a gradient
            collective in every backward: FSDP keeps only sharded gradients) or ``"auto"``
            (step_end when the unsharded gradient fits ``memory_budget_bytes``; the trainer's
            memory probe instead compares both modes per rank, `bigbatch.tools.rank_memory`).
        memory_budget_bytes: the memory ``gradient_sync="auto"`` may give the unsharded gradient;
            None: the device's free memory on CUDA, assumed to fit elsewhere.
        accumulation_dtype: ``"fp32"`` adds each micro-batch's gradient into a float32 buffer
            (4 bytes per trained parameter while a step runs) and rounds it to the parameter dtype
            once per step; ``"param"`` accumulates in ``.grad``; ``"auto"``: fp32 for bf16 or fp16
            parameters (not under FSDP: use ``MixedPrecisionPolicy(reduce_dtype=torch.float32)``).
        check_ranks_every: under DDP, compare a checksum of the parameters over the ranks after
            the first step and every this many steps, inside the step's one small all-reduce,
            and raise `bigbatch.core.divergence.RankDivergenceError` when ranks differ (a sync
            was skipped somewhere); None: never.

    The noise scale, ``batchnorm="window"`` and ``batchnorm="freeze"`` put hooks on the model;
    `close` removes them.

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
        batchnorm: str = "keep",
        measure_noise_scale: bool = False,
        noise_smoothing_steps: int = 200,
        gradient_sync: GradientSync = "auto",
        memory_budget_bytes: int | None = None,
        accumulation_dtype: AccumulationDtype = "auto",
        check_ranks_every: int | None = 100,
    ) -> None:
        _check_arguments(model, optimizer, max_grad_norm, batchnorm)
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.precision: Precision = precision
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        if not self._parameters:
            raise ValueError("model has no parameter with requires_grad=True: nothing to train")
        self.device = self._parameters[0].device
        # Local, DDP or FSDP2: every question whose answer depends on the mode goes to it.
        self._replication = replication.choose(
            model,
            self._parameters,
            gradient_sync=gradient_sync,
            memory_budget_bytes=memory_budget_bytes,
            accumulation_dtype=accumulation_dtype,
        )
        self.gradient_sync = self._replication.gradient_sync
        self.accumulation_dtype = self._replication.accumulation_dtype
        self._gradients = WindowGradients(self._parameters, self._replication)
        self._scaling = LossScaling(precision, self.device.type, grad_scaler)
        self.grad_scaler = self._scaling.grad_scaler
        # Set after an out-of-memory error: later windows are re-split to at most this size.
        self.max_micro_batch_size: int | None = None
        self.batchnorm = batchnorm
        self._statistics = StepStatistics(
            model,
            self._parameters,
            batchnorm=batchnorm,
            noise_smoothing_steps=noise_smoothing_steps if measure_noise_scale else None,
            check_ranks_every=check_ranks_every if self._replication.checks_divergence else None,
        )
        self._micro_steps = MicroSteps(model, self._replication, precision, self.device)
        self._closed = False

    def step(self, window: Iterable[Any], loss_fn: LossFn) -> StepResult:
        """Run forward/backward on every micro-batch of the window and apply one optimizer step.

        On `torch.OutOfMemoryError` the window's partial gradients are discarded and the same
        items are redone in micro-batches of half the size, which is kept for later steps.

        Args:
            window: this rank's micro-batches for one optimizer step (tensors or tuples, lists or
                dicts of tensors).
            loss_fn: ``loss_fn(model, micro_batch)``, see `LossFn`.
        """
        if self._closed:
            raise RuntimeError("step() after close(): the hooks are gone; build a new Accumulator")
        micro_batches = list(window)
        if not micro_batches:
            raise ValueError(
                "window is empty: pass this rank's micro-batches for one optimizer step"
            )
        self._statistics.warn_about_batchnorm_once(micro_batches)
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        over_ranks, world_size = self._replication.spans_ranks, self._replication.world_size
        self._scaling.start(
            micro_batches, self.device, over_ranks=over_ranks, world_size=world_size
        )
        self._gradients.clear()  # gradients left by code run between steps must not count
        try:
            micro_batches, read = self._run_window(micro_batches, loss_fn)  # window and reduce
            loss, num_items, grad_norm, skip_reason = self._scale_and_apply(read)
        except BaseException:
            self._statistics.abort_window()  # e.g. loss_fn raised: rewind what the window changed
            raise
        finally:
            self._gradients.clear()  # on every way out: no gradient memory held between steps
        if skip_reason is not None:
            logger.warning("optimizer step skipped: %s", skip_reason)
        return StepResult(
            loss=loss,
            num_items=num_items,
            grad_norm=grad_norm,
            skipped=skip_reason is not None,
            skip_reason=skip_reason,
            micro_batches=len(micro_batches),
            learning_rate=learning_rate,
            noise_scale=self.noise_scale(),
        )

    def _run_window(
        self, micro_batches: list[Any], loss_fn: LossFn
    ) -> tuple[list[Any], WindowRead]:
        """Forward and backward over the window, then its reduction and read; redone in smaller
        micro-batches until it fits in memory."""
        while True:
            if self.max_micro_batch_size is not None:
                micro_batches = recovery.resplit(micro_batches, self.max_micro_batch_size)
            self._statistics.begin_window()  # also rewinds a window that ran out of memory
            # self._backward is looked up per window: a wrapper set on the instance sees it all.
            window = self._micro_steps.run(
                micro_batches, loss_fn, self._backward, self._gradients.clear
            )
            self._gradients.after_window()
            # Alone, this rank knows it ran out of memory without a collective or a read; over
            # ranks the all-reduce tells every rank whether any did, so all redo the window alike.
            if not window.out_of_memory or self._replication.spans_ranks:
                read = self._reduce(local_totals(*window, device=self.device))
                if not read.totals.num_out_of_memory:
                    return micro_batches, read
            self._gradients.clear()
            self.max_micro_batch_size = recovery.halved_micro_batch_size(
                micro_batches, self.device, agree_over_ranks=self._replication.spans_ranks
            )

    def _backward(self, loss_sum: torch.Tensor, count: float | torch.Tensor) -> None:
        self._statistics.begin_micro_step()
        self._scaling.backward(loss_sum)
        self._gradients.after_backward()
        self._statistics.end_micro_step(count)

    def _reduce(self, totals: torch.Tensor) -> WindowRead:
        # After the last backward, hence after DDP's gradient sync: the same norm on every rank,
        # read with the totals. Sharded, each rank has the norm of its shards: their squares
        # are summed over ranks in the same all-reduce.
        return reduce_and_read(
            totals,
            self._statistics.items,
            self._scaling.total_norm(self._gradients.tensors(), self.device),
            backward_scale=(
                self._scaling.backward_scale(self.device) if self._statistics.items else 1.0
            ),
            over_ranks=self._replication.spans_ranks,
            sharded_norm=self._replication.sharded,
        )

    def _scale_and_apply(self, read: WindowRead) -> tuple[float, int, float, str | None]:
        """Normalise, clip, unscale and apply the window's gradients, once per step: the loss,
        the items, the gradient norm before clipping and why the step was skipped (or None).

        ``scale`` is the one normalisation: gradient_ranks undoes an average over ranks (DDP's),
        the fp16 loss divisor undoes the division before backward, and 1 / global items makes
        the summed per-item gradients their mean over the whole global batch. It is folded with
        the clipping into one pass over the gradients; the norm was read with the totals.
        """
        if read.totals.num_invalid_counts:
            raise ValueError("loss_fn returned a negative or non-integer num_items")
        num_items = int(read.totals.num_items)
        loss_divisor = self._scaling.next_divisor(num_items, self._replication.world_size)
        if num_items == 0:
            warnings.warn("the window holds no loss items on any rank: step skipped", stacklevel=3)
            self._statistics.abort_window()
            return math.nan, num_items, math.nan, "no loss items"
        loss = read.totals.loss_sum / num_items
        # Invariant 1: the applied gradient is sum(per-item loss gradients) / items on every rank.
        scale = self._replication.gradient_ranks * loss_divisor / num_items
        grad_norm = read.grad_norm * scale
        if self.max_grad_norm is not None and math.isfinite(grad_norm):
            scale *= min(1.0, self.max_grad_norm / (grad_norm + 1e-6))  # torch's clip coefficient
        gradients = self._gradients.tensors()
        if gradients and math.isfinite(grad_norm):
            torch._foreach_mul_(gradients, scale)
        self._gradients.round_to_parameters()  # fp32 buffer: the one rounding to the param dtype
        self._scaling.unscale_(self.optimizer)
        skip_reason = None
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):
            skip_reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
        if skip_reason is None:
            self._scaling.step(self.optimizer)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        # Sharded: a rank may hold only finite shards of a non-finite gradient; back off alike.
        self._scaling.update(back_off=self._replication.sharded and not math.isfinite(grad_norm))
        if skip_reason is None:
            self._statistics.end_window(read.sums, num_items=num_items, grad_norm=grad_norm)
        else:
            self._statistics.abort_window()
        return loss, num_items, grad_norm, skip_reason

    def noise_scale(self) -> NoiseScale | None:
        """The current smoothed noise scale, or None when it is not measured."""
        noise = self._statistics.noise
        return None if noise is None else noise.current()

    def close(self) -> None:
        """Remove every hook this accumulator put on the model; idempotent.

        The hooks are the noise scale's gradient hooks, the ``batchnorm="window"`` recording
        hooks (an open window is rewound first) and the ``batchnorm="freeze"`` hooks (the layers
        stay in eval mode until the next ``model.train()``). Afterwards the model trains with plain
        autograd and `step` raises: build a new Accumulator to continue.
        """
        self._statistics.remove()
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """The engine's own state (GradScaler, loss divisor, split, noise estimate): checkpoints."""
        noise = self._statistics.noise
        return {
            **self._scaling.state_dict(),
            "max_micro_batch_size": self.max_micro_batch_size,
            "noise_scale": None if noise is None else noise.estimator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._scaling.load_state_dict(state)
        limit = state.get("max_micro_batch_size")
        self.max_micro_batch_size = None if limit is None else int(limit)
        if self._statistics.noise is not None and state.get("noise_scale"):
            self._statistics.noise.estimator.load_state_dict(state["noise_scale"])


def _check_arguments(model: Any, optimizer: Any, max_grad_norm: Any, batchnorm: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not 0 < max_grad_norm < math.inf
    ):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    batchnorm_policies.check_engine_policy(batchnorm)
