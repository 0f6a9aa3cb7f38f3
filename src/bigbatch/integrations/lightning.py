"""A LightningModule mixin: every training batch is one exact optimizer step, exact under DDP.

Lightning's `accumulate_grad_batches` divides each micro-batch's mean loss by the number of
micro-batches. `AccumulatorMixin` turns on manual optimization and runs `bigbatch.Accumulator`
over each training batch (this rank's share of one global batch), cut into micro-batches. Under
the DDP strategies the accumulator holds Lightning's DDP wrapper, so every micro-step but the last
runs under `no_sync`, and before the last backward the strategy prepares DDP's gradient sync as
`manual_backward` would: the loss is computed through the module itself, not the wrapper, and
without that the ranks would silently diverge. The ranks also compare a parameter checksum after
the first step and every N steps. Nothing of Lightning is imported here: the mixin works with
`lightning.pytorch` and `pytorch_lightning` alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bigbatch.choices import Precision
from bigbatch.core import distributed
from bigbatch.core.divergence import DivergenceCheck
from bigbatch.core.engine import Accumulator, StepResult
from bigbatch.integrations.window import rank_window

__all__ = ["AccumulatorMixin"]

# Lightning precisions the mixin accepts, and bigbatch's for each ("16-mixed" is refused below).
_PRECISIONS: dict[str, Precision] = {
    "32-true": "fp32",
    "32": "fp32",
    "64-true": "fp32",
    "64": "fp32",
    "bf16-mixed": "bf16",
    "bf16-true": "fp32",
    "16-true": "fp32",
}


class AccumulatorMixin:
    """Mix into a LightningModule (first in the bases) for exact accumulation.

    Define `micro_batch_loss(micro_batch)` returning ``(loss_sum, num_items)`` (or a scalar mean
    over samples) and `configure_optimizers` with one optimizer (and optionally one scheduler,
    stepped once per optimizer step); do not define `training_step`. Each batch of the training
    dataloader is this rank's share of one global batch.

    Class attributes (override in the subclass):
        micro_batch_size: the largest micro-batch one forward runs; None: the whole batch.
        max_grad_norm: clip the total gradient norm once per step; None: no clipping.
        bigbatch_precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (bigbatch's own autocast and
            GradScaler); keep the Trainer at precision "32-true".
        divergence_every_n_steps: compare the ranks' parameters after the first step and every
            n steps; None: never.

    Example (docs/integrations.md has it whole, and a test runs it)::

        class Module(AccumulatorMixin, L.LightningModule):
            micro_batch_size = 8
            def micro_batch_loss(self, micro_batch):
                return causal_lm_loss(self.model, micro_batch)
    """

    micro_batch_size: int | None = None
    max_grad_norm: float | None = None
    bigbatch_precision: Precision = "fp32"
    divergence_every_n_steps: int | None = 100
    # Built at the first step (the trainer wraps the module only then).
    _bigbatch_accumulator_object: Accumulator | None = None
    _bigbatch_divergence: DivergenceCheck | None = None
    _bigbatch_pending_state: dict[str, Any] | None = None

    @property
    def automatic_optimization(self) -> bool:
        """Always False: bigbatch steps the optimizer."""
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(
                "AccumulatorMixin uses manual optimization: bigbatch steps the optimizer"
            )

    def micro_batch_loss(self, micro_batch: Any) -> Any:
        """The loss of one micro-batch: ``(loss_sum, num_items)`` or a scalar mean over samples."""
        raise NotImplementedError(
            f"{type(self).__name__} must define micro_batch_loss(micro_batch)"
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """One exact optimizer step over this rank's batch; returns the step's mean loss."""
        accumulator = self._bigbatch_accumulator()
        is_ddp = distributed.is_ddp(accumulator.model)
        window = rank_window(batch, self.micro_batch_size, agree_over_ranks=is_ddp)
        result: StepResult = accumulator.step(window, self._bigbatch_loss)
        if self._bigbatch_divergence is not None:
            self._bigbatch_divergence.compare(int(self.trainer.global_step))  # type: ignore[attr-defined]
        self.log("loss", result.loss, prog_bar=True, batch_size=max(result.num_items, 1))  # type: ignore[attr-defined]
        return torch.tensor(result.loss)

    def _bigbatch_loss(self, model: torch.nn.Module, micro_batch: Any) -> Any:
        """The user's loss, and on the window's last micro-step DDP's sync prepared for backward."""
        output = self.micro_batch_loss(micro_batch)
        if (
            distributed.is_ddp(model)
            and model.require_backward_grad_sync
            and torch.is_grad_enabled()
        ):
            # The forward ran through this module, not the DDP wrapper, so DDP has not armed its
            # gradient hooks; the strategy does it as in manual_backward, and the backward that
            # follows is the window's one gradient all-reduce.
            loss = output[0] if isinstance(output, (tuple, list)) else output
            self.trainer.strategy.pre_backward(loss)  # type: ignore[attr-defined]
        return output

    def _bigbatch_accumulator(self) -> Accumulator:
        """The Accumulator, built at the first step, once the trainer has wrapped the module."""
        if self._bigbatch_accumulator_object is not None:
            return self._bigbatch_accumulator_object
        trainer = self.trainer  # type: ignore[attr-defined]
        precision = _precision(str(trainer.precision), self.bigbatch_precision)
        optimizer = self.optimizers()  # type: ignore[attr-defined]
        if isinstance(optimizer, list):
            raise ValueError(
                "AccumulatorMixin steps one optimizer, configure_optimizers returned "
                f"{len(optimizer)}"
            )
        schedulers = self.lr_schedulers()  # type: ignore[attr-defined]
        if isinstance(schedulers, list):
            raise ValueError(
                "AccumulatorMixin steps one scheduler, configure_optimizers returned "
                f"{len(schedulers)}"
            )
        # The strategy's model is the DDP wrapper under the DDP strategies: no_sync and the
        # global item count come from it. Lightning's optimizer wrapper counts the step.
        wrapped = trainer.strategy.model
        accumulator = Accumulator(
            wrapped,
            optimizer,
            lr_scheduler=schedulers,
            max_grad_norm=self.max_grad_norm,
            precision=precision,
        )
        if self._bigbatch_pending_state is not None:
            accumulator.load_state_dict(self._bigbatch_pending_state)
            self._bigbatch_pending_state = None
        self._bigbatch_accumulator_object = accumulator
        if distributed.is_ddp(wrapped) and self.divergence_every_n_steps is not None:
            self._bigbatch_divergence = DivergenceCheck(
                wrapped.parameters(), every_n_steps=self.divergence_every_n_steps
            )
        return accumulator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the engine's state (GradScaler, loss divisor, split) in Lightning's checkpoint."""
        if self._bigbatch_accumulator_object is not None:
            checkpoint["bigbatch"] = self._bigbatch_accumulator_object.state_dict()

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore the engine's state when the accumulator is built."""
        if "bigbatch" in checkpoint:
            self._bigbatch_pending_state = checkpoint["bigbatch"]


def _precision(trainer_precision: str, bigbatch_precision: Precision) -> Precision:
    """bigbatch's precision from the Trainer's and the mixin's (they must not both cast)."""
    if trainer_precision == "16-mixed" or trainer_precision == "16":
        raise ValueError(
            "Trainer(precision='16-mixed') steps Lightning's own GradScaler inside "
            "optimizer.step, which would unscale bigbatch's gradients a second time: use "
            "Trainer(precision='32-true') and set bigbatch_precision = 'fp16' on the module"
        )
    if trainer_precision not in _PRECISIONS:
        raise ValueError(
            f"Trainer precision {trainer_precision!r} is not supported by AccumulatorMixin: use "
            f"one of {', '.join(sorted(_PRECISIONS))}"
        )
    mapped = _PRECISIONS[trainer_precision]
    if mapped != "fp32" and bigbatch_precision not in ("fp32", mapped):
        raise ValueError(
            f"Trainer precision {trainer_precision!r} and bigbatch_precision "
            f"{bigbatch_precision!r} disagree: set one of them"
        )
    return bigbatch_precision if bigbatch_precision != "fp32" else mapped
