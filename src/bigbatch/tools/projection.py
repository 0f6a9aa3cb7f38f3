"""From what the memory probe measures to what one rank holds, and the budget it must fit.

The probe (`bigbatch.tools.memory`) measures the model as it is on this process; `Projection`
adds what a rank holds under the planned layout (`bigbatch.tools.rank_memory`: DDP, or FSDP2 in
either sync mode), and `agreed` takes every rank's largest measurement so that all ranks decide
alike. `resolve_budget` gives the budget in bytes, `too_small` the error when nothing fits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from bigbatch.core import sharding
from bigbatch.tools import memory
from bigbatch.tools.memory import MemoryProbe, tensor_bytes
from bigbatch.tools.rank_memory import Layout, RankMemory, layouts, model_sizes, rank_memory
from bigbatch.units import UsageError, format_bytes, parse_memory_size

ShardUnits = Callable[[torch.nn.Module], list[torch.nn.Module]]
Agree = Callable[[list[float]], list[float]]
"""Reduces measurements over ranks (e.g. an all-reduce MAX) so that every rank decides alike."""

logger = logging.getLogger(__name__)


def resolve_budget(
    memory_budget: int | str | None,
    device: torch.device,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """The budget in bytes; on CUDA by default 90% of free memory plus what the model holds."""
    if memory_budget is not None:
        return parse_memory_size(memory_budget)
    if device.type != "cuda":
        raise UsageError(
            f"memory_budget is required on {device.type}: there is no allocator to ask for free "
            "memory; set memory_budget to what one rank may use, e.g. memory_budget: 8GiB"
        )
    free, _ = torch.cuda.mem_get_info(device)
    # What the model already holds on the device is not free, but the prediction counts it.
    held = [*module.parameters(), *module.buffers()]
    held += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        held += [v for state in optimizer.state.values() for v in state.values()]
    resident = tensor_bytes([t for t in held if isinstance(t, torch.Tensor) and t.is_cuda])
    budget = int(0.9 * (free + resident))
    sizes = (format_bytes(budget), format_bytes(free), format_bytes(resident))
    logger.info("memory_budget %s = 90%% of (free %s + held by the model %s) on %s", *sizes, device)
    return budget


class Projection:
    """From what the probe measures to what one rank holds, per layout compared.

    ``offsets[sync]`` is added to a measured (or fitted) memory to give one rank's: the probe
    counts the model as it is (whole, or this rank's shards), the layout says what a rank holds.
    Without a layout (or on one process) the only key is None and the offset 0.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        layout: Layout | None,
        shard_units: ShardUnits | None,
        device: torch.device,
        agree: Agree | None,
    ) -> None:
        self.layouts: dict[str | None, Layout] = {}
        if layout is not None and layout.world_size > 1:
            compared = layouts(layout.parallelism, layout.world_size)
            if layout.sharded and layout.gradient_sync != "auto":
                compared = [layout]
            self.layouts = {(c.gradient_sync if c.sharded else None): c for c in compared}
        self.model_bytes = float(memory.model_state_bytes(module, optimizer))
        if agree is not None:  # the fullest rank's, as the agreed measurements are
            self.model_bytes = agree([self.model_bytes])[0]
        self.sizes = model_sizes(module, optimizer, shard_units) if self.layouts else None
        # The CUDA allocator's peak of a sharded model holds the all-gathered units already.
        self.in_flight_measured = device.type == "cuda" and sharding.is_fsdp(module)
        self.offsets: dict[str | None, float] = {
            key: self.rank_memory(key, self.model_bytes).total - self.model_bytes
            for key in self.layouts
        } or {None: 0.0}

    def rank_memory(self, key: str | None, measured_bytes: float) -> RankMemory:
        """One rank's memory for a layout, from a measured (or fitted) probe memory."""
        assert self.sizes is not None
        return rank_memory(
            self.sizes,
            self.layouts[key],
            measured_bytes - self.model_bytes,
            in_flight_measured=self.in_flight_measured,
        )

    def per_rank(self, key: str | None) -> str:
        """`` per rank`` where the memory is a layout's rank's, else nothing."""
        return " per rank" if key in self.layouts else ""

    def compared(
        self,
        result: MemoryProbe,
        fits: Mapping[str | None, int],
        chosen_sync: str | None,
        chosen: int,
    ) -> tuple[tuple[int, RankMemory], ...]:
        """Per layout compared: its largest micro-batch (the chosen one for the chosen layout)
        and one rank's memory there; 0 for a layout where nothing fits at micro_batch_size 1."""
        if not self.layouts:
            return ()
        compared = []
        for key in sorted(self.layouts, key=lambda k: (k != chosen_sync, str(k))):
            micro = chosen if key == chosen_sync else fits.get(key, 0)
            measured = result.peak(max(micro, 1))
            compared.append((micro, self.rank_memory(key, measured)))
        return tuple(compared)


def too_small(result: MemoryProbe, budget: int, headroom: float, projection: Projection) -> str:
    """The error when micro_batch_size 1 fits under no layout: the numbers and the fixes."""
    key = min(projection.offsets, key=lambda k: projection.offsets[k])
    offset = projection.offsets[key]
    needs = max(result.predict(1), result.peak(result.rows[0].micro_batch_size)) + offset
    needed = format_bytes(needs * (1 + headroom))
    where = f" ({projection.layouts[key].describe()})" if key in projection.layouts else ""
    return (
        f"memory_budget {format_bytes(budget)} is below the {format_bytes(needs)}{where} that "
        f"micro_batch_size 1 needs (model and optimizer {format_bytes(result.fixed_bytes + offset)}"
        f" + {format_bytes(result.bytes_per_sample)} per sample), {needed} with headroom "
        f"{headroom:.0%}; raise memory_budget to at least {needed}, lower headroom, or use a "
        "smaller model, a lighter optimizer, bf16 or more ranks with parallelism fsdp"
    )


def agreed(result: MemoryProbe, agree: Agree | None) -> MemoryProbe:
    """The probe with every rank's largest memory and slowest time per row (refitted)."""
    if agree is None:
        return result
    count = len(result.rows)
    values = agree(
        [float(r.memory_bytes) for r in result.rows]
        + [r.seconds for r in result.rows]
        + [float(result.model_bytes)]
    )
    rows = [
        replace(row, memory_bytes=int(values[i]), seconds=values[count + i])
        for i, row in enumerate(result.rows)
    ]
    rows = [replace(r, samples_per_s=r.micro_batch_size / max(r.seconds, 1e-9)) for r in rows]
    model_bytes = int(values[-1])  # the fullest rank's, as the rows are
    intercept, slope, error = memory.fit_rows(rows, model_bytes)
    return replace(
        result,
        rows=rows,
        fixed_bytes=intercept,
        bytes_per_sample=slope,
        fit_relative_error=error,
        model_bytes=model_bytes,
    )
