"""What the engine gathers over a window, sums over ranks in one small all-reduce and reads once.

`WindowTotals` names the four totals of every step (loss sum, items, invalid counts, ranks out of
memory); `local_totals` builds this rank's as one float64 tensor on the device, once per window.
`WindowStatistics` is what the engine asks of an optional statistic gathered over the window (the
gradient noise scale, the window BatchNorm statistics): its sums join the same all-reduce, so a
step has one small collective besides DDP's gradient sync, however many statistics it carries.
`reduce_and_read` runs that collective and the step's one host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from bigbatch.core import distributed
from bigbatch.core.loss import invalid_count


class WindowTotals(NamedTuple):
    """The window's totals, summed over ranks (the first values of the step's one host read).

    Attributes:
        loss_sum: sum of every item's loss.
        num_items: loss items.
        num_invalid_counts: item counts from loss_fn that were negative or not integers.
        num_out_of_memory: ranks that ran out of memory in this window (then it is redone).
    """

    loss_sum: float
    num_items: float
    num_invalid_counts: float
    num_out_of_memory: float


NUM_TOTALS = len(WindowTotals._fields)


def local_totals(
    loss_sums: list[torch.Tensor],
    counts: list[float | torch.Tensor],
    out_of_memory: bool,
    device: torch.device,
) -> torch.Tensor:
    """This rank's `WindowTotals`, a float64 tensor on the device in field order.

    Built once per window from the micro-steps' detached loss sums and item counts, so a
    micro-step pays for no bookkeeping op. Counts known on the host (Python numbers) and the
    out-of-memory flag enter as scalar arguments: no host-to-device copy, no host read.
    """
    zero = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.stack(loss_sums).to(device, torch.float64).sum() if loss_sums else zero
    host_items = float(sum(count for count in counts if not isinstance(count, torch.Tensor)))
    on_device = [count for count in counts if isinstance(count, torch.Tensor)]
    if on_device:
        stacked = torch.stack(on_device)
        num_items = stacked.sum() + host_items
        num_invalid = invalid_count(stacked).sum()  # validated here, once per window
    else:
        num_items, num_invalid = torch.full_like(zero, host_items), zero
    return torch.stack(
        [loss_sum, num_items, num_invalid, torch.full_like(zero, float(out_of_memory))]
    )


class WindowStatistics(Protocol):
    """A statistic gathered over a window, whose per-rank sums the step all-reduces.

    The engine calls, per window: `begin_window` (again when the window is redone after an
    out-of-memory error), `begin_micro_step` / `end_micro_step` around every backward,
    `local_statistics` once after the last backward, then `end_window` with the sums over every
    rank when the optimizer step is applied, or `abort_window` when it is not.
    """

    @property
    def host_sums(self) -> bool:
        """True when `end_window` needs the summed statistics on the host.

        They are then read with the step's totals, in the step's one host read; otherwise they
        stay on the device.
        """
        ...

    def begin_window(self) -> None:
        """Start a window: forget a previous (or failed) one."""
        ...

    def begin_micro_step(self) -> None:
        """Before a micro-batch's backward."""
        ...

    def end_micro_step(self, num_items: float | torch.Tensor) -> None:
        """After it, with the micro-batch's loss items (a number, or a tensor on the device)."""
        ...

    def local_statistics(self, backward_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """This rank's sums, flat float64 on the device, for loss sums backpropagated times
        ``backward_scale`` (a tensor keeps an fp16 loss scale on the device)."""
        ...

    def end_window(
        self, reduced: torch.Tensor | None = None, *, num_items: int = 0, grad_norm: float = 0.0
    ) -> None:
        """Commit an applied step.

        Args:
            reduced: `local_statistics` summed over ranks; None: this rank's own (one process).
            num_items: the loss items of the global batch.
            grad_norm: norm of the global batch's item-mean gradient, before clipping.
        """
        ...

    def abort_window(self) -> None:
        """Drop the window: its step was skipped or given up."""
        ...

    def remove(self) -> None:
        """Remove every hook the statistic put on the model (idempotent)."""
        ...


@dataclass(frozen=True)
class WindowRead:
    """The window's figures after the step's all-reduce and its one host read.

    Attributes:
        totals: the totals, summed over ranks.
        grad_norm: the gradient norm given to `reduce_and_read`.
        sums: each statistic's sums over ranks, in order: on the host for those whose
            `host_sums` is True, else on the device.
    """

    totals: WindowTotals
    grad_norm: float
    sums: list[torch.Tensor]


def reduce_and_read(
    totals: torch.Tensor,
    statistics: list[WindowStatistics],
    grad_norm: torch.Tensor,
    *,
    backward_scale: float | torch.Tensor,
    over_ranks: bool,
    sharded_norm: bool = False,
) -> WindowRead:
    """Sum the totals and every statistic's sums over ranks in one small all-reduce, then read the
    totals, the host statistics' sums and the gradient norm to the host in one transfer.

    Args:
        totals: this rank's `local_totals`.
        statistics: the window's statistics, those with `host_sums` first.
        grad_norm: a scalar on the device (already the same on every rank, unless sharded_norm).
        backward_scale: what the loss sums were multiplied by before backward.
        over_ranks: sum over ranks (False: one process, no collective).
        sharded_norm: grad_norm is the norm of this rank's shard of the gradient (FSDP): its
            square joins the all-reduce, and the read norm is the root of the sum.
    """
    parts = [totals, *(s.local_statistics(backward_scale) for s in statistics)]
    norm = grad_norm.reshape(1).to(totals.device, torch.float64)
    if sharded_norm:
        parts.append(norm.square())
    merged = torch.cat(parts) if len(parts) > 1 else totals
    if over_ranks:
        distributed.all_reduce_sum(merged)  # the one small collective of the step
    num_host = NUM_TOTALS + sum(
        part.numel() for part, s in zip(parts[1:], statistics) if s.host_sums
    )
    if sharded_norm:
        norm = merged[-1:].sqrt()
    host = torch.cat([merged[:num_host], norm]).cpu()  # the step's one host read
    sums, offset = [], NUM_TOTALS
    for part, statistic in zip(parts[1:], statistics):
        sums.append((host if statistic.host_sums else merged)[offset : offset + part.numel()])
        offset += part.numel()
    return WindowRead(WindowTotals(*host[:NUM_TOTALS].tolist()), float(host[-1]), sums)
