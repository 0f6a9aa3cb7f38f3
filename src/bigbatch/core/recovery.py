"""Recovery from out-of-memory: the same items again, in smaller micro-batches.

When a micro-step raises `torch.OutOfMemoryError`, the engine discards the window's partial
gradients and redoes it with micro-batches of half the size. The new size is agreed over ranks
(one small MAX all-reduce, only on this rare path) so every rank re-splits alike and none hangs.
No item is lost or counted twice: a re-split keeps every item, in order.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from bigbatch.core import batches, distributed

logger = logging.getLogger(__name__)


def resplit(micro_batches: list[Any], max_rows: int) -> list[Any]:
    """The same items in the same order, in micro-batches of at most max_rows rows."""
    if all(batches.num_rows(micro_batch) <= max_rows for micro_batch in micro_batches):
        return micro_batches
    return [
        piece for micro_batch in micro_batches for piece in batches.chunk(micro_batch, max_rows)
    ]


def halved_micro_batch_size(
    micro_batches: list[Any], device: torch.device, *, agree_over_ranks: bool
) -> int:
    """Free cached memory and return half the largest micro-batch (the largest over ranks).

    Raises:
        torch.OutOfMemoryError: the micro-batches already hold one sample each.
    """
    largest = torch.tensor(
        [float(max(batches.num_rows(micro_batch) for micro_batch in micro_batches))],
        device=device,
    )
    if agree_over_ranks:
        distributed.all_reduce_max(largest)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    largest_rows = int(largest.item())
    if largest_rows <= 1:
        raise torch.OutOfMemoryError(
            "out of memory at micro_batch_size 1: a single sample does not fit. Use precision "
            "bf16, a shorter sequence or a smaller model, or a device with more memory"
        )
    smaller = (largest_rows + 1) // 2
    logger.warning(
        "out of memory with micro-batches of %d: redoing the window with micro_batch_size %d "
        "(kept for later steps)",
        largest_rows,
        smaller,
    )
    return smaller


def out_of_memory_during_sync(rows: int) -> torch.OutOfMemoryError:
    """The error for the one case that cannot be redone: out of memory inside DDP's sync."""
    return torch.OutOfMemoryError(
        f"out of memory in the backward that synchronises gradients (DDP, micro-batch of {rows}): "
        "the other ranks are already in the all-reduce, so the window cannot be redone. Set a "
        "smaller micro_batch_size (or micro_batch_size: auto with a memory_budget)"
    )
