"""FSDP2 on 2 and 3 gloo processes: the same weights as one process on the whole global batch.

Each rank holds different rows, a different number of micro-batches (some empty) and different
masked items; clipping is on. The reference is plain autograd on one float64 model over the
global batch, with torch's clip coefficient. Gradient reduce-scatters are counted per step.
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bigbatch
from tests.distributed_helpers import free_port

STEPS = 3
LR = 0.5
MAX_GRAD_NORM = 0.3
GLOBAL_ROWS = 13
# Rows of each rank's micro-batches, per world size: uneven, with empty micro-batches.
SPLITS = {
    2: [[2, 3], [4, 0, 2, 1, 1]],
    3: [[2, 3], [1, 0, 2, 1], [4]],
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).double()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_ROWS, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(GLOBAL_ROWS, 3, generator=generator, dtype=torch.float64)
    mask = (torch.rand(GLOBAL_ROWS, generator=generator) < 0.7).double()
    mask[0] = 1.0
    return x, y, mask


def loss_fn(model, micro_batch):
    x, y, mask = micro_batch
    per_item = (model(x) - y).pow(2).mean(dim=1)
    return (per_item * mask).sum(), mask.sum()


def reference_weights() -> dict[str, torch.Tensor]:
    """Plain autograd: one float64 full-batch step per global batch, torch's clipping, SGD."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y, mask = global_batch(step)
        optimizer.zero_grad()
        per_item = (model(x) - y).pow(2).mean(dim=1)
        ((per_item * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def windows(rank: int, world: int, step: int) -> list:
    x, y, mask = global_batch(step)
    sizes = SPLITS[world]
    offset = sum(sum(rank_sizes) for rank_sizes in sizes[:rank])
    window = []
    for size in sizes[rank]:
        window.append(
            (x[offset : offset + size], y[offset : offset + size], mask[offset : offset + size])
        )
        offset += size
    return window


def _train(rank: int, world: int, options: dict, out_dir: str) -> None:
    """options: gradient_sync, and optionally precision, dtype, ddp (instead of FSDP) and
    out_of_memory_rank (that rank's loss_fn raises once on a micro-batch above 2 rows)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        counts = {"reduce_scatter": 0}
        for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            original = getattr(dist, name, None)
            if original is None:
                continue

            def counting(*args, _original=original, **kwargs):
                counts["reduce_scatter"] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counting)
        dtype = options.get("dtype", torch.float64)
        model = make_model().to(dtype)
        blocks = [module for module in model if isinstance(module, torch.nn.Linear)]
        if options.get("ddp"):
            model = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (world,))
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        accumulator = bigbatch.Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=LR),
            max_grad_norm=MAX_GRAD_NORM,
            gradient_sync=options["gradient_sync"],
            precision=options.get("precision", "fp32"),
        )
        failed = {"done": rank != options.get("out_of_memory_rank")}

        def user_loss(model, micro_batch):
            if not failed["done"] and micro_batch[0].shape[0] > 2:
                failed["done"] = True
                raise torch.OutOfMemoryError("simulated")
            x, y, mask = micro_batch
            return loss_fn(model, (x.to(dtype), y.to(dtype), mask.to(dtype)))

        per_step, micro_steps = [], []
        for step in range(STEPS):
            before = counts["reduce_scatter"]
            result = accumulator.step(windows(rank, world, step), user_loss)
            assert not result.skipped
            per_step.append(counts["reduce_scatter"] - before)
            micro_steps.append(result.micro_batches)
        weights = {
            name.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
            .detach()
            .double()
            .clone()
            for name, p in model.named_parameters()
        }
        torch.save(
            {
                "weights": weights,
                "reduce_scatters": per_step,
                "blocks": len(blocks) + 1,
                "max_micro_batch_size": accumulator.max_micro_batch_size,
                "gradient_sync": accumulator.gradient_sync,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # every collective done before teardown (gloo threads, callbacks)
    finally:
        dist.destroy_process_group()


def run(world: int, gradient_sync: str, **options) -> list[dict]:
    options["gradient_sync"] = gradient_sync
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_train, args=(world, options, out_dir), nprocs=world, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)
        ]


def relative_error(actual: dict, expected: dict) -> float:
    difference = sum(float((actual[k] - expected[k]).pow(2).sum()) for k in expected)
    return (difference / sum(float(expected[k].pow(2).sum()) for k in expected)) ** 0.5


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("gradient_sync", ["every_micro_batch", "step_end"])
def test_fsdp_matches_one_full_batch_process(world, gradient_sync):
    results = run(world, gradient_sync)
    expected = reference_weights()
    micro_steps = max(len(sizes) for sizes in SPLITS[world])
    for result in results:
        assert relative_error(result["weights"], expected) < 1e-10
        # FSDP modules whose parameters get a gradient: the three Linear blocks (the root owns
        # none, so it reduce-scatters nothing).
        per_micro_step = result["blocks"] - 1
        expected_calls = per_micro_step * (
            micro_steps if gradient_sync == "every_micro_batch" else 1
        )
        assert result["reduce_scatters"] == [expected_calls] * STEPS


def test_reference_clips():
    # The clipping must matter for the comparison to test it.
    model = make_model()
    x, y, mask = global_batch(0)
    per_item = (model(x) - y).pow(2).mean(dim=1)
    ((per_item * mask).sum() / mask.sum()).backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > MAX_GRAD_NORM


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_out_of_memory_is_redone_alike_on_every_rank():
    # Rank 1 runs out of memory in its first window: both ranks redo it in halves.
    results = run(2, "every_micro_batch", out_of_memory_rank=1)
    expected = reference_weights()
    for result in results:
        assert relative_error(result["weights"], expected) < 1e-10
        assert result["max_micro_batch_size"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_mixed_precision(precision):
    results = run(2, "step_end", precision=precision, dtype=torch.float32)
    expected = reference_weights()
    for result in results:
        assert relative_error(result["weights"], expected) < 2e-2
    assert relative_error(results[0]["weights"], results[1]["weights"]) == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_every_micro_batch_matches_one_full_batch_process():
    results = run(2, "every_micro_batch", ddp=True)
    expected = reference_weights()
    for result in results:
        assert relative_error(result["weights"], expected) < 1e-10


def test_auto_gradient_sync_chooses_from_the_memory_budget(caplog):
    from bigbatch.core.sharding import choose_gradient_sync

    parameters = list(make_model().parameters())
    needed = sum(p.numel() * 8 for p in parameters)
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="bigbatch.core.sharding"):
        fits = choose_gradient_sync(
            "auto", sharded=True, parameters=parameters, device=cpu, memory_budget_bytes=needed
        )
        tight = choose_gradient_sync(
            "auto", sharded=True, parameters=parameters, device=cpu, memory_budget_bytes=needed - 1
        )
    assert (fits, tight) == ("step_end", "every_micro_batch")
    assert "does not fit" in caplog.text
    assert (
        choose_gradient_sync(
            "auto", sharded=True, parameters=parameters, device=cpu, memory_budget_bytes=None
        )
        == "step_end"
    )  # CPU: assumed to fit
    assert (
        choose_gradient_sync(
            "auto", sharded=False, parameters=parameters, device=cpu, memory_budget_bytes=1
        )
        == "step_end"
    )  # replicated: a full gradient is held anyway
    with pytest.raises(ValueError, match="gradient_sync"):
        choose_gradient_sync(
            "never", sharded=True, parameters=parameters, device=cpu, memory_budget_bytes=None
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_bf16_parameters_accumulate_in_fp32_buffers():
    # accumulation_dtype auto: fp32 buffers, summed over ranks by the engine (DDP under no_sync).
    results = run(2, "step_end", ddp=True, dtype=torch.bfloat16)
    expected = reference_weights()
    for result in results:
        assert relative_error(result["weights"], expected) < 2e-2
    assert relative_error(results[0]["weights"], results[1]["weights"]) == 0.0
