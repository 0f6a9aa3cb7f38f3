"""bigbatch.integrations.accelerate: exact steps on accelerator.prepare'd objects, 1 and 2 ranks.

Reference: plain float64 full-batch SGD on the same global batches (tests/reference.py), the
per-token losses computed from sliced logits (tests/hf_models.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from bigbatch.core.divergence import RankDivergenceError  # noqa: E402
from bigbatch.integrations.accelerate import AcceleratedAccumulator  # noqa: E402
from bigbatch.integrations.huggingface import causal_lm_loss  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.distributed_helpers import run_processes  # noqa: E402
from tests.reference import full_batch_sgd, relative_error  # noqa: E402

GLOBAL_BATCH = 10
STEPS = 3
LR = 0.5


def data() -> dict[str, torch.Tensor]:
    return hf_models.causal_batch(GLOBAL_BATCH * STEPS, seed=9)


def reference_weights() -> dict[str, torch.Tensor]:
    batches = hf_models.global_batches(data(), GLOBAL_BATCH)
    return full_batch_sgd(hf_models.gpt2(), batches, hf_models.causal_item_losses, LR)


def fresh_accelerator(**options):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate keeps one per process
    return Accelerator(cpu=True, **options)


def train(rank: int, world_size: int, micro: int, desync: bool = False) -> dict:
    """STEPS exact steps; the loader's batch is this rank's share of one global batch."""
    accelerator = fresh_accelerator()
    assert accelerator.num_processes == world_size
    model = hf_models.gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(
        hf_models.Rows(data()), batch_size=GLOBAL_BATCH // world_size
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if desync and rank == 1:
        with torch.no_grad():
            next(model.parameters()).add_(1e-6)  # after prepare's broadcast: rank 1 alone
    accumulator = AcceleratedAccumulator(accelerator, model, optimizer, micro_batch_size=micro)
    items, error = [], None
    try:
        for batch in loader:
            items.append(accumulator.step(batch, causal_lm_loss).num_items)
    except RankDivergenceError as caught:
        error = str(caught)
    unwrapped = accelerator.unwrap_model(model)
    return {
        "weights": {n: p.detach().clone() for n, p in unwrapped.named_parameters()},
        "items": items,
        "error": error,
    }


@pytest.mark.parametrize("micro", [10, 3, 1])
def test_one_process_matches_the_full_batch(micro):
    result = train(0, 1, micro)
    assert len(result["items"]) == STEPS
    assert relative_error(result["weights"], reference_weights()) < 1e-12


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("micro", [2, 5])
def test_two_processes_match_the_full_batch(micro):
    results = run_processes(train, 2, micro)
    expected = reference_weights()
    for result in results:
        assert result["error"] is None
        assert relative_error(result["weights"], expected) < 1e-12
    assert results[0]["items"] == results[1]["items"]  # global counts, the same on both ranks


def train_uneven_shares(rank: int, world_size: int) -> dict:
    """Rank 0 holds 8 rows of each global batch, rank 1 two: windows of 4 and [1, 1, 0, 0]."""
    accelerator = fresh_accelerator()
    model = hf_models.gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    accumulator = AcceleratedAccumulator(accelerator, model, optimizer, micro_batch_size=2)
    micro_batches = []
    for global_batch in hf_models.global_batches(data(), GLOBAL_BATCH):
        share = (
            hf_models.rows_of(global_batch, 0, 8)
            if rank == 0
            else (hf_models.rows_of(global_batch, 8, GLOBAL_BATCH))
        )
        micro_batches.append(accumulator.step(share, causal_lm_loss).micro_batches)
    unwrapped = accelerator.unwrap_model(model)
    return {
        "weights": {n: p.detach().clone() for n, p in unwrapped.named_parameters()},
        "micro_batches": micro_batches,
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uneven_rank_shares_agree_on_the_window_and_stay_exact():
    results = run_processes(train_uneven_shares, 2)
    expected = reference_weights()
    for result in results:
        assert result["micro_batches"] == [4] * STEPS  # rank 1 pads with empty micro-batches
        assert relative_error(result["weights"], expected) < 1e-12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_desynchronised_rank_is_caught_after_the_first_step():
    results = run_processes(train, 2, 5, True)
    for result in results:
        assert result["error"] is not None, "the divergence went unnoticed"
        assert "after step 1" in result["error"]
        assert "rank 0: sum" in result["error"] and "rank 1: sum" in result["error"]
        assert result["items"] == []  # the first step raised: its comparison is right after it


def test_bf16_mixed_precision_carries_over():
    accelerator = fresh_accelerator(mixed_precision="bf16")
    model = hf_models.gpt2(dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    accumulator = AcceleratedAccumulator(accelerator, model, optimizer, micro_batch_size=4)
    assert accumulator.accumulator.precision == "bf16"
    result = accumulator.step(hf_models.causal_batch(GLOBAL_BATCH), causal_lm_loss)
    assert torch.isfinite(torch.tensor(result.loss)) and not result.skipped


def test_accelerate_accumulation_is_refused_with_the_fix():
    accelerator = fresh_accelerator(gradient_accumulation_steps=4)
    model = hf_models.gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        AcceleratedAccumulator(accelerator, model, optimizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_uses_accelerates_grad_scaler():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="fp16")
    model = hf_models.gpt2(dtype=torch.float32)
    reference = hf_models.gpt2(dtype=torch.float32).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    accumulator = AcceleratedAccumulator(accelerator, model, optimizer, micro_batch_size=3)
    assert accumulator.accumulator.grad_scaler is accelerator.scaler
    batch = {k: v.cuda() for k, v in hf_models.causal_batch(GLOBAL_BATCH).items()}
    result = accumulator.step(batch, causal_lm_loss)
    assert not result.skipped
    losses, mask = hf_models.causal_item_losses(reference, batch)
    ((losses * mask).sum() / mask.sum()).backward()
    expected = {n: p.detach() - LR * p.grad for n, p in reference.named_parameters()}
    actual = {n: p.detach() for n, p in accelerator.unwrap_model(model).named_parameters()}
    assert relative_error(actual, expected) < 1e-3  # fp16 autocast against float32
