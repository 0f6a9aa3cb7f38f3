"""What one rank holds under a parallel layout: one process, DDP, or FSDP2 in either sync mode.

The memory probe (`bigbatch.tools.memory`) measures one forward + backward of the model as it is:
the whole model on one process, or this rank's shards of a model FSDP2 has sharded. `rank_memory`
turns the model's sizes and the probe's activations into what one rank holds for a layout:

- parameters and gradients: whole on one process and under DDP; under FSDP2 over N ranks 1/N
  each, dim 0 split in ceil(rows / N) as FSDP2 pads it;
- optimizer state: whole, or 1/N under FSDP2 (it follows the gradients);
- buffers (BatchNorm statistics, ...): whole, FSDP2 does not shard them;
- activations: the probe's at the micro-batch, the same under every layout (a forward runs on
  whole parameters);
- in flight: nothing under DDP (bigbatch wraps it with ``gradient_as_bucket_view``: its buckets
  are the gradient, not a second copy); under FSDP2 the root's parameters, the two largest
  shard units' (one computing, one prefetched) and, with ``every_micro_batch``, the largest
  unit's gradient before its reduce-scatter;
- unsharded gradient: FSDP2 with ``step_end`` only: a whole gradient, held until the window's
  last backward, whose reduce-scatters turn it into the sharded one unit by unit (so the sharded
  gradient is not held beside it: ``gradients`` is 0 then).

The sizes are estimates of tensors, not of the allocator: fragmentation and the workspace of
kernels are what the probe's headroom is for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.choices import SYNC_MODES, GradientSync, Parallelism
from bigbatch.core import sharding
from bigbatch.tools.memory import optimizer_state_bytes
from bigbatch.units import format_bytes


@dataclass(frozen=True)
class Layout:
    """How the ranks hold the model.

    Attributes:
        parallelism: ``"ddp"`` (replicas) or ``"fsdp"`` (shards).
        world_size: number of ranks; one rank holds the whole model whatever the parallelism.
        gradient_sync: ``"every_micro_batch"`` or ``"step_end"`` (``"auto"`` while planning:
            both are compared); only FSDP's memory depends on it.
    """

    parallelism: Parallelism
    world_size: int
    gradient_sync: GradientSync = "step_end"

    @property
    def sharded(self) -> bool:
        """True when the model is split over more than one rank."""
        return self.parallelism == "fsdp" and self.world_size > 1

    def describe(self) -> str:
        """``fsdp step_end on 4 ranks``, ``one process``."""
        if self.world_size == 1:
            return "one process"
        mode = f" {self.gradient_sync}" if self.sharded else ""
        return f"{self.parallelism}{mode} on {self.world_size} ranks"


@dataclass(frozen=True)
class ModelSizes:
    """The whole model's sizes, as if unsharded (a sharded model is measured by its global shapes).

    Attributes:
        parameters: (rows, elements per row, bytes per element, trained) of every parameter;
            rows is dim 0, the dimension FSDP2 shards.
        optimizer_bytes: the optimizer's state for the whole model, once it has stepped.
        buffer_bytes: buffers (BatchNorm statistics, ...), never sharded.
        unit_bytes: parameter bytes of each shard unit, largest first (the root's own last).
        root_bytes: parameters of the root's own group: in no shard unit.
    """

    parameters: tuple[tuple[int, int, int, bool], ...]
    optimizer_bytes: int
    buffer_bytes: int
    unit_bytes: tuple[int, ...] = ()
    root_bytes: int = 0

    def parameter_bytes(self, world_size: int = 1, trained_only: bool = False) -> int:
        """Bytes of one rank's parameters (or gradients: ``trained_only``) over world_size."""
        return sum(
            math.ceil(rows / world_size) * row * size
            for rows, row, size, trained in self.parameters
            if trained or not trained_only
        )

    @property
    def gradient_bytes(self) -> int:
        """A whole gradient: every trained parameter's size."""
        return self.parameter_bytes(trained_only=True)


def _shape(parameter: torch.Tensor) -> tuple[int, int, int, bool]:
    shape = tuple(parameter.shape)  # a DTensor's shape is the global one
    rows = shape[0] if shape else 1
    return rows, math.prod(shape[1:]), parameter.element_size(), parameter.requires_grad


def model_sizes(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    shard_units: Callable[[torch.nn.Module], list[torch.nn.Module]] | None = None,
) -> ModelSizes:
    """The sizes of a model, sharded by FSDP2 or not.

    Args:
        optimizer: its state is counted once it has stepped, without stepping it (a sharded
            model's: this rank's state, scaled up by the whole gradient over this rank's).
        shard_units: the units FSDP would shard on their own (default: the FSDP modules of a
            sharded model, else `bigbatch.core.sharding.default_shard_units`).
    """
    parameters = list(model.parameters())  # shared parameters come once
    optimizer_bytes = float(optimizer_state_bytes(optimizer))
    if sharding.is_fsdp(model):
        trained = [p for p in parameters if p.requires_grad]
        local = sum(sharding.local(p).numel() * p.element_size() for p in trained)
        whole = sum(p.numel() * p.element_size() for p in trained)
        optimizer_bytes *= whole / max(local, 1)
    if sharding.is_fsdp(model):
        units = [m for m in sharding.fsdp_modules(model) if m is not model]
    else:
        units = (shard_units or sharding.default_shard_units)(model)
    units = [unit for unit in units if unit is not model]
    in_units: set[int] = set()
    unit_bytes = []
    for unit in units:
        owned = [p for p in unit.parameters() if id(p) not in in_units]
        in_units.update(id(p) for p in owned)
        unit_bytes.append(sum(p.numel() * p.element_size() for p in owned))
    root = sum(p.numel() * p.element_size() for p in parameters if id(p) not in in_units)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelSizes(
        parameters=tuple(_shape(p) for p in parameters),
        optimizer_bytes=round(optimizer_bytes),
        buffer_bytes=buffers,
        unit_bytes=tuple(sorted(unit_bytes, reverse=True)),
        root_bytes=root,
    )


PARTS = (
    "parameters",
    "gradients",
    "optimizer",
    "buffers",
    "activations",
    "in_flight",
    "unsharded_gradient",
)
"""The parts of `RankMemory`, in the order tables show them."""


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds at the peak of a micro-step, by part, in bytes."""

    layout: Layout
    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int
    in_flight: int
    unsharded_gradient: int

    @property
    def total(self) -> int:
        """The sum of the parts: the rank's predicted peak."""
        return sum(getattr(self, part) for part in PARTS)

    @property
    def state(self) -> int:
        """What does not depend on the micro-batch: everything but the activations."""
        return self.total - self.activations

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for `bigbatch plan --json` and the run's log."""
        layout = self.layout
        return {
            "parallelism": layout.parallelism,
            "world_size": layout.world_size,
            "gradient_sync": layout.gradient_sync if layout.sharded else None,
            **{f"{part}_bytes": getattr(self, part) for part in (*PARTS, "total")},
        }


def rank_memory(
    sizes: ModelSizes,
    layout: Layout,
    activation_bytes: float,
    *,
    in_flight_measured: bool = False,
) -> RankMemory:
    """One rank's memory for a layout, given the activations of its micro-batch.

    Args:
        in_flight_measured: the probe's measurement already holds what is in flight (the CUDA
            allocator's peak of a sharded model), so it is not added again.
    """
    world = layout.world_size if layout.sharded else 1
    gradients = sizes.parameter_bytes(world, trained_only=True)
    whole_gradient = sizes.gradient_bytes
    optimizer = round(sizes.optimizer_bytes * gradients / whole_gradient) if whole_gradient else 0
    step_end = layout.sharded and layout.gradient_sync == "step_end"
    in_flight = 0
    if layout.sharded and not in_flight_measured:
        units = sizes.unit_bytes
        # every_micro_batch: a unit's unsharded gradient before its reduce-scatter; step_end
        # holds every unit's anyway (the unsharded gradient).
        unit_gradient = units[0] if units and not step_end else 0
        in_flight = sizes.root_bytes + sum(units[:2]) + unit_gradient
    return RankMemory(
        layout=layout,
        parameters=sizes.parameter_bytes(world),
        gradients=0 if step_end else gradients,
        optimizer=optimizer,
        buffers=sizes.buffer_bytes,
        activations=max(0, round(activation_bytes)),
        in_flight=in_flight,
        unsharded_gradient=whole_gradient if step_end else 0,
    )


def layouts(parallelism: Parallelism, world_size: int) -> list[Layout]:
    """The layouts to compare: DDP (or one process), or FSDP in both sync modes."""
    if parallelism == "fsdp" and world_size > 1:
        return [Layout("fsdp", world_size, mode) for mode in SYNC_MODES]
    return [Layout(parallelism, world_size)]


def format_rank_memory(
    rows: Sequence[tuple[int, RankMemory]], memory_budget_bytes: int | None = None
) -> str:
    """A table: one row per (micro-batch size, layout), one column per part, and the total."""
    header = ["layout", "micro", *(part.replace("_", " ") for part in PARTS), "total"]
    table = [header]
    for micro, memory in rows:
        total = format_bytes(memory.total)
        if memory_budget_bytes is not None and memory.total > memory_budget_bytes:
            total += " (over)"
        parts = [format_bytes(getattr(memory, part)) for part in PARTS]
        table.append([memory.layout.describe(), str(micro), *parts, total])
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        for row in table
    )
