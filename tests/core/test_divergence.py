"""bigbatch.core.divergence: equal weights agree, one changed bit on one rank is caught."""

from __future__ import annotations

import pytest
import torch

from bigbatch.core.divergence import (
    DivergenceCheck,
    RankDivergenceError,
    parameter_checksums,
)
from tests.distributed_helpers import run_processes


def weights(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(5, 3, generator=generator).to(dtype),
        torch.randn(7, generator=generator).to(dtype),
    ]


def test_the_schedule_is_after_the_first_step_and_every_n():
    check = DivergenceCheck(weights(), every_n_steps=4, world_size=2, rank=0)
    assert [s for s in range(13) if check.is_due(s)] == [1, 4, 8, 12]
    assert check.local(2).numel() == 0
    assert check.local(4).numel() == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_one_changed_bit_changes_the_checksum_and_the_order_does_not(dtype):
    first = weights(dtype)
    assert torch.equal(parameter_checksums(first), parameter_checksums(first[::-1]))
    nudged = [t.clone() for t in first]
    nudged[1][3] = torch.nextafter(nudged[1][3], torch.tensor(float("inf"), dtype=dtype))
    assert parameter_checksums(first)[1] != parameter_checksums(nudged)[1]


def test_each_rank_writes_its_own_slot():
    check = DivergenceCheck(weights(), world_size=3, rank=1)
    vector = check.local(1).view(3, 2)
    assert vector[0].eq(0).all() and vector[2].eq(0).all()
    assert torch.equal(vector[1], parameter_checksums(weights()))


def test_check_names_the_odd_rank_and_every_checksum():
    local = parameter_checksums(weights())
    odd = local + torch.tensor([0.5, 1.0], dtype=torch.float64)
    reduced = torch.cat([local, odd, local])
    check = DivergenceCheck(weights(), world_size=3, rank=0)
    with pytest.raises(RankDivergenceError) as error:
        check.check(reduced, steps_done=7)
    message = str(error.value)
    assert "after step 7" in message and "rank(s) 1 differ" in message
    assert all(f"rank {rank}: sum" in message for rank in range(3))
    check.check(torch.cat([local, local, local]), steps_done=7)  # agreement: silent
    check.check(torch.zeros(0, dtype=torch.float64), steps_done=3)  # not due: nothing to check


def compare_ranks(rank: int, world_size: int, nudge: bool) -> str | None:
    model = torch.nn.Linear(4, 3).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter))
        if nudge and rank == 1:
            model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(2.0, dtype=torch.float64))
    check = DivergenceCheck(model.parameters(), every_n_steps=10)
    try:
        check.compare(steps_done=1)
    except RankDivergenceError as error:
        return str(error)
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_agree_and_one_ulp_on_one_rank_is_caught():
    assert run_processes(compare_ranks, 2, False) == [None, None]
    errors = run_processes(compare_ranks, 2, True)
    assert all(error is not None and "after step 1" in error for error in errors)
    assert errors[0] == errors[1]  # every rank sees every checksum


def accumulator_ranks(rank: int, world_size: int, nudge: bool) -> list[str]:
    """Three DDP steps; rank 1 changes a weight alone after the first; what each step raised."""
    from torch.nn.parallel import DistributedDataParallel

    import bigbatch

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 3).double())
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), check_ranks_every=2
    )
    window = [torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    outcomes = []
    for step in range(3):
        try:
            accumulator.step(window, lambda m, x: m(x).pow(2).sum(dim=1).mean())
            outcomes.append("ok")
        except RankDivergenceError as error:
            outcomes.append(str(error))
        if step == 0 and nudge and rank == 1:
            with torch.no_grad():
                model.module.bias[0] += 1e-3  # a change the other rank never sees
    return outcomes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_accumulator_catches_a_desynchronised_rank_in_its_own_all_reduce():
    assert run_processes(accumulator_ranks, 2, False) == [["ok"] * 3] * 2
    first, second = run_processes(accumulator_ranks, 2, True)
    # the nudge came after step 1; the check after step 1 runs in step 2's all-reduce, so both
    # ranks stop there together, naming both checksums
    assert first[0] == second[0] == "ok"
    assert first[1] == second[1] and "after step 1" in first[1]
    assert "rank 0: sum" in first[1] and "rank 1: sum" in first[1]
