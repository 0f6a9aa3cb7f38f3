"""The exact step on what `accelerator.prepare` returned: model, optimizer and dataloader.

Accelerate's own `accumulate` divides each micro-batch's mean loss by the number of micro-batches;
`AcceleratedAccumulator.step(batch, loss_fn)` replaces that loop. Each batch of the prepared
dataloader is this rank's share of one global batch; it is cut into micro-batches (the same
count on every rank) and `bigbatch.Accumulator` applies one exact optimizer step: one gradient
sync through the prepared DDP model, the gradients normalised by the global item count.
Accelerate's mixed precision carries over (bf16 autocast; fp16 autocast with Accelerate's
GradScaler), and under DDP the ranks compare a parameter checksum after the first step and every
N steps (`bigbatch.core.divergence`).
"""

from __future__ import annotations

from typing import Any

import torch

from bigbatch.choices import Precision
from bigbatch.core import distributed
from bigbatch.core.divergence import DivergenceCheck
from bigbatch.core.engine import Accumulator, StepResult
from bigbatch.core.loss import LossFn
from bigbatch.integrations.window import rank_window

__all__ = ["AcceleratedAccumulator"]

_SUPPORTED = "a single process or DDP (MULTI_CPU, MULTI_GPU and the like)"


class AcceleratedAccumulator:
    """One exact optimizer step per batch of an Accelerate-prepared dataloader.

    Args:
        accelerator: the `accelerate.Accelerator`, created with gradient_accumulation_steps=1
            (bigbatch does the accumulation).
        model: the model `accelerator.prepare` returned (DDP-wrapped under several processes).
        optimizer: the optimizer `accelerator.prepare` returned (or the plain one): bigbatch
            steps the optimizer inside it, once per window.
        micro_batch_size: the largest micro-batch one forward runs; None runs each rank's batch
            as one micro-batch.
        lr_scheduler: stepped once per applied optimizer step (a prepared one steps as
            Accelerate steps it).
        max_grad_norm: clip the total gradient norm once per step; None: no clipping.
        divergence_every_n_steps: under DDP, compare the ranks' parameters after the first step
            and every n steps (one small all-reduce then); None: never.
        **options: further `bigbatch.Accumulator` keywords (batchnorm, measure_noise_scale).

    Example (docs/integrations.md has it whole, and a test runs it)::

        model, optimizer, loader = accelerator.prepare(
            model, optimizer, loader)
        accumulator = AcceleratedAccumulator(
            accelerator, model, optimizer, micro_batch_size=8)
        for batch in loader:  # a rank's share of one global batch
            result = accumulator.step(batch, causal_lm_loss)
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch_size: int | None = None,
        lr_scheduler: Any = None,
        max_grad_norm: float | None = None,
        divergence_every_n_steps: int | None = 100,
        **options: Any,
    ) -> None:
        _check_accelerator(accelerator, model)
        precision = accelerator_precision(accelerator)
        self.accelerator = accelerator
        self.micro_batch_size = micro_batch_size
        # AcceleratedOptimizer.step would skip or scale on Accelerate's own schedule; bigbatch
        # steps the optimizer it wraps, once per window.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.accumulator = Accumulator(
            model,
            inner,
            lr_scheduler=lr_scheduler,
            max_grad_norm=max_grad_norm,
            precision=precision,
            grad_scaler=accelerator.scaler if precision == "fp16" else None,
            **options,
        )
        self._is_ddp = distributed.is_ddp(model)
        self.divergence = (
            DivergenceCheck(model.parameters(), every_n_steps=divergence_every_n_steps)
            if self._is_ddp and divergence_every_n_steps is not None
            else None
        )
        self.steps_done = 0

    def step(self, batch: Any, loss_fn: LossFn) -> StepResult:
        """Apply one exact optimizer step over this rank's share of one global batch.

        Every rank must call it once per global batch; the window length is agreed over ranks.

        Raises:
            RankDivergenceError: the ranks' parameters differ after a compared step.
        """
        window = rank_window(batch, self.micro_batch_size, agree_over_ranks=self._is_ddp)
        result = self.accumulator.step(window, loss_fn)
        self.steps_done += 1
        if self.divergence is not None:
            self.divergence.compare(self.steps_done)
        return result

    def state_dict(self) -> dict[str, Any]:
        """The engine's state (GradScaler, loss divisor, split) and the step count: checkpoints."""
        return {"accumulator": self.accumulator.state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.accumulator.load_state_dict(state["accumulator"])
        self.steps_done = int(state["steps_done"])


def accelerator_precision(accelerator: Any) -> Precision:
    """bigbatch's precision for an Accelerator: its mixed precision where it is active.

    Accelerate turns fp16 into no mixed precision where it has no GradScaler (on CPU); so does
    this. fp8 is refused.
    """
    mixed = str(accelerator.mixed_precision)
    if mixed == "no" or not getattr(accelerator, "native_amp", False):
        return "fp32"
    if mixed == "bf16":
        return "bf16"
    if mixed == "fp16" and accelerator.scaler is not None:
        return "fp16"
    if mixed == "fp16":
        return "fp32"
    raise ValueError(
        f"Accelerator(mixed_precision={mixed!r}) is not supported by bigbatch: use 'no', 'bf16' "
        "or 'fp16'"
    )


def _check_accelerator(accelerator: Any, model: torch.nn.Module) -> None:
    steps = int(getattr(accelerator, "gradient_accumulation_steps", 1))
    if steps != 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={steps}) would make the prepared optimizer "
            "skip steps: bigbatch does the accumulation. Create the Accelerator with "
            "gradient_accumulation_steps=1 and give each dataloader batch this rank's share of "
            "the global batch"
        )
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind != "NO" and not kind.startswith("MULTI_"):
        raise ValueError(
            f"distributed_type {kind} is not supported by bigbatch's Accelerate integration: "
            f"use {_SUPPORTED}"
        )
    if accelerator.num_processes > 1 and not distributed.is_ddp(model):
        raise ValueError(
            f"{accelerator.num_processes} processes but the model is not wrapped in "
            "DistributedDataParallel: pass the model that accelerator.prepare returned"
        )
