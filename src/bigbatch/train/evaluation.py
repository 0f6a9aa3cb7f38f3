"""Evaluation: the loss (sum over items / items) and the recipe's metrics on the eval set.

Every rank evaluates its share of the eval set (`bigbatch.data.loader.eval_batches`) under the
run's precision and reads the loss as the engine does (`bigbatch.core.loss`), so a scalar mean
and a (sum, count) pair give the same figure; the sums are reduced over ranks once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from bigbatch.choices import Precision
from bigbatch.core import batches, distributed
from bigbatch.core.loss import LossFn, read_loss_output
from bigbatch.core.precision import autocast
from bigbatch.data.loader import eval_batches
from bigbatch.recipes import EvalFn


def evaluate(
    module: torch.nn.Module,
    loss_fn: LossFn,
    eval_fn: EvalFn | None,
    dataset: Dataset[Any],
    *,
    micro_batch_size: int,
    precision: Precision = "fp32",
    collate_fn: Callable[[list[Any]], Any] | None = None,
    equal_forwards: bool = False,
) -> dict[str, float]:
    """Loss (loss_fn sums / items) and eval_fn metrics on this rank's share, reduced over ranks.

    equal_forwards: every rank runs as many forwards (FSDP: each forward all-gathers); a rank
    with fewer micro-batches runs forwards on a stand-in whose results are not counted.
    """
    device = next(module.parameters()).device
    sums: dict[str, list[float]] = {}
    module.eval()
    shares: Any = eval_batches(
        dataset,
        micro_batch_size=micro_batch_size,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        collate_fn=collate_fn,
    )
    stand_ins = 0
    if equal_forwards and distributed.is_initialized():
        shares = list(shares)
        most = torch.tensor([len(shares)], dtype=torch.int64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        stand_ins = int(most.item()) - len(shares)
    with torch.no_grad(), autocast(precision, device.type):
        if stand_ins:
            collate = collate_fn or torch.utils.data.default_collate
            stand_in = batches.to_device(collate([dataset[0]]), device)
            for _ in range(stand_ins):
                loss_fn(module, stand_in)
                if eval_fn is not None:
                    eval_fn(module, stand_in)
        for micro_batch in shares:
            micro_batch = batches.to_device(micro_batch, device)
            rows = batches.num_rows(micro_batch)
            loss_sum, count = read_loss_output(loss_fn(module, micro_batch), rows, device)
            values = {"loss": (float(loss_sum), float(count))}
            if eval_fn is not None:
                values.update(eval_fn(module, micro_batch))
            for key, (total, num) in values.items():
                entry = sums.setdefault(key, [0.0, 0.0])
                entry[0] += float(total)
                entry[1] += float(num)
    module.train()
    keys = distributed.rank_0_value(sorted(sums))  # rank 0 always has eval items
    reduced = torch.tensor(
        [sums.get(key, [0.0, 0.0]) for key in keys], dtype=torch.float64, device=device
    )
    distributed.all_reduce_sum(reduced)
    return {key: float(s / c) if c else math.nan for key, (s, c) in zip(keys, reduced)}
