"""The gradient noise scale under FSDP2 equals one process measuring the same micro-batches.

Each rank of 2 and 3 gloo processes holds different rows, micro-batch counts (some empty) and masked
items. The reference is one unsharded process whose window holds every rank's micro-batches as its
own: the same small-batch gradients and the same large batch, hence the same estimate (each step's,
with no smoothing). The one-process measurement itself is checked against a closed form in
tests/test_noise.py.
"""

from __future__ import annotations

import pytest
import torch

import bigbatch
from bigbatch.core import sharding
from tests.core.test_sharded import SPLITS, loss_fn, make_model, windows
from tests.distributed_helpers import run_processes

STEPS = 2


def _accumulator(model: torch.nn.Module, gradient_sync: str) -> bigbatch.Accumulator:
    return bigbatch.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        measure_noise_scale=True,
        noise_smoothing_steps=1,  # each step's own estimate
        gradient_sync=gradient_sync,  # type: ignore[arg-type]
    )


def _estimates(accumulator: bigbatch.Accumulator, window_of) -> list[tuple[float, float]]:
    found = []
    for step in range(STEPS):
        result = accumulator.step(window_of(step), loss_fn)
        assert result.noise_scale is not None and not result.skipped
        found.append((result.noise_scale.gradient_sq_norm, result.noise_scale.trace_covariance))
    return found


def _sharded(rank: int, world: int, gradient_sync: str) -> list[tuple[float, float]]:
    model = make_model()
    units = [module for module in model if isinstance(module, torch.nn.Linear)]
    sharding.shard_model(model, units, world_size=world, device_type="cpu")
    accumulator = _accumulator(model, gradient_sync)
    return _estimates(accumulator, lambda step: windows(rank, world, step))


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("gradient_sync", ["every_micro_batch", "step_end"])
def test_noise_scale_under_fsdp_equals_one_process(world: int, gradient_sync: str) -> None:
    def every_rank(step: int) -> list:
        return [micro for rank in range(world) for micro in windows(rank, world, step)]

    expected = _estimates(_accumulator(make_model(), "step_end"), every_rank)
    assert all(trace > 0 for _, trace in expected)
    assert len(SPLITS[world]) == world
    for found in run_processes(_sharded, world, gradient_sync):
        for (gradient_sq, trace), (expected_sq, expected_trace) in zip(found, expected):
            assert gradient_sq == pytest.approx(expected_sq, rel=1e-9)
            assert trace == pytest.approx(expected_trace, rel=1e-9)
