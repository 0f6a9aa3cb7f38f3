"""Per-rank memory (bigbatch.tools.rank_memory) against what FSDP2 ranks really hold.

The reference is the tensors themselves: on 2 and 3 gloo processes, the storages of each rank's
parameter shards, gradient shards and AdamW state after a step, and the unsharded gradients FSDP2
holds during a step_end window. The per-rank choice is checked twice: probed on the shards by every
rank in lockstep, and projected from the whole model on one process.
"""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch import Accumulator
from bigbatch.core import distributed, sharding
from bigbatch.tools import autobatch
from bigbatch.tools.memory import probe, tensor_bytes
from bigbatch.tools.rank_memory import Layout, ModelSizes, model_sizes, rank_memory
from tests.distributed_helpers import run_processes

WIDTH, HIDDEN = 10, 14  # rows not divisible by 3: FSDP2 pads the shards


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(WIDTH, HIDDEN), torch.nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(5, WIDTH)
        self.blocks = torch.nn.ModuleList([Block(), Block(), Block()])
        self.head = torch.nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    x, y = batch
    return (model(x) - y).pow(2).sum(), y.numel()


def make_batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    return torch.randn(rows, 5, generator=generator), torch.randn(rows, 3, generator=generator)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.blocks)  # type: ignore[arg-type]


def _sharded(world: int) -> Model:
    model = Model()
    sharding.shard_model(model, shard_units(model), world_size=world, device_type="cpu")
    return model


def unsharded_gradient_bytes_held(model: torch.nn.Module) -> int:
    """The unsharded gradients FSDP2 holds now (its internals: read, not changed)."""
    return sum(g.numel() * g.element_size() for g in sharding.unsharded_gradients(model))


def _held(rank: int, world: int, mode: str) -> dict[str, object]:
    model = _sharded(world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sizes = model_sizes(model, optimizer)  # before any step: AdamW's state from its type
    accumulator = Accumulator(model, optimizer, gradient_sync=mode)  # type: ignore[arg-type]
    held: dict[str, int] = {"unsharded": 0, "peak": 0}
    backward = accumulator._backward

    def measured_backward(*args):  # the most gradient held after any backward
        backward(*args)
        unsharded = unsharded_gradient_bytes_held(model)
        sharded = tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])
        held["unsharded"] = max(held["unsharded"], unsharded)
        held["peak"] = max(held["peak"], unsharded + sharded)

    accumulator._backward = measured_backward  # type: ignore[method-assign]

    def before_step(*_):
        held["gradients"] = tensor_bytes([p.grad for p in model.parameters()])

    optimizer.register_step_pre_hook(before_step)
    window = [make_batch(rank + 2 + i) for i in range(3)]
    accumulator.step(window, loss_fn)
    state = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return {
        "sizes": sizes,
        "parameters": tensor_bytes(list(model.parameters())),
        "gradients": held["gradients"],
        "optimizer": tensor_bytes(state),
        "unsharded": held["unsharded"],
        "peak": held["peak"],
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["every_micro_batch", "step_end"])
def test_prediction_equals_the_tensors_each_rank_holds(world: int, mode: str) -> None:
    whole_model = Model()
    whole_optimizer = torch.optim.AdamW(whole_model.parameters(), lr=1e-3)
    whole = model_sizes(whole_model, whole_optimizer, shard_units)
    predicted = rank_memory(whole, Layout("fsdp", world, mode), activation_bytes=0)
    ranks = run_processes(_held, world, mode)
    for rank, held in enumerate(ranks):
        sizes = held["sizes"]
        assert isinstance(sizes, ModelSizes)
        assert sizes == whole, f"rank {rank}: sizes read from the shards differ"
        # Parameter and gradient shards are padded alike on every rank.
        assert held["parameters"] == predicted.parameters, rank
        assert held["gradients"] == whole.parameter_bytes(world, trained_only=True), rank
        assert held["unsharded"] == predicted.unsharded_gradient, rank
        # After any backward: the sharded gradient (every_micro_batch) or the unsharded one.
        assert held["peak"] == predicted.gradients + predicted.unsharded_gradient, rank
    # AdamW's state follows the unpadded shards: the prediction is the fullest rank's (rank 0).
    assert ranks[0]["optimizer"] == predicted.optimizer
    assert all(held["optimizer"] <= predicted.optimizer for held in ranks)
    # The padded shards: dim 0 in ceil(rows / world), e.g. HIDDEN=14 rows -> 5 per rank on 3.
    total = sum(p.numel() * p.element_size() for p in whole_model.parameters())
    assert predicted.parameters >= total / world
    if mode == "step_end":
        assert predicted.unsharded_gradient == total


def test_ddp_and_one_process_hold_the_whole_model_and_one_gradient() -> None:
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sizes = model_sizes(model, optimizer, shard_units)
    whole = sum(p.numel() * 4 for p in model.parameters())
    one = rank_memory(sizes, Layout("fsdp", 1), activation_bytes=100)
    assert (one.parameters, one.gradients, one.optimizer, one.in_flight) == (whole,) * 3 + (0,)
    assert one.total == 3 * whole + 100
    # DDP runs with gradient_as_bucket_view: its buckets are the gradient, not a second copy
    ddp = rank_memory(sizes, Layout("ddp", 4), activation_bytes=100)
    assert ddp.in_flight == 0 and ddp.total == 3 * whole + 100
    # FSDP's in-flight units: the root's own parameters, two largest units and one gradient.
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    fsdp = rank_memory(sizes, Layout("fsdp", 4, "every_micro_batch"), activation_bytes=0)
    assert fsdp.in_flight == (whole - 3 * block) + 2 * block + block


def _probed(rank: int, world: int, budget: int) -> dict[str, object]:
    model = _sharded(world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sharded_probe = probe(model, loss_fn, make_batch, [1, 2, 4, 8], optimizer=optimizer)
    choice = autobatch.choose_micro_batch_size(
        model, loss_fn, make_batch, max_micro_batch_size=64, memory_budget_bytes=budget,
        optimizer=optimizer, layout=Layout("fsdp", world, "auto"),
        agree=distributed.agree_on_largest,
    )  # fmt: skip
    return {"probe": sharded_probe, "choice": (choice.micro_batch_size, choice.gradient_sync)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lockstep_probe_of_the_shards_agrees_with_the_projection_of_the_whole_model() -> None:
    world = 2
    model = Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    whole_probe = probe(model, loss_fn, make_batch, [1, 2, 4, 8], optimizer=optimizer)
    layout = Layout("fsdp", world, "auto")

    def choose(budget: int) -> tuple[int, str | None]:
        choice = autobatch.choose_micro_batch_size(
            model, loss_fn, make_batch, max_micro_batch_size=64, memory_budget_bytes=budget,
            optimizer=optimizer, layout=layout, shard_units=shard_units,
        )  # fmt: skip
        return choice.micro_batch_size, choice.gradient_sync

    sizes = model_sizes(model, optimizer, shard_units)
    step_end = rank_memory(sizes, Layout("fsdp", world, "step_end"), activation_bytes=0)
    per_sample = whole_probe.bytes_per_sample
    constant = whole_probe.fixed_bytes - whole_probe.model_bytes

    def budget_for(rows: int) -> int:  # step_end fits `rows` beside the unsharded gradient
        return math.ceil((step_end.state + constant + (rows + 0.5) * per_sample) * 1.1)

    # The unsharded gradient is worth about 11 rows of activations here. With room for 34 rows
    # under step_end, every_micro_batch fits more, but 64 rows take 2 micro-steps either way.
    micro, sync = choose(budget_for(34))
    assert sync == "step_end" and 32 <= micro <= 34
    # With room for 20 (4 micro-steps), every_micro_batch's 30 rows or so need 3 instead.
    micro, sync = choose(budget_for(20))
    assert sync == "every_micro_batch" and math.ceil(64 / micro) == 3
    budget = budget_for(20)
    projected = (micro, sync)
    for result in run_processes(_probed, world, budget):
        sharded_probe = result["probe"]
        # Activations do not depend on the sharding; the shards' state is about 1/world.
        assert sharded_probe.bytes_per_sample == pytest.approx(per_sample, rel=1e-9)
        assert sharded_probe.model_bytes < whole_probe.model_bytes * 0.75
        assert result["choice"] == projected
