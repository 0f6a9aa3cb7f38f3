"""The replication strategy chosen once per Accumulator: which one, and what it answers.

Single-process checks compare with hand-written expectations; the two-process checks compare a
DDP micro-step's gradients with plain autograd on each rank's rows (their mean over ranks where
the gradient is synced, this rank's own where it is not).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bigbatch.core import replication
from bigbatch.core.accumulation import Fp32GradientBuffer, choose_accumulation_dtype
from tests.distributed_helpers import run_processes


def choose(model: torch.nn.Module, **options) -> replication.Replication:
    settings = {"gradient_sync": "auto", "memory_budget_bytes": None, "accumulation_dtype": "auto"}
    return replication.choose(model, list(model.parameters()), **{**settings, **options})


def test_a_plain_module_is_local_with_no_collective():
    strategy = choose(torch.nn.Linear(3, 2))
    assert isinstance(strategy, replication.Local) and strategy.name == "local"
    assert (strategy.world_size, strategy.gradient_ranks) == (1, 1)
    assert not (strategy.spans_ranks or strategy.sharded or strategy.equal_micro_steps)
    assert not strategy.checks_divergence
    assert isinstance(strategy.sync(last=False), contextlib.nullcontext)
    window = [torch.ones(2, 3), torch.ones(0, 3), torch.ones(1, 3)]
    assert strategy.micro_steps(window, torch.device("cpu")) == [(m, False) for m in window]
    assert strategy.empty_micro_step(window, window[1], index=1, last=2) is None
    assert list(strategy.micro_steps_to_join(failed_at=1, num_steps=3)) == []
    assert not strategy.out_of_memory_is_fatal(index=2, last=2)


def test_local_chooses_the_accumulation_dtype_from_the_parameters():
    assert choose(torch.nn.Linear(3, 2)).accumulation_dtype == "param"
    assert choose(torch.nn.Linear(3, 2).bfloat16()).accumulation_dtype == "fp32"
    assert choose(torch.nn.Linear(3, 2), accumulation_dtype="param").accumulation_dtype == "param"
    with pytest.raises(ValueError, match="accumulation_dtype"):
        choose(torch.nn.Linear(3, 2), accumulation_dtype="fp64")
    with pytest.raises(ValueError, match="not available under FSDP"):
        choose_accumulation_dtype("fp32", list(torch.nn.Linear(3, 2).parameters()), sharded=True)


def test_stand_in_is_the_first_real_row_of_the_window():
    x = torch.arange(12.0).reshape(4, 3)
    window = [(x[:0], x[:0]), (x[1:4], x[1:4] * 2)]
    found = replication.stand_in(window)
    assert torch.equal(found[0], x[1:2]) and torch.equal(found[1], x[1:2] * 2)
    assert replication.stand_in([x[:0], x[:0]]).shape == (0, 3)


def test_a_stand_in_forward_leaves_batchnorm_statistics_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    before = model[1].running_mean.clone()
    with replication.stand_in_forward(model, is_stand_in=True):
        model(torch.randn(5, 3))
    assert torch.equal(model[1].running_mean, before) and model[1].training
    with replication.stand_in_forward(model, is_stand_in=False):
        model(torch.randn(5, 3))
    assert not torch.equal(model[1].running_mean, before)


def test_the_fp32_buffer_rounds_the_summed_gradients_once():
    parameter = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(64, generator=generator).bfloat16() for _ in range(4)]
    buffer = Fp32GradientBuffer([parameter])
    for gradient in gradients:
        parameter.grad = gradient.clone()
        buffer.add_gradients()
        assert parameter.grad is None
    buffer.round_to_parameters()
    # Four bf16 numbers sum exactly in float64; rounding that sum once is the reference.
    expected = torch.stack([g.double() for g in gradients]).sum(0).bfloat16()
    assert parameter.grad is not None and torch.equal(parameter.grad, expected)
    assert buffer.tensors is None


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).double()


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + rank)).double()


def _plain_gradient(rank: int) -> torch.Tensor:
    model = _model()
    model(_rows(rank)).pow(2).sum().backward()
    return model.weight.grad.clone()


def _ddp_gradient(model: torch.nn.Module, strategy: replication.Replication, rank: int, last: bool):
    model.zero_grad(set_to_none=True)
    with strategy.sync(last):
        model(_rows(rank)).pow(2).sum().backward()
    return model.module.weight.grad.clone()


def _answers(rank: int, world: int) -> dict[str, object]:
    from torch.nn.parallel import DistributedDataParallel

    from bigbatch.core import sharding
    from bigbatch.core.replication import replicate

    answers: dict[str, object] = {"unwrapped": choose(_model()).name}
    answers["unwrapped_world"] = choose(_model()).world_size
    model = DistributedDataParallel(_model())
    ddp = choose(model)
    answers["ddp"] = (ddp.name, ddp.world_size, ddp.gradient_ranks, ddp.spans_ranks, ddp.sharded)
    answers["ddp_checks"] = ddp.checks_divergence
    answers["keeps_gradients"] = (
        choose(_model()).keeps_gradients,
        ddp.keeps_gradients,  # DDP without gradient_as_bucket_view: .grad may be set to None
        choose(replicate(_model())).keeps_gradients,
    )
    answers["ddp_equal"] = (
        ddp.equal_micro_steps,
        choose(model, gradient_sync="every_micro_batch").equal_micro_steps,
    )
    answers["unsynced"] = _ddp_gradient(model, ddp, rank, last=False)
    answers["synced"] = _ddp_gradient(model, ddp, rank, last=True)
    fp32 = choose(model, accumulation_dtype="fp32")
    answers["fp32_last"] = _ddp_gradient(model, fp32, rank, last=True)  # the buffer syncs instead
    window = (
        [torch.ones(2, 3), torch.ones(0, 3), torch.ones(1, 3)] if rank == 0 else [torch.ones(3, 3)]
    )
    answers["empty_not_last"] = ddp.empty_micro_step(window, torch.ones(0, 3), index=1, last=2)
    answers["empty_last"] = ddp.empty_micro_step(window, torch.ones(0, 3), index=2, last=2)
    every = choose(model, gradient_sync="every_micro_batch")
    steps = every.micro_steps(window, torch.device("cpu"))
    answers["padded"] = [(int(m.shape[0]), stand_in) for m, stand_in in steps]
    answers["join"] = (list(ddp.micro_steps_to_join(1, 4)), list(every.micro_steps_to_join(1, 4)))
    answers["fatal"] = (ddp.out_of_memory_is_fatal(0, 2), ddp.out_of_memory_is_fatal(2, 2))
    sharded = sharding.shard_model(_model(), [], world_size=world, device_type="cpu")
    fsdp = choose(sharded)
    answers["fsdp"] = (
        fsdp.name,
        fsdp.world_size,
        fsdp.gradient_ranks,
        fsdp.spans_ranks,
        fsdp.sharded,
    )
    answers["fsdp_more"] = (
        fsdp.equal_micro_steps,
        fsdp.checks_divergence,
        fsdp.out_of_memory_is_fatal(0, 2),
    )
    try:
        choose(sharded, accumulation_dtype="fp32")
        answers["fsdp_fp32"] = "accepted"
    except ValueError as error:
        answers["fsdp_fp32"] = str(error)
    return answers


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_and_fsdp2_are_chosen_and_answer_over_two_processes():
    results = run_processes(_answers, 2)
    plain = [_plain_gradient(rank) for rank in range(2)]
    mean = (plain[0] + plain[1]) / 2
    for rank, found in enumerate(results):
        assert (found["unwrapped"], found["unwrapped_world"]) == ("local", 1)
        assert found["ddp"] == ("ddp", 2, 2, True, False) and found["ddp_checks"]
        assert found["keeps_gradients"] == (False, False, True)
        assert found["ddp_equal"] == (False, True)
        torch.testing.assert_close(found["unsynced"], plain[rank], rtol=1e-12, atol=0)
        torch.testing.assert_close(found["synced"], mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(found["fp32_last"], plain[rank], rtol=1e-12, atol=0)
        assert found["empty_not_last"] is None
        filler, is_stand_in = found["empty_last"]
        assert filler.shape == (1, 3) and is_stand_in
        # Rank 0 holds 2, 0 and 1 rows, rank 1 one micro-batch of 3: both run three micro-steps.
        expected = (
            [(2, False), (1, True), (1, False)] if rank == 0 else [(3, False), (1, True), (1, True)]
        )
        assert found["padded"] == expected
        assert found["join"] == ([3], [1, 2, 3])
        assert found["fatal"] == (False, True)
        assert found["fsdp"] == ("fsdp2", 2, 1, True, True)
        assert found["fsdp_more"] == (True, False, True)
        assert "not available under FSDP" in found["fsdp_fp32"]
