"""Out-of-memory in a micro-step: the window is redone smaller, nothing lost or counted twice."""

from __future__ import annotations

import copy

import pytest
import torch

import bigbatch
from tests import models
from tests.distributed_helpers import run_processes
from tests.reference import full_batch_sgd, relative_error


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limit):
        ctx.rows, ctx.limit = x.shape[0], limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.rows > ctx.limit:
            raise torch.OutOfMemoryError(f"simulated: {ctx.rows} rows in backward")
        return grad, None


class MemoryLimitedModel(torch.nn.Module):
    """The token model, raising torch.OutOfMemoryError above `limit` rows (forward or backward)."""

    def __init__(self, limit: int, where: str, active: bool = True) -> None:
        super().__init__()
        self.inner = models.token_model()
        self.limit, self.where, self.active = limit, where, active
        self.failures = 0

    def forward(self, tokens):
        too_big = self.active and tokens.shape[0] > self.limit
        if too_big and self.where == "forward":
            self.failures += 1
            raise torch.OutOfMemoryError(f"simulated: {tokens.shape[0]} rows in forward")
        hidden = self.inner(tokens)
        if too_big and self.where == "backward":
            self.failures += 1
            hidden = _FailingBackward.apply(hidden, self.limit)
        return hidden


def windows(num_steps: int, micro: int, accumulation: int):
    tokens, labels = models.token_data(num_steps * micro * accumulation, seed=5)
    size = micro * accumulation
    for step in range(num_steps):
        t, y = tokens[step * size : (step + 1) * size], labels[step * size : (step + 1) * size]
        yield [(t[i : i + micro], y[i : i + micro]) for i in range(0, size, micro)]


def reference_weights(num_steps: int, micro: int, accumulation: int, lr: float = 0.5):
    global_batches = [
        (torch.cat([w[0] for w in window]), torch.cat([w[1] for w in window]))
        for window in windows(num_steps, micro, accumulation)
    ]
    return full_batch_sgd(models.token_model(), global_batches, models.token_item_losses, lr)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_redoes_the_window_smaller_and_matches(where, caplog):
    model = MemoryLimitedModel(limit=3, where=where)
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5))
    for window in windows(num_steps=3, micro=8, accumulation=2):
        result = accumulator.step(window, models.token_loss_fn)
        assert not result.skipped
    assert accumulator.max_micro_batch_size == 2  # 8 -> 4 -> 2, kept for later steps
    assert model.failures == 2  # only the first window failed (twice)
    expected = reference_weights(3, 8, 2)
    actual = {n.removeprefix("inner."): p.detach() for n, p in model.named_parameters()}
    assert relative_error(actual, expected) < 1e-12
    assert "out of memory with micro-batches of 8" in caplog.text


def test_out_of_memory_at_micro_batch_one_gives_up_clearly():
    model = MemoryLimitedModel(limit=0, where="forward")
    before = copy.deepcopy(model.state_dict())
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5))
    with pytest.raises(torch.OutOfMemoryError, match="micro_batch_size 1"):
        accumulator.step(next(windows(1, 4, 2)), models.token_loss_fn)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def _ddp_rank(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    # Only rank 0 runs out of memory; both must agree on the smaller size and not hang.
    model = MemoryLimitedModel(limit=3, where="forward", active=rank == 0)
    ddp = DistributedDataParallel(model)
    accumulator = bigbatch.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.5))
    for window in windows(num_steps=2, micro=8, accumulation=4):
        mine = window[rank * 2 : rank * 2 + 2]  # rank r takes micro-batches 2r, 2r+1
        accumulator.step(mine, models.token_loss_fn)
    return {
        "weights": {
            n.removeprefix("inner."): p.detach().clone() for n, p in model.named_parameters()
        },
        "max_micro": accumulator.max_micro_batch_size,
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_out_of_memory_on_one_ddp_rank_is_agreed_and_exact():
    results = run_processes(_ddp_rank, 2)
    expected = reference_weights(2, 8, 4)
    for result in results:
        assert result["max_micro"] == 2
        assert relative_error(result["weights"], expected) < 1e-12
