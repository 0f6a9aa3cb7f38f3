"""The trainer against independent references: a float64 full-batch loop, LR formulas, counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bigbatch.train.configfile import validate
from bigbatch.train.trainer import NonFiniteError, Trainer
from tests import models
from tests.distributed_helpers import run_processes
from tests.reference import full_batch_gradients

N = 150  # steps of 64: 64, 64, 22 (a short last global batch), then the next epoch


def regression_dataset(n=N):
    x, y = models.regression_data(n)
    return torch.utils.data.TensorDataset(x, y)


def sum_loss(model, batch):
    x, y = batch
    return models.mse_per_sample(model, x, y).sum(), x.shape[0]


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_weights(global_batch_size, num_steps, lr, seed=0, n=N):
    """Plain SGD on full global batches in float64, the order written from its definition."""
    model = models.mlp()
    x, y = models.regression_data(n)
    epoch, position = 0, 0
    for _ in range(num_steps):
        if position == n:
            epoch, position = epoch + 1, 0
        order = np.random.default_rng([seed, epoch]).permutation(n)
        index = torch.as_tensor(order[position : position + global_batch_size])
        position = min(n, position + global_batch_size)
        ones = torch.ones(len(index), dtype=torch.float64)
        grads = full_batch_gradients(
            model, lambda m, i=index, o=ones: (models.mse_per_sample(m, x[i], y[i]), o)
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= lr * grads[name]
    return weights(model)


def train(config, model=None, dataset=None, run_dir=None, **kwargs):
    model = model or models.mlp()
    fit_options = kwargs.pop("fit", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(
        model,
        optimizer,
        kwargs.pop("loss_fn", sum_loss),
        dataset or regression_dataset(),
        validate(config),
        run_dir=run_dir,
        progress=False,
        **kwargs,
    )
    return trainer.fit(**fit_options), weights(trainer.module)


def max_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("micro_batch_size", [8, 64, 5])
def test_any_micro_batch_matches_the_full_batch_reference(micro_batch_size):
    config = dict(global_batch_size=64, micro_batch_size=micro_batch_size, max_steps=5)
    summary, actual = train(config)
    assert max_difference(actual, reference_weights(64, 5, lr=0.05)) < 1e-10
    assert summary.steps == 5 and summary.skipped_steps == 0


def _train_on_rank(rank, world_size):
    summary, actual = train(dict(global_batch_size=64, micro_batch_size=8, max_steps=5))
    return actual, summary.plan


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_match_one():
    results = run_processes(_train_on_rank, 2)
    expected = reference_weights(64, 5, lr=0.05)
    for actual, plan in results:
        assert plan["world_size"] == 2 and plan["gradient_accumulation_steps"] == 4
        assert max_difference(actual, expected) < 1e-10


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
def test_lr_follows_the_scaling_rule_and_schedule(tmp_path, rule):
    config = dict(
        global_batch_size=8,
        batch_size_schedule=[[3, 16], [5, 4]],
        lr_scaling={"rule": rule, "base_batch_size": 4},
        warmup_steps=2,
        lr_schedule="cosine",
        max_steps=7,
        micro_batch_size=4,
    )
    train(config, run_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [line["lr"] for line in lines if line["kind"] == "train"]
    power = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}[rule]
    expected = []
    for step in range(7):
        size = 8 if step < 3 else 16 if step < 5 else 4
        factor = (step + 1) / 2 if step < 2 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 5))
        expected.append(0.05 * (size / 4) ** power * factor)
    assert logged == pytest.approx(expected, rel=1e-12)


Indexed = models.IndexedRegression


def test_batch_size_schedule_uses_every_item_once_per_epoch():
    seen = []

    def loss_fn(model, batch):
        x, y, index = batch
        seen.extend(index.tolist())
        return models.mse_per_sample(model, x, y).sum(), x.shape[0]

    n = 29
    config = dict(global_batch_size=4, batch_size_schedule=[[2, 7], [5, 3]], epochs=3)
    config.update(micro_batch_size=2)
    summary, _ = train(config, dataset=Indexed(n), loss_fn=loss_fn)
    assert len(seen) == 3 * n
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    # 4 + 4 + 7 + 7 + 7 = 29 ends epoch 0 after 5 steps; then 3 per step: 10 + 10 steps
    assert summary.steps == 5 + 10 + 10


def poisoned_dataset(bad_index):
    x, y = models.regression_data(16)
    y[bad_index] = float("nan")
    return torch.utils.data.TensorDataset(x, y)


def test_nonfinite_steps_are_skipped_and_counted():
    config = dict(global_batch_size=4, micro_batch_size=2, max_steps=8)
    summary, actual = train(config, dataset=poisoned_dataset(5))
    assert summary.skipped_steps == 2  # the poisoned item comes once in each of 2 epochs
    assert all(torch.isfinite(t).all() for t in actual.values())


def test_nonfinite_stop_says_what_to_check():
    config = dict(global_batch_size=16, max_steps=5, on_nonfinite="stop", max_nonfinite_in_row=1)
    with pytest.raises(NonFiniteError, match="Check: the learning rate"):
        train(config, dataset=poisoned_dataset(0))


def test_finished_run_dir_is_refused_and_overwrite_removes_only_run_files(tmp_path):
    config = dict(global_batch_size=16, max_steps=2, checkpoint_every=1)
    train(config, run_dir=tmp_path)
    for name in ("final.safetensors", "metrics.jsonl", "config.yaml", "report.md", "checkpoints"):
        assert (tmp_path / name).exists(), name
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        train(config, run_dir=tmp_path)
    (tmp_path / "checkpoints" / "step-00000001").rename(tmp_path / "checkpoints" / "old")
    train(config, run_dir=tmp_path, fit={"overwrite": True})
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "checkpoints" / "old").exists()


def dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


def test_corrupt_newest_checkpoint_falls_back_and_resume_is_exact(tmp_path):
    config = dict(global_batch_size=32, micro_batch_size=8, max_steps=9, checkpoint_every=3)
    _, expected = train(config, model=dropout_model(), run_dir=tmp_path / "a")
    run = tmp_path / "b"
    train(config, model=dropout_model(), run_dir=run)
    newest = run / "checkpoints" / "step-00000009" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a truncated write
    (run / "checkpoints" / "step-00000006" / "state.pt").write_bytes(b"garbage")
    summary, actual = train(config, model=dropout_model(), run_dir=run, fit={"resume": True})
    assert summary.steps == 9
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == list(range(1, 10))


def test_noise_scale_per_step_and_in_the_report(tmp_path):
    # 3 steps: early on the gradient stands well above the noise, so the estimate is positive (it
    # can dip below 0, giving no estimate, once the loss flattens)
    config = dict(
        global_batch_size=32,
        micro_batch_size=4,
        max_steps=3,
        noise_scale=True,
        noise_smoothing_steps=2,
    )
    summary, _ = train(config, run_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["kind"] == "train"]
    for key in ("critical_batch_size", "gradient_sq_norm", "trace_covariance"):
        assert all(key in line for line in train_lines), key
    critical = summary.to_dict()["critical_batch_size"]
    assert critical is not None and critical > 0, (
        "no estimate: the checks below would prove nothing"
    )
    assert critical == train_lines[-1]["critical_batch_size"]  # the last step's estimate
    report = (tmp_path / "report.md").read_text()
    assert "## Gradient noise scale" in report and "Global batch B = 32" in report
    assert f"B_crit = {critical:.0f}" in report
    # McCandlish et al.: (1 + B / B_crit) x the minimum items, (1 + B_crit / B) x the minimum steps
    assert f"{1 + 32 / critical:.1f}x the minimum items" in report
    assert f"{1 + critical / 32:.1f}x the minimum steps" in report


def test_resume_with_another_micro_batch_continues_the_same_sample_order(tmp_path):
    """Stopped after 2 steps at micro 8, resumed at micro 5: the same items, step for step."""
    first = dict(global_batch_size=64, micro_batch_size=8, max_steps=2, checkpoint_every=2)
    train(first, run_dir=tmp_path / "run")
    resumed = dict(global_batch_size=64, micro_batch_size=5, max_steps=5, checkpoint_every=2)
    summary, actual = train(resumed, run_dir=tmp_path / "run", fit={"resume": True})
    assert summary.steps == 5
    assert max_difference(actual, reference_weights(64, 5, lr=0.05)) < 1e-10


def _resume_on_rank(rank, world_size, run_dir):
    config = dict(global_batch_size=64, micro_batch_size=8, max_steps=5, checkpoint_every=2)
    _, actual = train(config, run_dir=run_dir, fit={"resume": True})
    return actual


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_on_another_world_size_continues_the_same_sample_order(tmp_path):
    """Stopped after 2 steps in one process, resumed in two: the same items, step for step."""
    first = dict(global_batch_size=64, micro_batch_size=8, max_steps=2, checkpoint_every=2)
    train(first, run_dir=tmp_path / "run")
    expected = reference_weights(64, 5, lr=0.05)
    for actual in run_processes(_resume_on_rank, 2, tmp_path / "run"):
        assert max_difference(actual, expected) < 1e-10
