"""One exact optimizer step over a window of micro-batches.

`Accumulator.step(window, loss_fn)` runs forward and backward on every micro-batch of this rank's
window, backpropagating *unnormalised* loss sums, and scales the accumulated gradients once, at the
step, by world_size / (number of loss items of the whole window on every rank). The applied
gradient is then the gradient of (sum of every item's loss) / (number of items), exactly as one big
batch would give, whatever the split. Under DistributedDataParallel the gradients are all-reduced
once per step (every micro-step but the last runs under `no_sync`), plus one small all-reduce of
the window's totals and the optional statistics' sums. Under FSDP2 (`fully_shard`) the gradients
are summed over ranks by reduce-scatter (in every backward, or only in the last one with
``gradient_sync="step_end"``), every rank runs the same number of micro-steps (stand-ins that
count no item fill in, since every forward all-gathers), and the scale is 1 / global items. The
step reads the device once (totals, gradient norm, noise sums: one transfer); fp16 adds the
GradScaler's own read of its overflow flag. The engine knows nothing of configs, files or the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.choices import ACCUMULATION_DTYPES, AccumulationDtype, GradientSync, Precision, one_of
from bigbatch.core import batches, distributed, recovery, sharding, syncnorm
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core.divergence import DivergenceCheck, DivergenceStatistic
from bigbatch.core.loss import LossFn, MeanLossCheck, read_loss_output
from bigbatch.core.noise import NoiseScale, NoiseScaleMeter
from bigbatch.core.precision import LossScaling, autocast
from bigbatch.core.window import WindowRead, WindowStatistics, local_totals, reduce_and_read

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
        self._is_ddp = distributed.is_ddp(model)
        self._is_fsdp = sharding.is_fsdp(model)
        # Sum over ranks: the window's totals always; DDP and FSDP reduce the gradients too.
        self._distributed = self._is_ddp or self._is_fsdp
        self._world_size = distributed.get_world_size() if self._distributed else 1
        # DDP averages gradients over ranks, FSDP (with sum reduction) sums them.
        self._gradient_ranks = self._world_size if self._is_ddp else 1
        self._parameters = [p for p in model.parameters() if p.requires_grad]
        if not self._parameters:
            raise ValueError("model has no parameter with requires_grad=True: nothing to train")
        self.device = self._parameters[0].device
        if self._is_fsdp:
            sharding.prepare(model, self._parameters)
        self.gradient_sync = sharding.choose_gradient_sync(
            gradient_sync,
            sharded=self._is_fsdp,
            parameters=self._parameters,
            device=self.device,
            memory_budget_bytes=memory_budget_bytes,
        )
        # A gradient collective in more than the last backward (or any forward, under FSDP):
        # every rank must run as many micro-steps.
        self._equal_micro_steps = self._is_fsdp or (
            self._is_ddp and self.gradient_sync == "every_micro_batch"
        )
        self._requires_gradient_sync: bool | None = None  # FSDP's flag as last set
        self.accumulation_dtype = _choose_accumulation_dtype(
            accumulation_dtype, self._parameters, sharded=self._is_fsdp
        )
        # The fp32 buffers of the window (accumulation_dtype "fp32"), None outside a step.
        self._buffers: list[torch.Tensor] | None = None
        self._scaling = LossScaling(precision, self.device.type, grad_scaler)
        self.grad_scaler = self._scaling.grad_scaler
        # Set after an out-of-memory error: later windows are re-split to at most this size.
        self.max_micro_batch_size: int | None = None
        self.batchnorm = batchnorm
        self._checked_batchnorm = batchnorm != "keep"
        # Forwards that run collectives (cross-rank BatchNorm) must run on every rank, empty or not.
        self._forward_empty = self._is_ddp and syncnorm.has_cross_rank_layers(model)
        self._remove_hooks: list[Callable[[], None]] = []
        if batchnorm == "freeze":
            self._remove_hooks.append(batchnorm_policies.freeze(distributed.unwrap(model)))
        self._noise = (
            NoiseScaleMeter(self._parameters, noise_smoothing_steps, model=model)
            if measure_noise_scale
            else None
        )
        self._statistics = self._window_statistics(model, batchnorm, check_ranks_every)
        self._mean_loss_check = MeanLossCheck()
        self._closed = False

    def _window_statistics(
        self, model: torch.nn.Module, batchnorm: str, check_ranks_every: int | None
    ) -> list[WindowStatistics]:
        """What rides the step's one small all-reduce besides the totals."""
        statistics: list[WindowStatistics] = [] if self._noise is None else [self._noise]
        if batchnorm == "window":
            statistics.append(batchnorm_policies.WindowBatchNormStatistics(model))
        if check_ranks_every is not None and self._is_ddp and self._world_size > 1:
            # Replicas only: FSDP's shards differ by design.
            check = DivergenceCheck(self._parameters, every_n_steps=check_ranks_every)
            statistics.append(DivergenceStatistic(check))
        # Those read on the host first, so that the step's one read is a prefix of the sums.
        return sorted(statistics, key=lambda statistic: not statistic.host_sums)

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
        self._warn_about_batchnorm_once(micro_batches)
        learning_rate = float(self.optimizer.param_groups[0]["lr"])
        self._scaling.start(
            micro_batches, self.device, is_ddp=self._distributed, world_size=self._world_size
        )
        self._clear_gradients()  # gradients left by code run between steps must not count
        skip_reason: str | None
        try:
            micro_batches, read = self._run_window(micro_batches, loss_fn)
            if read.totals.num_invalid_counts:
                raise ValueError("loss_fn returned a negative or non-integer num_items")
            num_items = int(read.totals.num_items)
            loss_divisor = self._scaling.next_divisor(num_items, self._world_size)
            if num_items == 0:
                warnings.warn(
                    "the window holds no loss items on any rank: step skipped", stacklevel=2
                )
                self._abort_window()
                loss, grad_norm, skip_reason = math.nan, math.nan, "no loss items"
            else:
                loss = read.totals.loss_sum / num_items
                scale = self._gradient_ranks * loss_divisor / num_items
                grad_norm, skip_reason = self._apply(loss, read.grad_norm, scale)
                for statistic, sums in zip(self._statistics, read.sums):
                    if skip_reason is None:
                        statistic.end_window(sums, num_items=num_items, grad_norm=grad_norm)
                    else:
                        statistic.abort_window()
        except BaseException:
            self._abort_window()  # e.g. loss_fn raised: rewind what the window changed
            raise
        finally:
            self._clear_gradients()  # on every way out: no gradient memory held between steps
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
        """Forward and backward over the window, redone smaller until it fits in memory."""
        while True:
            if self.max_micro_batch_size is not None:
                micro_batches = recovery.resplit(micro_batches, self.max_micro_batch_size)
            totals, out_of_memory = self._accumulate(micro_batches, loss_fn)
            # Alone, this rank knows it ran out of memory without a collective or a read; under
            # DDP the all-reduce tells every rank whether any did, so all redo the window alike.
            if not out_of_memory or self._distributed:
                read = self._reduce(totals)
                if not read.totals.num_out_of_memory:
                    return micro_batches, read
            self._clear_gradients()
            self.max_micro_batch_size = recovery.halved_micro_batch_size(
                micro_batches, self.device, agree_over_ranks=self._distributed
            )

    def _accumulate(self, micro_batches: list[Any], loss_fn: LossFn) -> tuple[torch.Tensor, bool]:
        """Forward and backward over the window: this rank's totals (see `local_totals`) and
        whether it ran out of memory.

        Out-of-memory is caught per micro-step and flagged instead of raised, so that under DDP or
        FSDP this rank still joins the gradient collectives (with stand-ins) and no rank hangs.
        """
        for statistic in self._statistics:
            statistic.begin_window()  # also rewinds a window that ran out of memory
        steps = self._micro_steps(micro_batches)
        loss_sums: list[torch.Tensor] = []
        counts: list[float | torch.Tensor] = []
        out_of_memory = False
        last = len(steps) - 1
        failed_at = len(steps)
        for index, (micro_batch, stand_in) in enumerate(steps):
            rows = 0 if stand_in else batches.num_rows(micro_batch)
            if rows == 0 and not stand_in:
                must_join = self._is_ddp and index == last  # the step's one gradient sync
                if not (self._forward_empty or must_join):
                    continue
                if must_join and not self._forward_empty:
                    # Models that cannot forward 0 rows (GPT-2) join with a real row weighed 0.
                    micro_batch = self._stand_in(micro_batches)
                    stand_in = batches.num_rows(micro_batch) > 0
            try:
                loss_sum, count = self._micro_step(
                    loss_fn, micro_batch, rows, stand_in, index, last
                )
            except _OutOfMemoryInBackward as error:
                if self._is_fsdp or (self._is_ddp and (index == last or self._equal_micro_steps)):
                    raise recovery.out_of_memory_during_sync(rows) from error.__cause__
                out_of_memory, failed_at = True, index
                break
            except torch.OutOfMemoryError:
                out_of_memory, failed_at = True, index
                break
            loss_sums.append(loss_sum.detach())
            counts.append(count)
        if out_of_memory and self._distributed:  # outside the except block: the graph is freed
            self._clear_gradients()
            # Still join every gradient collective the other ranks run, with stand-ins.
            remaining = range(failed_at, len(steps)) if self._equal_micro_steps else [last]
            stand_in = self._stand_in(micro_batches)
            for index in remaining:
                self._micro_step(loss_fn, stand_in, 0, True, index, last)
        self._finish_buffers()
        return local_totals(loss_sums, counts, out_of_memory, self.device), out_of_memory

    def _micro_steps(self, micro_batches: list[Any]) -> list[tuple[Any, bool]]:
        """The window's micro-steps as (micro-batch, is a stand-in).

        Where every forward or backward is a collective (FSDP, or DDP syncing every micro-batch),
        every rank runs as many micro-steps as the rank with the most (one small MAX all-reduce),
        and an empty micro-batch becomes a stand-in: one real row of the window whose loss is
        multiplied by zero and counts no item.
        """
        if not self._equal_micro_steps:
            return [(micro_batch, False) for micro_batch in micro_batches]
        count = torch.tensor([float(len(micro_batches))], device=self.device)
        steps = int(distributed.all_reduce_max(count).item())
        stand_in = self._stand_in(micro_batches)
        padded = [(m, False) if batches.num_rows(m) else (stand_in, True) for m in micro_batches]
        return padded + [(stand_in, True)] * (steps - len(micro_batches))

    @staticmethod
    def _stand_in(micro_batches: list[Any]) -> Any:
        """One real row of the window (the first), or no row when the window has none."""
        for micro_batch in micro_batches:
            if batches.num_rows(micro_batch):
                return batches.narrow(micro_batch, 0, 1)
        return batches.narrow(micro_batches[0], 0, 0)

    def _micro_step(
        self, loss_fn: LossFn, micro_batch: Any, rows: int, stand_in: bool, index: int, last: int
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Forward and backward of one micro-batch, syncing gradients as the mode says.

        Raises:
            _OutOfMemoryInBackward: out of memory in the backward, where collectives may have
                started (the error is its ``__cause__``).
        """
        with self._sync(index == last), _batchnorm_eval(self.model, stand_in):
            with autocast(self.precision, self.device.type):
                output = loss_fn(self.model, micro_batch)
            if not stand_in:
                self._mean_loss_check(output, micro_batch)
            loss_sum, count = read_loss_output(output, rows, self.device)
            if stand_in:
                count = 0.0
            try:
                self._backward(loss_sum, count)
            except torch.OutOfMemoryError as error:
                raise _OutOfMemoryInBackward() from error
        return loss_sum, count

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """The context of one micro-step's backward: gradient collective or not."""
        sync = last or self.gradient_sync == "every_micro_batch"
        if self._is_ddp and self.accumulation_dtype == "fp32":
            return self.model.no_sync()  # type: ignore[operator]  # the fp32 buffers are reduced
        if self._is_ddp:
            return contextlib.nullcontext() if sync else self.model.no_sync()  # type: ignore[operator]
        if self._is_fsdp and sync != self._requires_gradient_sync:
            self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            self._requires_gradient_sync = sync
        return contextlib.nullcontext()

    def _backward(self, loss_sum: torch.Tensor, count: float | torch.Tensor) -> None:
        for statistic in self._statistics:
            statistic.begin_micro_step()
        self._scaling.backward(loss_sum)
        if self.accumulation_dtype == "fp32":
            self._add_to_buffers()
        for statistic in self._statistics:
            statistic.end_micro_step(count)

    def _add_to_buffers(self) -> None:
        """Move this micro-batch's gradient into the fp32 buffers (one rounding per step)."""
        if self._buffers is None:
            self._buffers = [
                torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                for p in self._parameters
            ]
        for buffer, parameter in zip(self._buffers, self._parameters):
            if parameter.grad is not None:
                buffer.add_(parameter.grad)
                parameter.grad = None

    def _finish_buffers(self) -> None:
        """Under DDP, sum the fp32 buffers over ranks (DDP itself ran under no_sync)."""
        if self._buffers is None or not self._is_ddp:
            return
        flat = torch.cat([buffer.reshape(-1) for buffer in self._buffers])
        distributed.all_reduce_sum(flat)
        flat.div_(self._world_size)  # as DDP's average, so that the normalisation is unchanged
        offset = 0
        for buffer in self._buffers:
            buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def _gradients(self) -> list[torch.Tensor]:
        """The accumulated gradients: fp32 buffers, or this rank's shards under FSDP."""
        if self._buffers is not None:
            return self._buffers
        return [sharding.local(p.grad) for p in self._parameters if p.grad is not None]

    def _reduce(self, totals: torch.Tensor) -> WindowRead:
        # After the last backward, hence after DDP's gradient sync: the same norm on every rank,
        # read with the totals. Under FSDP each rank has the norm of its shards: their squares
        # are summed over ranks in the same all-reduce.
        return reduce_and_read(
            totals,
            self._statistics,
            self._scaling.total_norm(self._gradients(), self.device),
            backward_scale=self._scaling.backward_scale(self.device) if self._statistics else 1.0,
            is_ddp=self._distributed,
            sharded_norm=self._is_fsdp,
        )

    def _apply(
        self, loss: float, summed_grad_norm: float, scale: float
    ) -> tuple[float, str | None]:
        """Normalise, unscale, clip and apply the accumulated gradients: once per step.

        ``scale`` is the one normalisation: DDP averaged over ranks, so world_size / global items
        (times the fp16 loss divisor) turns the summed per-item gradients into their mean over
        the whole global batch; FSDP summed, so 1 / global items. It is folded with the clipping
        into one pass over the gradients; the norm was taken before the step's host read.
        """
        grad_norm = summed_grad_norm * scale
        if self.max_grad_norm is not None and math.isfinite(grad_norm):
            scale *= min(1.0, self.max_grad_norm / (grad_norm + 1e-6))  # torch's clip coefficient
        gradients = self._gradients()
        if gradients and math.isfinite(grad_norm):
            torch._foreach_mul_(gradients, scale)
        if self._buffers is not None:  # the one rounding to the parameters' dtype
            for buffer, parameter in zip(self._buffers, self._parameters):
                parameter.grad = buffer.to(parameter.dtype)
            self._buffers = None
        self._scaling.unscale_(self.optimizer)
        skip_reason = None
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):
            skip_reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
        if skip_reason is None:
            self._scaling.step(self.optimizer)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        # Sharded: a rank may hold only finite shards of a non-finite gradient; back off alike.
        self._scaling.update(back_off=self._is_fsdp and not math.isfinite(grad_norm))
        return grad_norm, skip_reason

    def _abort_window(self) -> None:
        for statistic in self._statistics:
            statistic.abort_window()

    def _clear_gradients(self) -> None:
        # What zero_grad(set_to_none=True) does, over the list already held (no module walk).
        for parameter in self._parameters:
            parameter.grad = None
        self._buffers = None
        if self._is_fsdp:
            sharding.clear_unsharded_gradients(self.model)

    def _warn_about_batchnorm_once(self, micro_batches: list[Any]) -> None:
        if self._checked_batchnorm:
            return
        self._checked_batchnorm = True
        rows = [batches.num_rows(micro_batch) for micro_batch in micro_batches]
        smallest = min((size for size in rows if size > 0), default=0)
        if smallest:
            batchnorm_policies.warn_small_micro_batches(distributed.unwrap(self.model), smallest)

    def noise_scale(self) -> NoiseScale | None:
        """The current smoothed noise scale, or None when it is not measured."""
        return None if self._noise is None else self._noise.current()

    def close(self) -> None:
        """Remove every hook this accumulator put on the model; idempotent.

        The hooks are the noise scale's gradient hooks, the ``batchnorm="window"`` recording
        hooks (an open window is rewound first) and the ``batchnorm="freeze"`` hooks (the layers
        stay in eval mode until the next ``model.train()``). Afterwards the model trains with plain
        autograd and `step` raises: build a new Accumulator to continue.
        """
        for statistic in self._statistics:
            statistic.remove()
        for remove in self._remove_hooks:
            remove()
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """The engine's own state (GradScaler, loss divisor, split, noise estimate): checkpoints."""
        return {
            **self._scaling.state_dict(),
            "max_micro_batch_size": self.max_micro_batch_size,
            "noise_scale": self._noise.estimator.state_dict() if self._noise else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._scaling.load_state_dict(state)
        limit = state.get("max_micro_batch_size")
        self.max_micro_batch_size = None if limit is None else int(limit)
        if self._noise is not None and state.get("noise_scale"):
            self._noise.estimator.load_state_dict(state["noise_scale"])


class _OutOfMemoryInBackward(Exception):
    """Out of memory inside a backward (its cause), where gradient collectives may have begun."""


@contextlib.contextmanager
def _batchnorm_eval(model: torch.nn.Module, stand_in: bool) -> Any:
    """For a stand-in's forward: BatchNorm layers in eval mode, so their statistics ignore it."""
    if not stand_in:
        yield
        return
    layers = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
    ]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer in layers:
            layer.training = True


def _choose_accumulation_dtype(
    accumulation_dtype: str, parameters: list[torch.nn.Parameter], *, sharded: bool
) -> str:
    """``"fp32"`` or ``"param"``: the dtype asked for, or what ``auto`` picks."""
    if accumulation_dtype not in ACCUMULATION_DTYPES:
        raise ValueError(
            f"accumulation_dtype must be {one_of(ACCUMULATION_DTYPES)}, got {accumulation_dtype!r}"
        )
    if accumulation_dtype == "fp32" and sharded:
        raise ValueError(
            'accumulation_dtype="fp32" is not available under FSDP: shard with '
            "fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
            "reduce_dtype=torch.float32)) instead"
        )
    if accumulation_dtype != "auto":
        return accumulation_dtype
    low = any(p.dtype in (torch.bfloat16, torch.float16) for p in parameters)
    return "fp32" if low and not sharded else "param"


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
