"""A rank's batch as its window: one step's micro-batches, equal in count on every rank.

Framework dataloaders hand each rank its share of the global batch. Cutting it into micro-batches
locally could give ranks different window lengths (a short last batch, uneven shares), and under
DDP a rank with fewer micro-steps would leave the others waiting in the gradient sync. So the
ranks agree on the length first (one small all-reduce) and a short rank's window ends with
smaller or empty micro-batches, which the engine runs so that every rank joins the one sync.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bigbatch.core import batches, distributed


def rank_window(batch: Any, micro_batch_size: int | None, *, agree_over_ranks: bool) -> list[Any]:
    """Cut this rank's batch into micro-batches of at most micro_batch_size rows.

    Sizes differ by at most one, and with agree_over_ranks every rank gets the longest window of
    any rank (the shorter ones padded with smaller or empty micro-batches at the end).

    Args:
        batch: this rank's share of one global batch (a tensor or a nested tuple, list or dict of
            tensors sharing their first dimension).
        micro_batch_size: the largest micro-batch; None keeps the batch as one micro-batch.
        agree_over_ranks: take the window length as the maximum over ranks (a collective: every
            rank must call this at the same step).

    Example:
        >>> [len(m) for m in rank_window(torch.arange(7), 3, agree_over_ranks=False)]
        [3, 2, 2]
    """
    if micro_batch_size is not None and (
        isinstance(micro_batch_size, bool)
        or not isinstance(micro_batch_size, int)
        or micro_batch_size < 1
    ):
        raise ValueError(
            f"micro_batch_size must be a positive integer or None, got {micro_batch_size!r}"
        )
    rows = batches.num_rows(batch)
    count = 1 if micro_batch_size is None else max(1, math.ceil(rows / micro_batch_size))
    if agree_over_ranks:
        longest = torch.tensor([float(count)], dtype=torch.float64)
        count = int(distributed.all_reduce_max(longest).item())
    base, extra = divmod(rows, count)
    return batches.split(batch, [base + (index < extra) for index in range(count)])
