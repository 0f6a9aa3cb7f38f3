"""The trainer's `batchnorm` policies: each one trains, `window` ends where a float64 full-batch
forward leaves the running statistics, the warning fires once, sync with one process.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bigbatch.core.batchnorm import apply_policy
from bigbatch.train.configfile import validate
from bigbatch.train.trainer import Trainer
from tests import models

N = 40


class BatchNormNet(torch.nn.Module):
    """Linear -> BatchNorm1d -> tanh -> Linear, or Conv2d -> BatchNorm2d -> ... for images."""

    def __init__(self, images: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.images = images
        self.inner = torch.nn.Conv2d(1, 8, 3, padding=1) if images else torch.nn.Linear(5, 8)
        self.norm = torch.nn.BatchNorm2d(8) if images else torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8 * 9 if images else 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.images:
            x = x.view(-1, 1, 3, 3)[:, :, :, :]
        hidden = torch.tanh(self.norm(self.inner(x)))
        return self.out(hidden.flatten(1))


def dataset(images=False):
    x, y = models.regression_data(N)
    if images:
        x = torch.cat([x, x[:, :4]], dim=1)  # 9 features: a 3 x 3 image
    return torch.utils.data.TensorDataset(x, y)


def loss_fn(model, batch):
    x, y = batch
    return models.mse_per_sample(model, x, y).sum(), x.shape[0]


def train(policy, *, images=False, global_batch_size=11, micro_batch_size=4, max_steps=3):
    model = BatchNormNet(images).double()
    config = validate(
        dict(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            max_steps=max_steps,
            batchnorm=policy,
        )
    )
    model = apply_policy(model, policy, world_size=1, device_type="cpu")  # before the optimizer
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loss_fn,
        dataset(images),
        config,
        progress=False,
    )
    return trainer, trainer.fit()


@pytest.mark.parametrize("policy", ["keep", "freeze", "groupnorm", "window"])
def test_each_cpu_policy_trains(policy):
    before = {k: v.clone() for k, v in BatchNormNet().double().state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer, summary = train(policy)
    assert summary.steps == 3 and summary.skipped_steps == 0
    assert summary.final_loss is not None and np.isfinite(summary.final_loss)
    state = trainer.module.state_dict()
    assert not torch.equal(state["out.weight"], before["out.weight"])
    if policy == "groupnorm":
        assert isinstance(trainer.module.norm, torch.nn.GroupNorm)
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert all(p.requires_grad and id(p) in trained for p in trainer.module.parameters())
        assert not torch.equal(state["norm.weight"], before["norm.weight"])
    if policy == "freeze":  # running statistics are used, never updated
        assert torch.equal(state["norm.running_mean"], before["norm.running_mean"])
        assert int(state["norm.num_batches_tracked"]) == 0


@pytest.mark.parametrize("images", [False, True])
def test_window_running_statistics_equal_a_full_batch_forward(images):
    global_batch_size = 11  # micro-batches of 4, 4, 3: uneven
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer, _ = train(
            "window", images=images, global_batch_size=global_batch_size, max_steps=1
        )
    # The reference: one float64 forward in train mode over the step's items, by definition of
    # the sampler (numpy's generator seeded with (seed, epoch), the first global batch).
    reference = BatchNormNet(images).double().train()
    index = torch.as_tensor(np.random.default_rng([0, 0]).permutation(N)[:global_batch_size])
    with torch.no_grad():
        reference(dataset(images).tensors[0][index])
    actual = trainer.module.norm
    torch.testing.assert_close(actual.running_mean, reference.norm.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(actual.running_var, reference.norm.running_var, rtol=0, atol=1e-12)
    assert int(actual.num_batches_tracked) == int(reference.norm.num_batches_tracked) == 1


def test_small_micro_batches_warn_once_naming_the_layer():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train("keep", global_batch_size=12, micro_batch_size=2)
    messages = [str(w.message) for w in caught if "BatchNorm layer" in str(w.message)]
    assert len(messages) == 1
    assert "norm" in messages[0] and "batchnorm policy" in messages[0]


def test_freeze_and_groupnorm_do_not_warn():
    for policy in ("freeze", "groupnorm"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(policy, global_batch_size=12, micro_batch_size=2)
        assert not [w for w in caught if "BatchNorm layer" in str(w.message)], policy


def test_sync_with_one_process_warns_it_has_no_effect():
    with pytest.warns(UserWarning, match="no effect with world_size 1"):
        train("sync", max_steps=1)
