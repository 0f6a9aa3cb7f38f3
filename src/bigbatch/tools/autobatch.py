"""micro_batch_size for a memory budget, and the plan `bigbatch plan --memory-budget` prints.

`choose_micro_batch_size` is `bigbatch.tools.choice.choose_micro_batch` in samples: the largest
micro-batch whose measured memory x (1 + headroom) fits the budget, or the fastest feasible one,
per rank of a `Layout` (DDP or FSDP2, whose sync mode it chooses). `plan_for_budget` does it for
a recipe and plans the global batch; `format_choice` prints why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from bigbatch.choices import DEFAULT_OPTIMIZE, Optimize
from bigbatch.core.engine import LossFn
from bigbatch.data.loader import first_samples
from bigbatch.planning import Plan, plan
from bigbatch.tools.choice import MicroBatchChoice, choose_micro_batch
from bigbatch.tools.memory import Batch
from bigbatch.tools.micro_setting import share_in_rows
from bigbatch.tools.projection import Agree, ShardUnits
from bigbatch.tools.rank_memory import Layout, format_rank_memory
from bigbatch.units import UsageError, UsageTypeError, format_bytes

if TYPE_CHECKING:
    from bigbatch.choices import Parallelism

__all__ = ["MicroBatchChoice", "choose_micro_batch_size", "format_choice", "plan_for_budget"]


def choose_micro_batch_size(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    *,
    max_micro_batch_size: int,
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
) -> MicroBatchChoice:
    """Probe a few sizes and choose the micro-batch (in samples) for a memory budget.

    ``make_batch(n)`` gives the first n samples collated; the choice is at most
    max_micro_batch_size (the rank's share of the global batch). Every other argument, and how
    the choice is made, as for `bigbatch.tools.choice.choose_micro_batch`.

    Raises:
        ValueError: no budget on a device without an allocator, or micro_batch_size 1 does not
            fit the budget (the message gives the numbers).
    """
    return choose_micro_batch(
        model, loss_fn, make_batch, max_rows=max_micro_batch_size,
        memory_budget_bytes=memory_budget_bytes, optimize=optimize, optimizer=optimizer,
        device=device, headroom=headroom, repetitions=repetitions, autocast_dtype=autocast_dtype,
        layout=layout, shard_units=shard_units, agree=agree,
    )  # fmt: skip


def plan_for_budget(
    recipe_spec: str,
    global_batch_size: int,
    *,
    world_size: int = 1,
    memory_budget: int | str,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    recipe_options: Mapping[str, Any] | None = None,
    parallelism: Parallelism = "ddp",
) -> tuple[MicroBatchChoice, Plan]:
    """Build a recipe, choose its micro-batch for the budget and plan the global batch.

    The micro-batch is capped at a rank's share, ceil(global_batch_size / world_size); the device
    defaults to CUDA when available. The recipe's model is probed whole on this one process, and
    the budget is one rank's of `world_size` under `parallelism` (FSDP2: both sync modes
    compared, with the recipe's shard units).
    """
    from bigbatch import recipes  # recipes import the engine; keep this module light to import

    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise UsageTypeError(
            f"global_batch_size must be a positive integer, got {global_batch_size!r}"
        )
    if global_batch_size < 1 or world_size < 1 or world_size > global_batch_size:
        raise UsageError(
            f"global_batch_size {global_batch_size} and world_size {world_size} must be positive "
            "with world_size <= global_batch_size"
        )
    config = {"seed": seed, "recipe_options": dict(recipe_options or {})}
    recipe = recipes.build(recipe_spec, config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = recipe.model.to(device).train()
    choice = choose_micro_batch_size(
        module,
        recipe.loss_fn,
        first_samples(recipe.train_dataset, recipe.collate_fn),
        max_micro_batch_size=share_in_rows(global_batch_size, world_size),
        memory_budget_bytes=memory_budget,
        optimize=optimize,
        optimizer=recipe.build_optimizer(module, lr=float(recipe.defaults.get("lr", 1e-3))),
        device=device,
        headroom=headroom,
        layout=Layout(parallelism, world_size, "auto"),
        shard_units=recipe.shard_units,
    )
    return choice, plan(global_batch_size, world_size, micro_batch_size=choice.micro_batch_size)


def format_choice(choice: MicroBatchChoice, plan: Plan | None = None) -> str:
    """The probe table (size, memory, predicted, samples/s), the choice and why, and the plan."""
    result = choice.probe
    # Per rank: what the chosen layout's rank holds at each measured size.
    offset = choice.rank_memory[0][1].state - result.model_bytes if choice.rank_memory else None
    lines = [
        f"memory probe on {result.device_type} ({result.method}"
        f"{', sharded: this rank' if result.sharded else ''}):",
        f"{'micro_batch_size':>16}  {'memory':>10}  {'fit':>10}  {'samples/s':>10}"
        + ("" if offset is None else f"  {'per rank':>10}"),
    ]
    for row in result.rows:
        mark = "  <- chosen" if row.micro_batch_size == choice.micro_batch_size else ""
        per_rank = "" if offset is None else f"  {format_bytes(row.memory_bytes + offset):>10}"
        lines.append(
            f"{row.micro_batch_size:>16}  {format_bytes(row.memory_bytes):>10}  "
            f"{format_bytes(result.predict(row.micro_batch_size)):>10}  "
            f"{row.samples_per_s:>10.1f}{per_rank}{mark}"
        )
    if result.oom_micro_batch_size is not None:
        lines.append(f"{result.oom_micro_batch_size:>16}  out of memory")
    lines += [
        f"fit: memory(n) = {format_bytes(result.fixed_bytes)} + "
        f"{format_bytes(result.bytes_per_sample)} x n "
        f"(largest relative error {result.fit_relative_error:.2%})",
        f"memory_budget {format_bytes(choice.memory_budget_bytes)}"
        f"{' per rank' if choice.rank_memory else ''}, "
        f"headroom {choice.headroom:.0%}, optimize {choice.optimize}: "
        f"micro_batch_size {choice.micro_batch_size}"
        + (f", gradient_sync {choice.gradient_sync}" if choice.gradient_sync else ""),
        f"why: {choice.reason}",
    ]
    if choice.rank_memory:
        lines.append(format_rank_memory(choice.rank_memory, choice.memory_budget_bytes))
    if plan is not None:
        lines.append(str(plan))
    return "\n".join(lines)
