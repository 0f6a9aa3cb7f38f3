"""batchnorm=sync over 2 CPU processes (gloo): one micro-step per rank is one full-batch forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import bigbatch
from bigbatch.core.batchnorm import apply_policy
from bigbatch.core.syncnorm import CrossRankBatchNorm
from tests import models
from tests.distributed_helpers import run_processes
from tests.reference import full_batch_gradients, relative_error, sgd_update
from tests.train.test_trainer_batchnorm import BatchNormNet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LR = 0.5


def data(images: bool):
    x, y = models.regression_data(10, seed=6)
    if images:
        x = torch.cat([x, x[:, :4]], dim=1)
    return x, y


def loss_fn(model, batch):
    x, y = batch
    return models.mse_per_sample(model, x, y).sum(), x.shape[0]


def _rank(rank: int, world_size: int, images: bool, sizes: tuple) -> dict:
    model = apply_policy(BatchNormNet(images).double(), "sync", world_size=2, device_type="cpu")
    assert isinstance(model.norm, CrossRankBatchNorm)
    ddp = DistributedDataParallel(model)
    accumulator = bigbatch.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=LR))
    x, y = data(images)
    mine = sizes[rank]
    start = sum(sum(s) for s in sizes[:rank])
    window, offset = [], start
    for size in mine:
        window.append((x[offset : offset + size], y[offset : offset + size]))
        offset += size
    accumulator.step(window, loss_fn)
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "running_mean": model.norm.running_mean.clone(),
        "running_var": model.norm.running_var.clone(),
    }


@pytest.mark.parametrize("images", [False, True], ids=["BatchNorm1d", "BatchNorm2d"])
def test_sync_equals_one_full_batch_forward_and_step(images):
    results = run_processes(_rank, 2, images, ((6,), (4,)))  # one micro-batch per rank
    x, y = data(images)
    reference = BatchNormNet(images).double()
    gradients = full_batch_gradients(
        reference, lambda m: (models.mse_per_sample(m, x, y), torch.ones(len(x)))
    )
    expected = sgd_update(reference, gradients, LR)
    with torch.no_grad():
        reference(x)  # the full-batch forward's running statistics
    for result in results:
        assert relative_error(result["weights"], expected) < 1e-12
        torch.testing.assert_close(result["running_mean"], reference.norm.running_mean)
        torch.testing.assert_close(result["running_var"], reference.norm.running_var)


def test_sync_joins_with_empty_micro_batches_and_does_not_hang():
    # micro 1 over 3 items: rank 0 runs [1, 1], rank 1 runs [1, 0]; every forward must join.
    results = run_processes(_rank, 2, False, ((1, 1), (1, 0)))
    for result in results:
        assert all(math.isfinite(float(w.abs().sum())) for w in result["weights"].values())
    assert all(
        torch.equal(results[0]["weights"][k], results[1]["weights"][k])
        for k in results[0]["weights"]
    )
