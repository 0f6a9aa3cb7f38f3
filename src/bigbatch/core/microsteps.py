"""Forward and backward over one rank's window: every micro-step, in the sync context its
replication strategy gives, with stand-ins where every rank must run alike.

`MicroSteps.run` backpropagates each micro-batch's *unnormalised* loss sum and returns the detached
loss sums and item counts, for the step's totals. Out-of-memory is caught per micro-step and
flagged instead of raised, so that over ranks this rank still joins every gradient collective the
others run (with stand-ins) and no rank hangs; where a collective may have begun it is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from bigbatch.choices import Precision
from bigbatch.core import batches, recovery
from bigbatch.core.loss import LossFn, MeanLossCheck, read_loss_output
from bigbatch.core.precision import autocast
from bigbatch.core.replication import Replication, stand_in, stand_in_forward

Backward = Callable[[torch.Tensor, float | torch.Tensor], None]
"""``backward(loss_sum, num_items)``: backpropagate one micro-step's loss sum."""


class WindowPass(NamedTuple):
    """What one pass over the window left on this rank.

    Attributes:
        loss_sums: the detached loss sum of every micro-step that counted.
        counts: their loss items (numbers, or tensors on the device).
        out_of_memory: the pass stopped at an out-of-memory error (the window is redone).
    """

    loss_sums: list[torch.Tensor]
    counts: list[float | torch.Tensor]
    out_of_memory: bool


class MicroSteps:
    """Runs the micro-steps of a window on one rank.

    Args:
        model: the model as the caller gave it.
        replication: its replication strategy.
        precision: the forward's autocast precision.
        device: where the model lives.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        replication: Replication,
        precision: Precision,
        device: torch.device,
    ) -> None:
        self.model = model
        self.replication = replication
        self.precision: Precision = precision
        self.device = device
        self._mean_loss_check = MeanLossCheck()

    def run(
        self,
        micro_batches: list[Any],
        loss_fn: LossFn,
        backward: Backward,
        clear_gradients: Callable[[], None],
    ) -> WindowPass:
        """Forward and backward over the window's micro-batches.

        Args:
            backward: backpropagates a micro-step's loss sum (and gathers what rides on it).
            clear_gradients: drops the partial gradients after an out-of-memory error.

        Raises:
            torch.OutOfMemoryError: out of memory in a backward other ranks may be syncing in.
        """
        steps = self.replication.micro_steps(micro_batches, self.device)
        loss_sums: list[torch.Tensor] = []
        counts: list[float | torch.Tensor] = []
        failed_at, last = None, len(steps) - 1
        for index, (micro_batch, is_stand_in) in enumerate(steps):
            rows = 0 if is_stand_in else batches.num_rows(micro_batch)
            if rows == 0 and not is_stand_in:
                step = self.replication.empty_micro_step(micro_batches, micro_batch, index, last)
                if step is None:
                    continue
                micro_batch, is_stand_in = step
            try:
                loss_sum, count = self._micro_step(
                    loss_fn, backward, micro_batch, rows, is_stand_in, index == last
                )
            except _OutOfMemoryInBackward as error:
                if self.replication.out_of_memory_is_fatal(index, last):
                    raise recovery.out_of_memory_during_sync(rows) from error.__cause__
                failed_at = index
                break
            except torch.OutOfMemoryError:
                failed_at = index
                break
            loss_sums.append(loss_sum.detach())
            counts.append(count)
        if failed_at is None:
            return WindowPass(loss_sums, counts, out_of_memory=False)
        # Outside the except block, so that the failed micro-step's graph is freed.
        joined = self.replication.micro_steps_to_join(failed_at, len(steps))
        if joined:
            clear_gradients()
            filler = stand_in(micro_batches)
            for index in joined:
                self._micro_step(loss_fn, backward, filler, 0, True, index == last)
        return WindowPass(loss_sums, counts, out_of_memory=True)

    def _micro_step(
        self,
        loss_fn: LossFn,
        backward: Backward,
        micro_batch: Any,
        rows: int,
        is_stand_in: bool,
        is_last: bool,
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Forward and backward of one micro-batch, syncing gradients as the strategy says.

        Raises:
            _OutOfMemoryInBackward: out of memory in the backward, where collectives may have
                started (the error is its ``__cause__``).
        """
        sync = self.replication.sync(is_last)
        with sync, stand_in_forward(self.model, is_stand_in):
            with autocast(self.precision, self.device.type):
                output = loss_fn(self.model, micro_batch)
            if not is_stand_in:
                self._mean_loss_check(output, micro_batch)
            loss_sum, count = read_loss_output(output, rows, self.device)
            if is_stand_in:
                count = 0.0
            try:
                backward(loss_sum, count)
            except torch.OutOfMemoryError as error:
                raise _OutOfMemoryInBackward() from error
        return loss_sum, count


class _OutOfMemoryInBackward(Exception):
    """Out of memory inside a backward (its cause), where gradient collectives may have begun."""
