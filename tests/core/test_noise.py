"""Gradient noise scale: tracker norms against naive autograd, the estimator against a closed form.

Reference: linear regression y = x.w* + noise, x ~ N(0, Lambda), noise sd sigma, per-item loss
0.5 (x.w - y)^2 at fixed weights w = w* + Delta. Its per-item gradient x (x.Delta - noise) has mean
G = Lambda Delta and, by Isserlis' theorem, tr(Sigma) = |Lambda Delta|^2
+ (Delta' Lambda Delta + sigma^2) tr(Lambda) (checked on a large sample below).
"""

from __future__ import annotations

import logging

import pytest
import torch

from bigbatch.core.noise import (
    GradientNormTracker,
    NoiseScaleEstimator,
    item_mean_sq_norms,
    step_estimates,
)
from tests import models

DIM = 4
SIGMA = 0.5
LOSS_SCALE = 3.0  # the engine backpropagates c * loss_sum; the estimate must not depend on c
DELTA = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
W_STAR = torch.ones(DIM, dtype=torch.float64)


def covariance() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    return a @ a.T / DIM + 0.2 * torch.eye(DIM, dtype=torch.float64)


CHOLESKY = torch.linalg.cholesky(covariance())  # x = z @ CHOLESKY.T has covariance Lambda


def closed_form(delta: torch.Tensor) -> tuple[float, float]:
    lam = covariance()
    gradient_sq = float((lam @ delta).pow(2).sum())
    trace = gradient_sq + float(delta @ lam @ delta + SIGMA**2) * float(torch.trace(lam))
    return gradient_sq, trace


def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=generator, dtype=torch.float64) @ CHOLESKY.T
    y = x @ W_STAR + SIGMA * torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def regression_model(delta: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((W_STAR + delta).unsqueeze(0))
    return model


def window_norms(model, tracker, sizes, generator):
    """A test-local accumulation loop: backward of c * loss sum per micro-batch, no update."""
    model.zero_grad(set_to_none=True)
    raw = []
    for size in sizes:
        x, y = sample(size, generator)
        tracker.begin_micro_step()
        loss_sum = 0.5 * (model(x).squeeze(-1) - y).pow(2).sum()
        (LOSS_SCALE * loss_sum).backward()
        raw.append(tracker.end_micro_step())
    items = torch.tensor(sizes, dtype=torch.float64)
    total = int(items.sum())
    global_sq = float((model.weight.grad / (LOSS_SCALE * total)).pow(2).sum())
    return item_mean_sq_norms(torch.stack(raw), items, LOSS_SCALE), items, global_sq, total


def estimate(model, estimator, sizes, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    tracker = GradientNormTracker(model.parameters())
    result = None
    for _ in range(steps):
        result = estimator.update(*window_norms(model, tracker, sizes, generator))
    tracker.remove()
    return result


def assert_close_to(result, delta: torch.Tensor, tolerance: float = 0.15) -> None:
    gradient_sq, trace = closed_form(delta)
    assert result.gradient_sq_norm == pytest.approx(gradient_sq, rel=tolerance)
    assert result.trace_covariance == pytest.approx(trace, rel=tolerance)
    assert result.critical_batch_size == pytest.approx(trace / gradient_sq, rel=tolerance)


def test_closed_form_holds_on_a_large_sample():
    x, y = sample(400_000, torch.Generator().manual_seed(5))
    per_item = x * (x @ (W_STAR + DELTA) - y).unsqueeze(1)
    mean = per_item.mean(0)
    gradient_sq, trace = closed_form(DELTA)
    assert float(mean.pow(2).sum()) == pytest.approx(gradient_sq, rel=0.03)
    assert float((per_item - mean).pow(2).sum(1).mean()) == pytest.approx(trace, rel=0.02)


class TiedModel(torch.nn.Module):
    """Uses one weight twice, and has a parameter the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = torch.nn.Linear(5, 5).double()
        self.unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


@pytest.mark.parametrize("make_model", [models.mlp, TiedModel])
def test_tracker_matches_naive_per_micro_batch_gradients(make_model):
    model = make_model()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    tracker = GradientNormTracker(model.parameters())
    parameters = [p for p in model.parameters() if p.requires_grad]
    for start, stop in [(0, 4), (4, 5), (5, 9)]:

        def loss(xs=x[start:stop], ys=y[start:stop]):
            return (model(xs)[:, :3] - ys[:, :3]).pow(2).sum()

        naive = torch.autograd.grad(loss(), parameters, allow_unused=True)
        expected = sum(float(g.pow(2).sum()) for g in naive if g is not None)
        tracker.begin_micro_step()
        loss().backward()
        assert float(tracker.end_micro_step()) == pytest.approx(expected, rel=1e-12)
    # A backward outside begin/end is not recorded; remove() detaches the hooks.
    loss().backward()
    tracker.begin_micro_step()
    tracker.remove()
    loss().backward()
    assert float(tracker.end_micro_step()) == 0.0


def test_step_estimates_match_the_equal_batch_formula():
    # McCandlish et al. (A.1) with micro-batches of b items and the window of B = k b items.
    micro, b, big_sq, k = [2.0, 3.0, 4.5, 2.5], 8, 1.2, 4
    small_sq = sum(micro) / k
    big = k * b
    gradient_sq, trace = step_estimates(micro, [b] * k, big_sq, big)
    assert gradient_sq == pytest.approx((big * big_sq - b * small_sq) / (big - b), rel=1e-12)
    assert trace == pytest.approx((small_sq - big_sq) / (1 / b - 1 / big), rel=1e-12)
    # Empty micro-batches are left out, not counted as batches of zero items.
    assert step_estimates(micro + [0.0], [b] * k + [0], big_sq, big) == (gradient_sq, trace)


def test_estimate_equal_micro_batches_within_15_percent():
    result = estimate(regression_model(DELTA), NoiseScaleEstimator(10_000), [4] * 8, 600, seed=1)
    assert result.num_steps == 600
    assert_close_to(result, DELTA)


def test_estimate_uneven_micro_batches_within_15_percent():
    sizes = [1, 2, 3, 5, 8, 13]
    result = estimate(regression_model(DELTA), NoiseScaleEstimator(10_000), sizes, 1000, seed=2)
    assert_close_to(result, DELTA)


def test_estimate_follows_when_delta_changes():
    estimator = NoiseScaleEstimator(smoothing_steps=150)
    first = estimate(regression_model(DELTA), estimator, [4] * 8, 300, seed=3)
    assert_close_to(first, DELTA)
    second = estimate(regression_model(3 * DELTA), estimator, [4] * 8, 700, seed=4)
    assert_close_to(second, 3 * DELTA)
    old, new = (trace / gradient_sq for gradient_sq, trace in map(closed_form, [DELTA, 3 * DELTA]))
    assert new < 0.7 * old  # the change is large enough for 15% to tell them apart
    assert abs(second.critical_batch_size - new) < 0.5 * abs(new - old)


def test_one_micro_batch_gives_no_estimate_and_warns_once(caplog):
    estimator = NoiseScaleEstimator()
    assert estimator.current().critical_batch_size is None
    with caplog.at_level(logging.WARNING, logger="bigbatch.core.noise"):
        for _ in range(3):
            result = estimator.update(
                torch.tensor([2.0, 0.0]),
                torch.tensor([8.0, 0.0]),
                global_sq_norm=2.0,
                global_items=8,
            )
    assert result.critical_batch_size is None and result.num_steps == 0
    assert sum("no small/large batch pair" in r.message for r in caplog.records) == 1


def test_state_dict_resume_continues_the_same_estimate():
    steps = [
        (torch.tensor([3.0, 2.0, 5.0]), torch.tensor([4.0, 4.0, 2.0]), 1.0 + i / 10, 10)
        for i in range(6)
    ]
    uninterrupted = NoiseScaleEstimator(smoothing_steps=4)
    for s in steps:
        expected = uninterrupted.update(*s)
    first = NoiseScaleEstimator(smoothing_steps=4)
    for s in steps[:3]:
        first.update(*s)
    state = first.state_dict()
    assert all(isinstance(v, (int, float, bool)) for v in state.values())
    resumed = NoiseScaleEstimator(smoothing_steps=4)
    resumed.load_state_dict(state)
    for s in steps[3:]:
        result = resumed.update(*s)
    assert result == expected


def test_item_mean_sq_norms_divides_by_scaled_counts_and_zeroes_empty():
    raw = torch.tensor([36.0, 5.0, 8.0], dtype=torch.float64)
    items = torch.tensor([3, 0, 1])
    result = item_mean_sq_norms(raw, items, torch.tensor(2.0))
    assert result.tolist() == [36.0 / 36.0, 0.0, 8.0 / 4.0]


def pack(norms: torch.Tensor, items: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's norms and counts in its own slots, so one SUM all-reduce gathers every rank's."""
    k = norms.numel()
    packed = torch.zeros(2 * k * world_size, dtype=torch.float64)
    packed[rank * k : (rank + 1) * k] = norms
    packed[k * world_size + rank * k : k * world_size + (rank + 1) * k] = items.double()
    return packed


def estimate_on_rank(rank: int, world_size: int) -> dict:
    """Each rank backpropagates its own uneven micro-batches; one SUM all-reduce gathers norms."""
    import torch.distributed as dist

    sizes = [[2, 5, 3], [4, 1, 6]][rank]
    model = regression_model(DELTA)
    tracker = GradientNormTracker(model.parameters())
    estimator = NoiseScaleEstimator(10_000)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(500):
        norms, items, _, _ = window_norms(model, tracker, sizes, generator)
        packed = pack(norms, items, rank, world_size)
        gradient_sum = model.weight.grad.reshape(-1) / LOSS_SCALE
        merged = torch.cat([packed, gradient_sum])  # the engine merges its totals likewise
        dist.all_reduce(merged)
        all_norms, all_items = merged[: packed.numel()].chunk(2)
        global_items = int(all_items.sum())
        global_sq = float((merged[packed.numel() :] / global_items).pow(2).sum())
        result = estimator.update(all_norms, all_items, global_sq, global_items)
    return {"result": result, "gathered_items": all_items.tolist()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_estimate_under_two_processes_within_15_percent():
    from tests.distributed_helpers import run_processes

    outputs = run_processes(estimate_on_rank, 2)
    assert outputs[0]["gathered_items"] == [2.0, 5.0, 3.0, 4.0, 1.0, 6.0]
    assert outputs[0]["result"] == outputs[1]["result"]
    assert_close_to(outputs[0]["result"], DELTA)
