"""`bigbatch verify` over several ranks: DDP or FSDP2 against the full batch, in float64.

Under torchrun every rank holds the same float64 model (rank 0's, broadcast) and draws the same
global batches. For each split the global batch is planned over the ranks with `plan`, each rank
runs `Accumulator.step` on its own contiguous window with a fresh copy of the model wrapped in
DistributedDataParallel or sharded with FSDP2, and the gradient applied (gathered whole under
FSDP) is compared with the full-batch gradient of an unsharded copy, which every rank computes
alone. It checks docs/design.md, invariants 1 (any number of ranks) and 2 (ranks in step).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from bigbatch.choices import (
    GRADIENT_SYNCS,
    PARALLELISMS,
    SYNC_MODES,
    GradientSync,
    Parallelism,
    one_of,
)
from bigbatch.core import batches, distributed, replication, sharding
from bigbatch.planning import Plan, plan
from bigbatch.recipes import Recipe
from bigbatch.tools.verify import (
    SplitResult,
    VerifyReport,
    accumulated_gradients,
    breaking_layers,
    check_arguments,
    float64_model,
    full_batch_gradients,
    global_batches,
    relative_error,
    to_float64,
)
from bigbatch.units import UsageError


def distributed_splits(
    global_batch_size: int, world_size: int, micro_batch_size: int | None
) -> dict[str, Plan]:
    """The plans of the global batch over the ranks to compare, by name, without duplicates.

    ``micro 1``, ``uneven`` (micro-batches of a third of a rank's share, plus one),
    ``configured``, and ``empty`` when none of those leaves a micro-batch without items: a window
    one micro-step longer than a rank's items, as the short last global batch of an epoch is cut
    (`Plan.for_items`), so that every rank joins the collectives with a stand-in.

    Example:
        >>> for name, split in distributed_splits(11, 2, 2).items():
        ...     print(f"{name}: {split.sizes}")
        micro 1: ((1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 0))
        uneven: ((3, 3), (3, 2))
        configured: ((2, 2, 2), (2, 2, 1))
        >>> distributed_splits(10, 2, 5)["empty"].sizes
        ((1, 1, 1, 1, 1, 0), (1, 1, 1, 1, 1, 0))
    """
    share = math.ceil(global_batch_size / world_size)
    candidates = {"micro 1": 1, "uneven": share // 3 + 1, "configured": micro_batch_size}
    splits: dict[str, Plan] = {}
    for name, micro in candidates.items():
        if micro is None:
            continue
        split = plan(global_batch_size, world_size, micro_batch_size=micro)
        if split.sizes not in [other.sizes for other in splits.values()]:
            splits[name] = split
    if not any(0 in sizes for split in splits.values() for sizes in split.sizes):
        longer = plan(global_batch_size + world_size, world_size, micro_batch_size=1)
        splits["empty"] = longer.for_items(global_batch_size)
    return splits


def rank_window(
    samples: list[Any], split: Plan, rank: int, collate: Callable[[list[Any]], Any]
) -> list[Any]:
    """This rank's float64 micro-batches: its contiguous slice of the global batch, cut as the
    plan says; an empty micro-batch is a 0-row batch, as the window loader makes it."""
    start = split.rank_offsets()[rank]
    window = []
    for size in split.micro_batch_sizes(rank):
        if size:
            window.append(to_float64(collate(samples[start : start + size])))
        else:
            window.append(batches.narrow(to_float64(collate(samples[:1])), 0, 0))
        start += size
    return window


def _replica(
    model: torch.nn.Module, recipe: Recipe, parallelism: str, world_size: int
) -> torch.nn.Module:
    """A fresh copy of the float64 model, wrapped in DDP (`replication.replicate`: gradients as
    views into DDP's buckets) or sharded with FSDP2 (the recipe's shard units, then the root), as
    `bigbatch train` does over several ranks."""
    replica = copy.deepcopy(model)
    if parallelism == "ddp":
        return replication.replicate(replica)
    units = (recipe.shard_units or sharding.default_shard_units)(replica)
    return sharding.shard_model(replica, units, world_size=world_size, device_type="cpu")


def _broadcast(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (a recipe may initialise without a seed)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.detach(), src=0)


def _check_setting(world_size: int, parallelism: str, gradient_sync: str) -> None:
    if world_size < 2 or dist.get_backend() != "gloo":
        raise UsageError(
            "verify_distributed runs in float64 on the CPU: it needs a gloo process group of 2 or "
            "more ranks (torchrun --nproc_per_node=2 -m bigbatch verify; "
            "distributed.setup_process_group(backend='gloo')); on one process use verify"
        )
    if parallelism not in PARALLELISMS:
        raise UsageError(f"parallelism must be {one_of(PARALLELISMS)}, got {parallelism!r}")
    if gradient_sync not in GRADIENT_SYNCS:
        raise UsageError(f"gradient_sync must be {one_of(GRADIENT_SYNCS)}, got {gradient_sync!r}")


def verify_distributed(
    recipe: Recipe,
    *,
    global_batch_size: int,
    micro_batch_size: int | None,
    num_global_batches: int = 2,
    tolerance: float = 1e-6,
    seed: int = 0,
    batchnorm: str = "keep",
    parallelism: Parallelism = "ddp",
    gradient_sync: GradientSync = "auto",
) -> VerifyReport:
    """`verify` with the global batch split over the ranks of the process group; every rank
    calls it and gets the same report.

    Args:
        recipe: a built recipe (the same on every rank); its model is copied, never changed.
        global_batch_size, micro_batch_size, num_global_batches, tolerance, seed, batchnorm:
            as in `bigbatch.tools.verify.verify`; micro_batch_size is per rank.
        parallelism: ``"ddp"`` (DistributedDataParallel) or ``"fsdp"`` (FSDP2).
        gradient_sync: the mode to check; ``"auto"`` checks both (a row each).

    Raises:
        UsageError: no gloo process group of 2 or more ranks, a setting that is not one of the
            choices, or an argument `verify` refuses (sizes also checked over the ranks).
    """
    world_size, rank = distributed.get_world_size(), distributed.get_rank()
    _check_setting(world_size, parallelism, gradient_sync)
    check_arguments(
        recipe, global_batch_size, micro_batch_size, num_global_batches, tolerance, world_size
    )
    model = float64_model(recipe, batchnorm)
    _broadcast(model)
    collate = recipe.collate_fn or default_collate
    splits = distributed_splits(global_batch_size, world_size, micro_batch_size)
    syncs = SYNC_MODES if gradient_sync == "auto" else (gradient_sync,)
    errors = {(name, sync): 0.0 for name in splits for sync in syncs}
    for samples in global_batches(recipe, global_batch_size, num_global_batches, seed):
        expected = full_batch_gradients(
            copy.deepcopy(model), recipe.loss_fn, to_float64(collate(samples))
        )
        for name, split in splits.items():
            window = rank_window(samples, split, rank, collate)
            for sync in syncs:
                replica = _replica(model, recipe, parallelism, world_size)
                actual = accumulated_gradients(replica, recipe.loss_fn, window, gradient_sync=sync)
                errors[name, sync] = max(errors[name, sync], relative_error(actual, expected))
    # Each error's maximum over the ranks (NaN as infinite), so every rank reports and exits alike.
    largest = distributed.agree_on_largest(
        [e if math.isfinite(e) else math.inf for e in errors.values()]
    )
    # Every collective done, gloo's callbacks included, before the caller tears the group down:
    # a gloo thread still busy while the interpreter exits aborts the process.
    dist.barrier()
    rows = []
    for (name, sync), error in zip(errors, largest):
        split = splits[name]
        sizes = tuple(split.micro_batch_sizes(0))
        rows.append(
            SplitResult(
                name, sizes, error, error <= tolerance, world_size, parallelism, sync, split.sizes
            )
        )
    return VerifyReport(
        recipe=recipe.name,
        global_batch_size=global_batch_size,
        num_global_batches=num_global_batches,
        tolerance=tolerance,
        splits=tuple(rows),
        breaking_layers=tuple(breaking_layers(model)),
        world_size=world_size,
    )


def verify_configuration(
    recipe: Recipe,
    world_size: int,
    *,
    global_batch_size: int,
    micro_batch_size: int | None,
    gradient_accumulation_steps: int | None,
    parallelism: str,
    gradient_sync: str,
    **settings: Any,
) -> Any:
    """`verify` on one process (parallelism fsdp included: unsharded), `verify_distributed`
    over the ranks (what `bigbatch verify` runs): the micro-batch given, or derived from the
    accumulation steps."""
    from bigbatch.tools.verify import verify

    micro = micro_batch_size
    if micro is None and gradient_accumulation_steps is not None:
        micro = plan(
            global_batch_size, world_size, gradient_accumulation_steps=gradient_accumulation_steps
        ).micro_batch_size
    settings.update(global_batch_size=global_batch_size, micro_batch_size=micro)
    if world_size > 1:
        return verify_distributed(
            recipe,
            parallelism=parallelism,  # type: ignore[arg-type]
            gradient_sync=gradient_sync,  # type: ignore[arg-type]
            **settings,
        )
    return verify(recipe, **settings)
