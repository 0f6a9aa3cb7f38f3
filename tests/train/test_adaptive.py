"""The adaptive global batch: controller bounds and hysteresis, AdaScale's gain, LR progress in
samples, every item once per epoch, and a stop-and-resume bitwise equal to the uninterrupted run.

References are written here from their definitions (formulas, hand-worked sequences), never taken
from the code under test.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.train.configfile import validate
from bigbatch.train.schedules import AdaptiveBatchSize, adascale_gain, lr_factor, progress_factor
from bigbatch.train.trainer import Trainer
from tests import models


def test_controller_moves_within_bounds_with_hysteresis():
    controller = AdaptiveBatchSize(64, 32, 512, granularity=16, adapt_every=5)
    fed = {
        5: 80.0,  # 80 / 64 = 1.25 <= 1.5: stays 64
        10: 100.0,  # 96 / 64 = 1.5: not more than 1.5, stays
        15: 210.0,  # 208 (13 x 16) / 64 = 3.25: moves to 208
        20: 250.0,  # 256 / 208 = 1.23: stays
        25: 10_000.0,  # clamped to 512
        30: 5.0,  # clamped to 32 (512 / 32 = 16)
        35: 40.0,  # 48 / 32 = 1.5: stays
    }
    expected = {5: 64, 10: 64, 15: 208, 20: 208, 25: 512, 30: 32, 35: 32}
    for step in range(1, 36):
        critical = fed.get(step, 1e6)  # off-schedule steps never decide
        controller.update(step, critical)
        if step in expected:
            assert controller.global_batch_size == expected[step], step
    assert controller.stages == [(0, 64), (15, 208), (25, 512), (30, 32)]
    assert [controller.at(s) for s in (0, 14, 15, 24, 25, 29, 30, 99)] == [
        64,
        64,
        208,
        208,
        512,
        512,
        32,
        32,
    ]
    for _, size in controller.stages:
        assert 32 <= size <= 512


def test_controller_ignores_missing_estimates_and_resumes_its_stages():
    controller = AdaptiveBatchSize(8, 8, 64, granularity=4, adapt_every=2)
    assert controller.update(2, None) is None
    assert controller.update(4, math.nan) is None
    assert controller.update(6, 30.0) == 32
    restored = AdaptiveBatchSize(8, 8, 64, granularity=4, adapt_every=2)
    restored.load_state_dict(json.loads(json.dumps(controller.state_dict())))
    assert restored.stages == controller.stages and restored.at(6) == 32


def test_adascale_gain_is_the_scale_for_pure_noise_and_1_without_noise():
    for scale in (0.5, 2.0, 16.0):
        assert adascale_gain(scale, 0.0, 5.0) == pytest.approx(scale, rel=1e-12)  # |G|^2 = 0
        assert adascale_gain(scale, 3.0, 0.0) == pytest.approx(1.0, rel=1e-12)  # tr S = 0


def batch_gradients_mean_sq_norm(gradients: list[tuple[int, int]], scale: int) -> Fraction:
    """E |mean of `scale` independent batch gradients|^2, each drawn uniformly from `gradients`:
    every draw enumerated, in exact fractions."""
    total = Fraction(0)
    for draw in itertools.product(gradients, repeat=scale):
        mean = [Fraction(sum(column), scale) for column in zip(*draw)]
        total += sum(x * x for x in mean)
    return total / len(gradients) ** scale


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(
    "gradients", [[(3, 1), (-1, 1)], [(2, 0), (0, 2), (1, -2)]], ids=["two", "three"]
)
def test_adascale_gain_matches_its_definition_on_a_discrete_gradient(gradients, scale):
    # Johnson et al.: r = E|g|^2 / E|mean of s batch gradients|^2, the mean over s batches being
    # what a global batch s x the base computes. A batch gradient is one of `gradients`, each as
    # likely; |G|^2 and tr S = E|g - G|^2 come from the same enumeration.
    mean = [Fraction(sum(column), len(gradients)) for column in zip(*gradients)]
    gradient_sq = sum(x * x for x in mean)
    trace = sum(sum((x - m) ** 2 for x, m in zip(gradient, mean)) for gradient in gradients) / len(
        gradients
    )
    expected = batch_gradients_mean_sq_norm(gradients, 1) / batch_gradients_mean_sq_norm(
        gradients, scale
    )
    if gradients == [(3, 1), (-1, 1)] and scale == 2:
        # by hand: G = (1, 1), |G|^2 = 2, tr S = 4; E|g|^2 = (10 + 2) / 2 = 6; the mean of a pair
        # is (3, 1) with probability 1/4 (|.|^2 = 10), (-1, 1) with 1/4 (2), (1, 1) with 1/2 (2):
        # 4; r = 6 / 4
        assert (gradient_sq, trace, expected) == (2, 4, Fraction(3, 2))
    actual = adascale_gain(float(scale), float(gradient_sq), float(trace))
    assert actual == pytest.approx(float(expected), rel=1e-12)


def test_adascale_gain_grows_with_the_noise_toward_the_scale():
    traces = [0.0, 0.1, 1.0, 10.0, 100.0, 1e4]
    for scale in (2.0, 8.0):
        gains = [adascale_gain(scale, 1.0, trace) for trace in traces]
        assert gains[0] == pytest.approx(1.0)
        assert all(a < b < scale for a, b in zip(gains, gains[1:]))
        assert adascale_gain(scale, 1.0, 1e12) == pytest.approx(scale, rel=1e-9)
        # and falls as the gradient grows against the same noise
        falling = [adascale_gain(scale, gradient_sq, 4.0) for gradient_sq in (0.0, 0.5, 2.0, 50.0)]
        assert falling[0] == pytest.approx(scale)
        assert all(a > b > 1.0 for a, b in zip(falling, falling[1:]))


@pytest.mark.parametrize(
    ("scale", "gradient_sq", "trace"),
    [(4.0, 1.0, 3.0), (0.5, 2.0, 7.0), (16.0, 0.0, 5.0), (8.0, 3.0, 0.0), (2.0, 1e-3, 40.0)],
)
def test_adascale_gain_lies_between_1_and_the_scale(scale, gradient_sq, trace):
    assert min(1.0, scale) - 1e-12 <= adascale_gain(scale, gradient_sq, trace)
    assert adascale_gain(scale, gradient_sq, trace) <= max(1.0, scale) + 1e-12


def test_adascale_gain_without_an_estimate_is_one():
    assert adascale_gain(4.0, math.nan, math.nan) == 1.0
    assert adascale_gain(4.0, -1.0, 2.0) == pytest.approx(4.0)  # all noise: linear scaling


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_progress_in_samples_equals_steps_at_a_constant_batch(schedule):
    batch, total, warmup = 32, 20, 4
    for step in range(total):
        expected = lr_factor(step, total, warmup, schedule)
        actual = progress_factor(step * batch, batch, total * batch, warmup * batch, schedule)
        assert actual == pytest.approx(expected, rel=1e-12, abs=1e-15)


Indexed = models.IndexedRegression


def dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


ADAPTIVE = dict(
    global_batch_size=4,
    micro_batch_size=2,
    batch_size_schedule="adaptive",
    min_global_batch_size=4,
    max_global_batch_size=16,
    adapt_every=2,
    noise_smoothing_steps=1,
    epochs=3,
    lr_scaling={"rule": "sqrt"},
    warmup_steps=2,
    lr_schedule="cosine",
)


def train(config, run_dir=None, seen=None, resume=False):
    def loss_fn(model, batch):
        x, y, index = batch
        if seen is not None:
            seen.extend(index.tolist())
        return models.mse_per_sample(model, x, y).sum(), x.shape[0]

    model = dropout_model()
    trainer = Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=0.01),
        loss_fn,
        Indexed(37),
        validate(config),
        run_dir=run_dir,
        progress=False,
    )
    return trainer.fit(resume=resume)


def train_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


def test_adaptive_run_uses_every_item_once_per_epoch(tmp_path):
    seen = []
    summary = train(ADAPTIVE, run_dir=tmp_path, seen=seen)
    n = 37
    assert len(seen) == 3 * n
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    lines = train_lines(tmp_path)
    sizes = [line["global_batch_size"] for line in lines]
    assert len(set(sizes)) > 1, "the global batch never changed: the test proves nothing"
    assert all(4 <= size <= 16 for size in sizes)
    assert all("critical_batch_size" in line and "trace_covariance" in line for line in lines)
    assert any(line["critical_batch_size"] is not None for line in lines)
    assert summary.steps == len(lines)
    # the global batch changes only right after a decision step (every adapt_every steps)
    for before, after in zip(lines, lines[1:]):
        if after["global_batch_size"] != before["global_batch_size"]:
            assert before["step"] % 2 == 0
    # samples of each step: the global batch, except the short last one of an epoch
    assert sum(line["num_samples"] for line in lines) == 3 * n


def test_adaptive_stop_and_resume_is_bitwise_equal(tmp_path):
    config = dict(ADAPTIVE, checkpoint_every=1, keep_checkpoints=1000)
    train(config, run_dir=tmp_path / "a")
    run = tmp_path / "b"
    train(config, run_dir=run)
    lines = train_lines(run)
    changes = [
        after["step"] - 1
        for before, after in zip(lines, lines[1:])
        if after["global_batch_size"] != before["global_batch_size"]
    ]
    stop = changes[0] + 1  # resume after the first change, before the run's end
    assert stop < len(lines)
    for path in (run / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > stop:
            shutil.rmtree(path)
    (run / "final.safetensors").unlink()
    summary = train(config, run_dir=run, resume=True)
    assert summary.steps == len(lines)
    expected = load_file(tmp_path / "a" / "final.safetensors")
    actual = load_file(run / "final.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].equal(actual[name]), name
    resumed = train_lines(run)
    assert [line["step"] for line in resumed] == list(range(1, len(lines) + 1))
    assert [line["global_batch_size"] for line in resumed] == [
        line["global_batch_size"] for line in lines
    ]


def test_adaptive_lr_counts_warmup_and_decay_in_samples(tmp_path):
    config = dict(ADAPTIVE, lr_scaling={"rule": "none"})
    train(config, run_dir=tmp_path)
    lines = train_lines(tmp_path)
    total, warmup, before = 3 * 37, 2 * 4, 0
    for line in lines:
        size = line["global_batch_size"]
        if before < warmup:
            factor = min(1.0, (before + size) / warmup)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (before - warmup) / (total - warmup)))
        assert line["lr"] == pytest.approx(0.01 * factor, rel=1e-12)
        before += line["num_samples"]


def test_adaptive_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_global_batch_size"):
        validate(dict(batch_size_schedule="adaptive", epochs=1))
    with pytest.raises(ValueError, match="noise_scale"):
        validate(
            dict(batch_size_schedule="adaptive", epochs=1, max_global_batch_size=8, noise_scale=0)
        )
    with pytest.raises(ValueError, match="epochs"):
        validate(dict(batch_size_schedule="adaptive", max_steps=5, max_global_batch_size=8))
    assert validate(dict(batch_size_schedule="adaptive", epochs=1, max_global_batch_size=8))
    assert validate(dict(lr_scaling={"rule": "adascale"})).noise_scale


def test_adascale_learning_rate_uses_the_base_batch_trace():
    """tr S of AdaScale is the base batch's: the per-item trace over its items (formula)."""
    from bigbatch.core.noise import NoiseScale
    from bigbatch.train.planner import BatchPlanner

    config = validate(
        dict(
            global_batch_size=64,
            micro_batch_size=8,
            epochs=1,
            lr_scaling={"rule": "adascale", "base_batch_size": 32},
            lr_schedule="constant",
        )
    )
    planner = BatchPlanner(config, 1, range(1000), probe=lambda unit: 8)  # type: ignore[arg-type]
    noise = NoiseScale(
        critical_batch_size=50.0, gradient_sq_norm=2.0, trace_covariance=300.0, num_steps=9
    )
    items_per_sample = 3.0
    lr = planner.learning_rate(0.1, 0, 10, 0, noise, items_per_sample)
    base_trace = 300.0 / (32 * items_per_sample)
    scale = 64 / 32
    expected_gain = (base_trace + 2.0) / (base_trace / scale + 2.0)
    assert lr == pytest.approx(
        0.1 * expected_gain * lr_factor(0, 10, config.warmup_steps, "constant")
    )


def test_noise_scale_summary_compares_in_samples():
    """B_crit is measured in loss items; the advice compares it with B in samples."""
    from bigbatch.train.report import noise_scale_summary

    summary = noise_scale_summary(300.0, 64, 3.0, adaptive=False)
    assert summary["critical_batch_samples"] == pytest.approx(100.0)
    advice = summary["sections"]["Gradient noise scale"]
    assert "B_crit = 100 samples, 300 loss items" in advice
    assert "B / B_crit = 0.64" in advice
