"""A rank with nothing left joins DDP's one gradient sync with a stand-in any model accepts.

A transformers GPT-2 cannot forward 0 rows, so a short last window (or an uneven plan) used to
crash the rank whose last micro-batch is empty. The stand-in is one real row of the window whose
loss counts zero items and is weighed by zero: the step stays equal to one full-batch step,
computed here in float64 with plain autograd on one process.
"""

from __future__ import annotations

import pytest
import torch

from tests import hf_models
from tests.distributed_helpers import run_processes

pytest.importorskip("transformers")

ROWS = {0: (0, 3), 1: (3, 4)}  # rank 0 holds 3 rows, rank 1 one row and then an empty micro-batch
SIZES = {0: [2, 1], 1: [1, 0]}
LR = 0.5


def token_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token losses and their count; no special case for 0 rows (GPT-2 fails there)."""
    losses, mask = hf_models.causal_item_losses(model, batch)
    return losses.sum(), mask.sum()


def ddp_step(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    import bigbatch

    model = DistributedDataParallel(hf_models.gpt2())
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
    batch = hf_models.causal_batch(4)
    start, stop = ROWS[rank]
    window, offset = [], start
    for size in SIZES[rank]:
        window.append(hf_models.rows_of(batch, offset, offset + size))
        offset += size
    accumulator.step(window, token_loss)
    return {name: value.detach().clone() for name, value in model.module.state_dict().items()}


def full_batch_step() -> dict[str, torch.Tensor]:
    model = hf_models.gpt2()
    losses, mask = hf_models.causal_item_losses(model, hf_models.causal_batch(4))
    (losses.sum() / mask.sum()).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= LR * parameter.grad
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_gpt2_cannot_forward_zero_rows():
    """Why the stand-in exists (if transformers learns to, the stand-in stays harmless)."""
    batch = hf_models.rows_of(hf_models.causal_batch(4), 0, 0)
    with pytest.raises(RuntimeError):
        token_loss(hf_models.gpt2(), batch)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpt2_under_two_process_ddp_with_an_empty_last_micro_batch_is_one_full_batch_step():
    expected = full_batch_step()
    for weights in run_processes(ddp_step, 2):
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-10, atol=1e-12, msg=name)
