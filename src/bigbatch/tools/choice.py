"""The one micro-batch chooser, for samples and tokens alike: rows measured against a budget.

`choose_micro_batch` probes micro-batches of n rows (``make_rows(n)``), carries each measurement
over to what one rank holds under the planned layout (`bigbatch.tools.projection`), and returns
the largest rows that fit the budget, or the fastest plan that fits (`bigbatch.tools.search`),
with the sync mode under FSDP2. A row is a sample, or a row of ``row_tokens`` padded tokens (the
longest sample): the choice's `MicroBatchChoice.value` is in the run's unit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bigbatch.choices import DEFAULT_OPTIMIZE, OPTIMIZE_GOALS, GradientSync, Optimize
from bigbatch.core import distributed
from bigbatch.core.engine import LossFn
from bigbatch.tools.memory import Batch, MemoryProbe, device_of
from bigbatch.tools.projection import Agree, Projection, ShardUnits, resolve_budget, too_small
from bigbatch.tools.rank_memory import Layout, RankMemory
from bigbatch.tools.search import (
    FIRST_SIZES,
    Unseen,
    choose_sync,
    fastest,
    geometric,
    largest_per_mode,
    measurers,
)
from bigbatch.tools.step_memory import StepBytesCache
from bigbatch.units import UsageError, format_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MicroBatchChoice:
    """The chosen micro-batch and why.

    Attributes:
        micro_batch_size: the chosen rows: samples, or rows of row_tokens tokens.
        probe: the measurements it was chosen from (sizes in rows).
        memory_budget_bytes: the budget it had to fit.
        optimize: ``"memory"`` (largest that fits) or ``"throughput"`` (fastest that fits).
        reason: one sentence with the numbers, in the unit of the choice.
        headroom: the fraction of the prediction kept free.
        gradient_sync: the sync mode the choice is for (FSDP2 over several ranks), else None.
        rank_memory: per layout compared, the largest micro-batch that fits (0: none) and one
            rank's memory there; the chosen layout first. Empty without a layout.
        row_tokens: padded tokens per probed row (the longest sample) for a choice in tokens;
            None for a choice in samples.
    """

    micro_batch_size: int
    probe: MemoryProbe
    memory_budget_bytes: int
    optimize: str
    reason: str
    headroom: float = 0.1
    gradient_sync: GradientSync | None = None
    rank_memory: tuple[tuple[int, RankMemory], ...] = ()
    row_tokens: int | None = None

    @property
    def unit(self) -> Literal["samples", "tokens"]:
        """The batch unit of `value`."""
        return "samples" if self.row_tokens is None else "tokens"

    @property
    def value(self) -> int:
        """The choice in its unit: micro_batch_size, or micro_batch_tokens (rows x row_tokens)."""
        return self.micro_batch_size * (self.row_tokens or 1)

    @property
    def bytes_per_token(self) -> float | None:
        """The fit's memory per padded token (bytes per row / row_tokens); None in samples."""
        return None if self.row_tokens is None else self.probe.bytes_per_sample / self.row_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for the run's log, its report and `bigbatch plan --json`."""
        rows = {
            "gradient_sync": self.gradient_sync,
            "rank_memory": [
                {"micro_batch_size": micro, **memory.to_dict()}
                for micro, memory in self.rank_memory
            ],
            "micro_batch_size": self.micro_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
            "optimize": self.optimize,
            "headroom": self.headroom,
            "reason": self.reason,
            "device_type": self.probe.device_type,
            "method": self.probe.method,
            "fixed_bytes": self.probe.fixed_bytes,
            "bytes_per_sample": self.probe.bytes_per_sample,
            "fit_relative_error": self.probe.fit_relative_error,
            "rows": [vars(row) for row in self.probe.rows],
        }
        if self.row_tokens is None:
            return rows
        return {
            "micro_batch_tokens": self.value,
            "row_tokens": self.row_tokens,
            "bytes_per_token": self.bytes_per_token,
            "rows": self.micro_batch_size,
            **{f"probe_{k}": v for k, v in rows.items() if k != "reason"},
            "reason": self.reason,
        }


def choose_micro_batch(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    *,
    max_rows: int,
    row_tokens: int | None = None,
    memory_budget_bytes: int | str | None,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    repetitions: int = 2,
    autocast_dtype: torch.dtype | None = None,
    layout: Layout | None = None,
    shard_units: ShardUnits | None = None,
    agree: Agree | None = None,
    unseen: Unseen | None = None,
    step_bytes_cache: StepBytesCache | None = None,
) -> MicroBatchChoice:
    """Probe a few row counts and choose the micro-batch for a memory budget.

    ``optimize="memory"``: the largest measured rows whose memory x (1 + headroom) fits the
    budget (`bigbatch.tools.search.largest_measured`); ``"throughput"``: the largest plan within
    3% of the fastest (`bigbatch.tools.search.fastest`). Never above max_rows (the rank's share).

    ``row_tokens`` (None: rows are samples): ``make_rows(n)`` gives n rows of row_tokens padded
    tokens, and the value is rows x row_tokens. ``layout`` (`bigbatch.tools.rank_memory`; None:
    one process) makes the budget one rank's; under FSDP2 with ``gradient_sync="auto"`` both
    sync modes are compared. ``shard_units``: the units FSDP2 would shard, for an unsharded
    model planned for FSDP2. ``agree`` reduces measurements over ranks (a sharded model is
    probed by every rank in lockstep), so that every rank decides alike. ``unseen(rows)``: bytes
    the probe's accounting misses at that many rows, added to each measurement (a checkpointed
    unit's recompute on a device without an allocator, `bigbatch.tools.joint`).
    ``step_bytes_cache`` (`bigbatch.tools.step_memory`) measures the optimizer step once for
    every probe; one joint choice shares one over its policies (None: a new one).

    Raises:
        ValueError: no budget on a device without an allocator, or one row does not fit the
            budget (the message gives the numbers).
    """
    _check_choice_arguments(max_rows, row_tokens, optimize, headroom)
    module = distributed.unwrap(model)
    device = device_of(module, device)
    budget = resolve_budget(memory_budget_bytes, device, module, optimizer)
    limit = budget / (1 + headroom)
    projection = Projection(module, optimizer, layout, shard_units, device, agree)
    measure, time_sizes = measurers(
        module, loss_fn, make_rows, optimizer, device, repetitions, autocast_dtype, agree, unseen,
        step_bytes_cache=step_bytes_cache,
    )  # fmt: skip
    result = measure(geometric(1, min(max_rows, 2 ** (FIRST_SIZES - 1))))
    _check_one_row_fits(result, budget, headroom, projection)
    result, fits = largest_per_mode(result, limit, max_rows, measure, projection.offsets)
    sync, sync_reason = choose_sync(fits, max_rows, projection)
    chosen, offset = fits[sync], projection.offsets[sync]
    if optimize == "throughput":
        result, chosen, reason = fastest(
            result, chosen, max_rows, limit - offset, measure, time_sizes
        )
    else:
        reason = _memory_reason(result, chosen, max_rows, offset, headroom)
    measured = {r.micro_batch_size: r for r in result.rows}[chosen].memory_bytes + offset
    reason += _measured_reason(measured, projection.per_rank(sync), headroom, budget)
    reason += f"; {sync_reason}" if sync_reason else ""
    choice = MicroBatchChoice(
        chosen, result, budget, optimize, _in_unit(reason, chosen, row_tokens), float(headroom),
        gradient_sync=None if sync is None else projection.layouts[sync].gradient_sync,
        rank_memory=projection.compared(result, fits, sync, chosen), row_tokens=row_tokens,
    )  # fmt: skip
    unit = "micro_batch_size" if row_tokens is None else "micro_batch_tokens"
    logger.info("%s %d: %s", unit, choice.value, choice.reason)
    return choice


def _check_one_row_fits(
    result: MemoryProbe, budget: int, headroom: float, projection: Projection
) -> None:
    """Refuse a budget where one row fits under no layout compared (with the numbers)."""
    room = budget / (1 + headroom) - min(projection.offsets.values())
    if result.rows[0].micro_batch_size != 1 or result.rows[0].memory_bytes > room:
        raise UsageError(too_small(result, budget, headroom, projection))


def _measured_reason(measured: float, per_rank: str, headroom: float, budget: int) -> str:
    """How the chosen micro-batch's measured memory fits the budget."""
    return (
        f"; measured {format_bytes(measured)}{per_rank} x (1 + headroom {headroom:.0%}) = "
        f"{format_bytes(measured * (1 + headroom))} <= memory_budget {format_bytes(budget)}"
    )


def _in_unit(reason: str, rows: int, row_tokens: int | None) -> str:
    """The reason in the unit of the choice: rows are samples, or rows of the longest sample."""
    if row_tokens is None:
        return reason
    return f"{rows} rows x {row_tokens} tokens (the longest sample): {reason}"


def _memory_reason(
    result: MemoryProbe, chosen: int, max_rows: int, offset: float, headroom: float
) -> str:
    """Why the largest size that fits is this one (optimize memory)."""
    if chosen == max_rows:
        return f"capped by max_micro_batch_size {max_rows} (the rank's share of the global batch)"
    next_bytes = result.peak(chosen + 1)  # measured where it was
    needs = format_bytes((next_bytes + offset) * (1 + headroom))
    return f"the largest micro_batch_size that fits; {chosen + 1} would need {needs}"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_choice_arguments(
    max_rows: object, row_tokens: object, optimize: object, headroom: object
) -> None:
    if not _positive_int(max_rows):
        raise ValueError(f"max_micro_batch_size must be a positive integer, got {max_rows!r}")
    if row_tokens is not None and not _positive_int(row_tokens):
        raise UsageError(f"row_tokens must be a positive integer, got {row_tokens!r}")
    if optimize not in OPTIMIZE_GOALS:
        raise ValueError(f"optimize must be one of {', '.join(OPTIMIZE_GOALS)}, got {optimize!r}")
    if not (isinstance(headroom, (int, float)) and 0 <= headroom < 10):
        raise ValueError(f"headroom must be a fraction >= 0 such as 0.1, got {headroom!r}")
