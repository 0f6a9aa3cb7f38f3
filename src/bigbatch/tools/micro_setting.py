"""The micro-batch of a run with ``micro_batch_size: auto`` or ``micro_batch_tokens: auto``.

`probe_micro_setting` is what training calls, in either unit: it chooses from measured memory
(`bigbatch.tools.choice.choose_micro_batch`; with ``activation_checkpointing: auto``
`probe_joint_setting`, the joint choice of `bigbatch.tools.joint`) for the planned layout
(`planned_layout`) and broadcasts rank 0's choice, so that every rank runs the same plan
(DESIGN.md invariant 2: every rank runs the same number of micro-steps). `probe_rows` builds
what it measures: the dataset's first samples, or rows of its longest sample (packed or not)
for a run in tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from bigbatch.choices import GradientSync, Optimize
from bigbatch.core import distributed, sharding
from bigbatch.core.engine import LossFn
from bigbatch.data.loader import first_samples
from bigbatch.tools.choice import MicroBatchChoice, choose_micro_batch
from bigbatch.tools.joint import JointChoice, choose_plan
from bigbatch.tools.memory import Batch
from bigbatch.tools.projection import Agree, ShardUnits
from bigbatch.tools.rank_memory import Layout

logger = logging.getLogger(__name__)


def longest_rows(
    dataset: Dataset[Any],
    lengths: np.ndarray,
    collate_fn: Callable[[list[Any]], Any] | None,
    collate_packed: Callable[[list[list[Any]]], Any] | None = None,
) -> Callable[[int], Batch]:
    """``make_rows(r)``: r rows of the longest sample, collated as training does (packed rows
    of one sample each when collate_packed is given).

    Any micro-batch of no more padded tokens than r x longest saves no more for backward
    (shorter rows attend over fewer positions), so the probe of these rows bounds it."""
    longest = dataset[int(np.argmax(lengths))]
    collate = collate_fn or default_collate

    def make_rows(rows: int) -> Batch:
        if collate_packed is not None:
            return collate_packed([[longest] for _ in range(rows)])
        return collate([longest] * rows)

    return make_rows


def probe_rows(
    dataset: Dataset[Any],
    collate_fn: Callable[[list[Any]], Any] | None,
    *,
    lengths: np.ndarray | None = None,
    collate_packed: Callable[[list[list[Any]]], Any] | None = None,
) -> tuple[Callable[[int], Batch], int | None]:
    """What the probe measures, and the tokens of one row.

    In samples (no lengths): the dataset's first n samples, ``(make_rows, None)``. In tokens:
    n rows of the longest sample (packed rows when collate_packed is given), and its length.
    """
    if lengths is None:
        return first_samples(dataset, collate_fn), None
    return longest_rows(dataset, lengths, collate_fn, collate_packed), int(lengths.max())


def planned_layout(
    model: torch.nn.Module, world_size: int, gradient_sync: GradientSync
) -> dict[str, Any]:
    """The probe's ``layout`` and ``agree`` arguments for a model as training runs it.

    The budget is one rank's: under DDP beside its gradient buckets, under FSDP2 beside its
    shards and, with gradient_sync auto, in both sync modes. A sharded model is probed by every
    rank in lockstep (each forward all-gathers), with every measurement agreed over ranks.
    """
    sharded = sharding.is_fsdp(model)
    return {
        "layout": Layout("fsdp" if sharded else "ddp", world_size, gradient_sync),
        "agree": distributed.agree_on_largest if sharded and world_size > 1 else None,
    }


def share_in_rows(global_batch: int, world_size: int, row_tokens: int | None = None) -> int:
    """The most rows a micro-batch may hold: a rank's share of the global batch, ceil(global /
    world_size), in rows of ``row_tokens`` tokens for a global batch in tokens (at least one).

    Example:
        >>> share_in_rows(10, 4), share_in_rows(1000, 2, row_tokens=12)
        (3, 41)
    """
    share = math.ceil(global_batch / world_size)
    return share if row_tokens is None else max(1, share // row_tokens)


def probe_micro_setting(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    *,
    row_tokens: int | None,
    max_rows: int,
    memory_budget: int | str | None,
    optimize: Optimize,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device | str | None,
    layout: Layout | None = None,
    agree: Agree | None = None,
    shard_units: ShardUnits | None = None,
) -> MicroBatchChoice:
    """Choose a run's micro-batch from measured memory; every rank gets rank 0's choice.

    Args:
        make_rows: ``make_rows(n)``, a collated micro-batch of n rows (`probe_rows`).
        row_tokens: padded tokens per row for a choice in tokens; None: rows are samples.
        max_rows: the rank's share of the first global batch, in rows.
        memory_budget: one rank's budget (bytes, ``"8GiB"``); ``"auto"`` or None: 90% of what
            the CUDA device has free.
        layout, agree, shard_units: how the ranks hold the model (`planned_layout`), as for
            `bigbatch.tools.choice.choose_micro_batch`.

    The choice (rows, `MicroBatchChoice.value` in the unit, the sync mode, the reason) is logged
    once, on rank 0.
    """
    choice = choose_micro_batch(
        module,
        loss_fn,
        make_rows,
        max_rows=max_rows,
        row_tokens=row_tokens,
        memory_budget_bytes=None if memory_budget == "auto" else memory_budget,
        optimize=optimize,
        optimizer=optimizer,
        device=device,
        layout=layout,
        shard_units=shard_units,
        agree=agree,
    )
    choice = distributed.rank_0_value(choice)  # every rank must run the same plan
    if distributed.is_main_process():
        name = "micro_batch_size" if row_tokens is None else "micro_batch_tokens"
        logger.info("%s auto: %d (%s)", name, choice.value, choice.reason)
    return choice


def probe_joint_setting(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    *,
    units: list[torch.nn.Module] | None,
    row_tokens: int | None,
    max_rows: int,
    memory_budget: int | str | None,
    optimize: Optimize,
    **choose: Any,
) -> JointChoice:
    """``activation_checkpointing: auto``: the checkpointing policy and micro setting together
    (`bigbatch.tools.joint.choose_plan` over ``units``, None: the blocks FSDP2 shards); every
    rank gets rank 0's choice, which the caller applies (the model is left with this rank's).

    The other arguments as for `probe_micro_setting`.
    """
    joint = choose_plan(
        module, loss_fn, make_rows, max_rows=max_rows, row_tokens=row_tokens,
        memory_budget_bytes=None if memory_budget == "auto" else memory_budget,
        optimize=optimize, units=units, **choose,
    )  # fmt: skip
    joint = distributed.rank_0_value(joint)  # every rank must run the same plan
    if distributed.is_main_process():
        name = "micro_batch_size" if row_tokens is None else "micro_batch_tokens"
        logger.info(
            "activation_checkpointing auto: %s, %s auto: %d (%s)",
            joint.activation_checkpointing, name, joint.choice.value, joint.reason,
        )  # fmt: skip
    return joint
