"""The engine's optional statistics: noise scale and BatchNorm window, against references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bigbatch
from tests import models
from tests.core.test_noise import DELTA, assert_close_to, regression_model, sample
from tests.distributed_helpers import run_processes


def regression_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).pow(2).sum(), x.shape[0]


def measure(sizes_per_rank: list[int], steps: int, seed: int, model=None, accumulator=None):
    model = model or regression_model(DELTA)
    accumulator = accumulator or bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), measure_noise_scale=True
    )
    generator = torch.Generator().manual_seed(seed)
    result = None
    for _ in range(steps):
        result = accumulator.step([sample(n, generator) for n in sizes_per_rank], regression_loss)
    return result


@pytest.mark.parametrize("sizes", [[8] * 4, [1, 2, 3, 5, 8, 13]], ids=["equal", "uneven"])
def test_engine_noise_scale_matches_the_closed_form(sizes):
    result = measure(sizes, steps=700, seed=1)
    assert_close_to(result.noise_scale, DELTA)


def test_measuring_leaves_the_weights_bit_identical():
    tokens, labels = models.token_data(40, seed=3)
    window = [(tokens[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)]
    weights = []
    for measure_noise_scale in (False, True):
        model = models.token_model()
        accumulator = bigbatch.Accumulator(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            max_grad_norm=1.0,
            measure_noise_scale=measure_noise_scale,
        )
        for _ in range(3):
            result = accumulator.step(window, models.token_loss_fn)
        assert (result.noise_scale is not None) == measure_noise_scale
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_noise_state_resumes_the_same_estimate():
    first = measure([4, 4, 4], steps=5, seed=2)
    model = regression_model(DELTA)
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), measure_noise_scale=True
    )
    measure([4, 4, 4], steps=3, seed=2, model=model, accumulator=accumulator)
    state = copy.deepcopy(accumulator.state_dict())
    resumed = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), measure_noise_scale=True
    )
    resumed.load_state_dict(state)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):  # replay the data the first run already used
        [sample(4, generator) for _ in range(3)]
    for _ in range(2):
        result = resumed.step([sample(4, generator) for _ in range(3)], regression_loss)
    assert result.noise_scale == first.noise_scale


def _noise_rank(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(regression_model(DELTA))
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), measure_noise_scale=True
    )
    sizes = [3, 5] if rank == 0 else [4, 7, 2]  # unequal counts and lengths per rank
    return {"noise": measure(sizes, steps=500, seed=10 + rank, accumulator=accumulator).noise_scale}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_noise_scale_under_two_processes():
    results = run_processes(_noise_rank, 2)
    assert results[0]["noise"] == results[1]["noise"]
    assert_close_to(results[0]["noise"], DELTA)


def batchnorm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=0.3),
        torch.nn.Flatten(),
    ).double()


def image_loss(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("sizes", [[5, 3, 4], [12]], ids=["uneven", "one"])
def test_engine_window_batchnorm_ends_where_one_full_batch_forward_would(sizes):
    images = torch.randn(
        sum(sizes), 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    reference = batchnorm_model()
    reference.train()
    with torch.no_grad():
        reference(images)  # one forward over the whole global batch
    model = batchnorm_model()
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.0), batchnorm="window"
    )
    accumulator.step(list(images.split(sizes)), image_loss)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            getattr(model[1], name), getattr(reference[1], name), rtol=1e-12, atol=1e-12
        )


def _batchnorm_rank(rank: int, world_size: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    images = torch.randn(
        11, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    model = batchnorm_model()
    ddp = DistributedDataParallel(model)
    accumulator = bigbatch.Accumulator(
        ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), batchnorm="window"
    )
    mine = images[:6].split([4, 2]) if rank == 0 else images[6:].split([3, 2])
    accumulator.step(list(mine), image_loss)
    return {name: getattr(model[1], name).clone() for name in ("running_mean", "running_var")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_window_batchnorm_pools_over_ranks():
    images = torch.randn(
        11, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    reference = batchnorm_model()
    with torch.no_grad():
        reference(images)
    for result in run_processes(_batchnorm_rank, 2):
        for name, value in result.items():
            torch.testing.assert_close(value, getattr(reference[1], name), rtol=1e-12, atol=1e-12)


def test_accumulator_warns_once_about_small_batchnorm_micro_batches():
    model = batchnorm_model()
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0))
    images = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"BatchNorm layer\(s\) \(1\)"):
        accumulator.step(list(images.split(4)), image_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulator.step(list(images.split(4)), image_loss)


@pytest.mark.parametrize("policy", ["sync", "groupnorm", "bogus"])
def test_policies_the_engine_cannot_apply_are_refused(policy):
    model = batchnorm_model()
    with pytest.raises(ValueError, match="batchnorm"):
        bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), batchnorm=policy)


def test_freeze_keeps_running_statistics_and_trains_affine():
    model = batchnorm_model()
    before = model[1].running_mean.clone()
    weight = model[1].weight.detach().clone()
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), batchnorm="freeze"
    )
    accumulator.step(list(torch.randn(8, 2, 5, 5, dtype=torch.float64).split(4)), image_loss)
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(model[1].weight, weight)


def test_fp16_norms_are_unscaled():
    """Under fp16 the backward runs on loss x scale / divisor: the estimate must not see it."""
    estimates = {}
    for precision in ("fp32", "fp16"):
        model = regression_model(DELTA).float()
        accumulator = bigbatch.Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            precision=precision,
            measure_noise_scale=True,
            noise_smoothing_steps=1,
        )
        generator = torch.Generator().manual_seed(3)
        for _ in range(2):  # the second step runs with the fp16 divisor settled
            window = [tuple(t.float() for t in sample(n, generator)) for n in (6, 10, 16)]
            result = accumulator.step(window, regression_loss)
        estimates[precision] = result.noise_scale
    for field in ("gradient_sq_norm", "trace_covariance"):
        assert getattr(estimates["fp16"], field) == pytest.approx(
            getattr(estimates["fp32"], field), rel=0.05
        )
