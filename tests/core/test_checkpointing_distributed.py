"""Activation checkpointing under DDP and FSDP2 on 2 gloo processes: the full-batch weights.

Checkpointing is applied before DDP wraps the model or `fully_shard` shards its blocks (what
`parallelism: fsdp` does); every configuration runs inside one launch of 2 processes, each rank
on its own uneven micro-batches, and is compared with the float64 full-batch reference, its
noise-scale statistics with those of the same replication without checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch import Accumulator, apply_activation_checkpointing
from tests.core.test_checkpointing import LR, Net, per_item_losses
from tests.distributed_helpers import run_processes
from tests.reference import full_batch_sgd, relative_error

STEPS = 2
SPLITS = [[3, 2], [1, 4, 2]]  # rows of each rank's micro-batches: 12 rows per global batch
# (replication, policy, gradient sync, checkpointing applied before or after DDP / fully_shard:
# after is how a memory probe sets a candidate on the prepared model)
CONFIGS = [
    ("ddp", "none", "step_end", "before"),
    ("ddp", "full", "step_end", "before"),
    ("ddp", "every_2", "step_end", "before"),
    ("ddp", "every_2", "step_end", "after"),
    ("fsdp", "none", "every_micro_batch", "before"),
    ("fsdp", "full", "step_end", "before"),
    ("fsdp", "every_2", "every_micro_batch", "before"),
    ("fsdp", "full", "every_micro_batch", "after"),
]


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + step)
    rows = sum(map(sum, SPLITS))
    return (
        torch.randn(rows, 4, generator=generator, dtype=torch.float64),
        torch.randn(rows, 2, generator=generator, dtype=torch.float64),
    )


def window(rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = global_batch(step)
    offset = sum(map(sum, SPLITS[:rank]))
    micro_batches = []
    for rows in SPLITS[rank]:
        micro_batches.append((x[offset : offset + rows], y[offset : offset + rows]))
        offset += rows
    return micro_batches


def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    losses, _ = per_item_losses(model, batch)
    return losses.sum(), len(losses)


def train_one(
    rank: int, world_size: int, parallelism: str, policy: str, sync: str, when: str
) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    module = Net().double()
    wrapped = apply_activation_checkpointing(module, policy if when == "before" else "every_3")
    if parallelism == "ddp":
        model: torch.nn.Module = DistributedDataParallel(module)
    else:
        mesh = init_device_mesh("cpu", (world_size,))
        for block in module.blocks:
            fully_shard(block, mesh=mesh)
        model = fully_shard(module, mesh=mesh)
    if when == "after":  # replaces the policy applied before
        wrapped = apply_activation_checkpointing(model, policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    accumulator = Accumulator(model, optimizer, gradient_sync=sync, measure_noise_scale=True)
    for step in range(STEPS):
        assert not accumulator.step(window(rank, step), loss_fn).skipped
    full = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in module.named_parameters()
    }
    return {
        "weights": full,
        "calls": [block.calls for block in module.blocks],
        "wrapped": [list(module.blocks).index(unit) for unit in wrapped],
        "noise": accumulator.noise_scale(),
    }


def train_sync_batchnorm(rank: int, world_size: int, policy: str) -> dict:
    """DDP with batchnorm sync (statistics over both ranks, collectives in every forward, and
    so in every recompute): the state after the steps, running statistics included."""
    from torch.nn.parallel import DistributedDataParallel

    from bigbatch.core import batchnorm

    module = batchnorm.apply_policy(Net(batchnorm=True).double(), "sync", world_size=world_size)
    wrapped = apply_activation_checkpointing(module, policy)
    model = DistributedDataParallel(module)
    accumulator = Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
    for step in range(STEPS):
        # Micro-batches of 2 or more rows: BatchNorm needs two values per channel in training.
        accumulator.step([b for b in window(rank, step) if len(b[0]) > 1], loss_fn)
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "calls": module.blocks[0].calls,
        "wrapped": len(wrapped),
    }


def train_all(rank: int, world_size: int) -> tuple[list[dict], list[dict]]:
    trained = [train_one(rank, world_size, *config) for config in CONFIGS]
    synced = [train_sync_batchnorm(rank, world_size, policy) for policy in ("none", "full")]
    return trained, synced


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_and_fsdp2_with_checkpointing_match_the_full_batch_reference():
    both = run_processes(train_all, 2)
    results = [trained for trained, _ in both]
    global_batches = [global_batch(step) for step in range(STEPS)]
    expected = full_batch_sgd(Net().double(), global_batches, per_item_losses, LR)
    for index, (parallelism, policy, _, _) in enumerate(CONFIGS):
        for rank, per_config in enumerate(results):
            result = per_config[index]
            assert relative_error(result["weights"], expected) < 1e-12, (parallelism, policy)
            wrapped = {"none": [], "full": [0, 1, 2, 3, 4], "every_2": [0, 2, 4]}[policy]
            assert result["wrapped"] == wrapped
            # Forwards of the STEPS windows, plus one recompute each for the checkpointed units
            # (FSDP2 runs as many micro-steps on every rank; DDP with step_end skips none here).
            micro_steps = STEPS * (3 if parallelism == "fsdp" else len(SPLITS[rank]))
            assert result["calls"][0] == (2 if wrapped else 1) * micro_steps
            assert result["calls"][1] == micro_steps * (2 if 1 in wrapped else 1)
            # The noise-scale hooks see each micro-batch's gradient once, as without checkpointing
            # (under FSDP2 they hook the gathered parameters from each unit's forward).
            plain = next(
                per_config[i]["noise"]
                for i, (other, other_policy, _, _) in enumerate(CONFIGS)
                if other == parallelism and other_policy == "none"
            )
            noise = result["noise"]
            assert noise.gradient_sq_norm == pytest.approx(plain.gradient_sq_norm, rel=1e-10)
            assert noise.trace_covariance == pytest.approx(plain.trace_covariance, rel=1e-10)
    for _, (plain, checkpointed) in both:
        # batchnorm sync: the same weights and running statistics as without checkpointing.
        assert checkpointed["wrapped"] == 5 and checkpointed["calls"] == 2 * plain["calls"] > 0
        for name, value in plain["state"].items():
            assert torch.allclose(checkpointed["state"][name], value, rtol=1e-12, atol=0), name
