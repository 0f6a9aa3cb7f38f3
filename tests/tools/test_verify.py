"""bigbatch verify: passes on the recipes, fails on BatchNorm and names the layer.

The full-batch gradient inside verify is checked against tests/reference.py's independent one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from bigbatch.recipes import Recipe, build
from bigbatch.tools import verify as verify_module
from bigbatch.tools.verify import breaking_layers, format_report, verify
from tests.reference import full_batch_gradients

SMALL_LM = {"num_train_samples": 64, "num_eval_samples": 8, "d_model": 16, "num_heads": 2}


def test_digits_passes_every_split():
    report = verify(
        build("digits", {"seed": 0}), global_batch_size=20, micro_batch_size=6, num_global_batches=1
    )
    assert report.passed and report.breaking_layers == ()
    assert [s.name for s in report.splits] == ["micro 1", "uneven", "configured"]
    assert report.splits[1].micro_batch_sizes == (7, 7, 6)
    assert all(s.relative_error < 1e-12 for s in report.splits)
    assert "PASS" in format_report(report)


def test_tinylm_passes_with_varying_items_per_sample():
    recipe = build("tinylm", {"seed": 0, "recipe_options": SMALL_LM})
    report = verify(recipe, global_batch_size=12, micro_batch_size=5, num_global_batches=2)
    assert report.passed, format_report(report)


def test_batchnorm_fails_and_is_named():
    report = verify(
        build("digits-bn", {"seed": 0}),
        global_batch_size=12,
        micro_batch_size=4,
        num_global_batches=1,
    )
    assert not report.passed
    names = [name for name, _ in report.breaking_layers]
    assert names == ["features.1", "features.4"]
    text = format_report(report)
    assert "FAIL" in text and "features.1: BatchNorm2d" in text


@pytest.mark.parametrize(
    ("policy", "passes"), [("groupnorm", True), ("freeze", True), ("window", False)]
)
def test_batchnorm_policies_that_make_the_update_split_invariant_pass(policy, passes):
    report = verify(
        build("digits-bn", {"seed": 0}),
        global_batch_size=12,
        micro_batch_size=4,
        num_global_batches=1,
        batchnorm=policy,
    )
    assert report.passed == passes, format_report(report)
    assert (report.breaking_layers == ()) == passes


def test_dropout_is_named_only_with_p_above_zero():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1), torch.nn.Dropout(0.0))
    found = breaking_layers(model)
    assert [name for name, _ in found] == ["1"]
    assert "dropout without a fixed seed" in found[0][1]


def test_loss_divided_by_k_is_caught():
    """A loss_fn returning a mean per micro-batch ignoring counts is exact only for even splits:
    a masked regression where the per-micro-batch mean is over items, returned as a scalar."""

    def mean_over_items(model, batch):
        x, y, mask = batch
        losses = (model(x.double()).squeeze(1) - y).pow(2) * mask
        return losses.sum() / mask.sum().clamp(min=1)  # scalar: counted as a mean over samples

    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12).double()
    mask = (torch.rand(12) < 0.5).double()
    mask[0] = 1.0
    recipe = Recipe(
        "masked", torch.nn.Linear(3, 1), TensorDataset(x, y, mask), None, mean_over_items
    )
    assert not verify(recipe, global_batch_size=12, micro_batch_size=4, num_global_batches=1).passed


def test_full_batch_gradient_matches_the_independent_reference():
    recipe = build("digits", {"seed": 0})
    model = copy.deepcopy(recipe.model).double()
    images, labels = recipe.train_dataset.tensors  # type: ignore[attr-defined]
    batch = (images[:10].double(), labels[:10])
    ours = verify_module.full_batch_gradients(copy.deepcopy(model), recipe.loss_fn, batch)
    expected = full_batch_gradients(
        model,
        lambda m: (
            torch.nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none"),
            torch.ones(10, dtype=torch.float64),
        ),
    )
    for got, (_, want) in zip(ours, expected.items()):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_a_skipped_step_or_a_non_finite_gradient_fails():
    """A NaN loss makes the engine skip the step, which applies no gradient: nothing to compare
    is a failure, not a relative error of 0."""

    def nan_loss(model, batch):
        x, y = batch
        return (model(x).squeeze(1) - y).pow(2).sum() * float("nan"), x.shape[0]

    torch.manual_seed(0)
    recipe = Recipe(
        "nan",
        torch.nn.Linear(3, 1),
        TensorDataset(torch.randn(12, 3), torch.randn(12)),
        None,
        nan_loss,
    )
    report = verify(recipe, global_batch_size=12, micro_batch_size=4, num_global_batches=1)
    assert not report.passed
    assert all(split.relative_error == math.inf for split in report.splits)
    assert verify_module.relative_error([], [torch.ones(2)]) == math.inf
    assert verify_module.relative_error([torch.ones(1, 2)], [torch.ones(2)]) == math.inf
