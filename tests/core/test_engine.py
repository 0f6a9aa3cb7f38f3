"""The accumulated update equals a float64 full-batch step, for every kind of split."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bigbatch
from bigbatch.core import batches
from tests import models
from tests.reference import full_batch_gradients, relative_error, sgd_update

TOLERANCE = 1e-12


def split_rows(data: tuple[torch.Tensor, ...], sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tuple(t[s : s + n] for t in data) for s, n in zip(starts, sizes)]


def accumulated_weights(model, window, loss_fn, lr=1.0, **kwargs):
    model = copy.deepcopy(model)
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=lr), **kwargs)
    result = accumulator.step(window, loss_fn)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, result


SPLITS = {
    "one micro-batch": [24],
    "equal": [6, 6, 6, 6],
    "micro 1": [1] * 24,
    "uneven": [7, 7, 5, 5],
    "ragged": [11, 1, 9, 3],
}


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_masked_tokens_match_full_batch(sizes):
    model = models.token_model()
    tokens, labels = models.token_data(sum(sizes))
    expected = sgd_update(
        model,
        full_batch_gradients(
            model,
            lambda m: (models.token_losses(m, tokens, labels), (labels != models.IGNORE).double()),
        ),
        lr=1.0,
    )
    actual, result = accumulated_weights(
        model, split_rows((tokens, labels), sizes), models.token_loss_fn
    )
    assert relative_error(actual, expected) < TOLERANCE
    assert result.num_items == int((labels != models.IGNORE).sum())
    assert result.micro_batches == len(sizes)


@pytest.mark.parametrize("sizes", SPLITS.values(), ids=SPLITS.keys())
def test_scalar_mean_form_weighs_uneven_micro_batches(sizes):
    model = models.mlp()
    x, y = models.regression_data(sum(sizes))
    expected = sgd_update(
        model,
        full_batch_gradients(model, lambda m: (models.mse_per_sample(m, x, y), torch.ones(len(x)))),
        lr=1.0,
    )
    actual, result = accumulated_weights(
        model, split_rows((x, y), sizes), lambda m, b: models.mse_per_sample(m, *b).mean()
    )
    assert relative_error(actual, expected) < TOLERANCE
    assert result.num_items == sum(sizes)
    full_loss = float(models.mse_per_sample(model, x, y).mean().detach())
    assert result.loss == pytest.approx(full_loss, rel=1e-12)


def test_partial_window_of_an_epoch_end():
    """A short last window (fewer items than planned) is still normalised by its own items."""
    model = models.token_model()
    tokens, labels = models.token_data(5, seed=7)
    expected = sgd_update(
        model,
        full_batch_gradients(
            model,
            lambda m: (models.token_losses(m, tokens, labels), (labels != models.IGNORE).double()),
        ),
        lr=1.0,
    )
    actual, _ = accumulated_weights(
        model, split_rows((tokens, labels), [4, 1]), models.token_loss_fn
    )
    assert relative_error(actual, expected) < TOLERANCE


def test_textbook_loop_is_wrong_where_bigbatch_is_exact():
    """Sanity check that the reference can tell: loss / k on masked tokens misses the full batch."""
    model = models.token_model()
    tokens, labels = models.token_data(24)
    gradients = full_batch_gradients(
        model,
        lambda m: (models.token_losses(m, tokens, labels), (labels != models.IGNORE).double()),
    )
    textbook = copy.deepcopy(model)
    window = split_rows((tokens, labels), [6, 6, 6, 6])
    for micro_batch in window:
        (models.token_mean_loss_fn(textbook, micro_batch) / len(window)).backward()
    textbook_gradients = {n: p.grad for n, p in textbook.named_parameters()}
    assert relative_error(textbook_gradients, gradients) > 1e-3


def test_clipping_reports_pre_clip_norm_and_clips_to_max():
    model = models.mlp()
    x, y = models.regression_data(12)
    gradients = full_batch_gradients(
        model, lambda m: (models.mse_per_sample(m, x, y), torch.ones(12))
    )
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in gradients.values()))
    max_norm = norm / 4
    # torch's documented clip coefficient: max_norm / (total_norm + 1e-6)
    coefficient = max_norm / (norm + 1e-6)
    expected = sgd_update(model, {k: g * coefficient for k, g in gradients.items()}, lr=1.0)
    actual, result = accumulated_weights(
        model,
        split_rows((x, y), [5, 7]),
        lambda m, b: models.mse_per_sample(m, *b).mean(),
        max_grad_norm=max_norm,
    )
    assert result.grad_norm == pytest.approx(norm, rel=1e-10)
    assert relative_error(actual, expected) < 1e-9


def test_scheduler_steps_once_per_optimizer_step():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    accumulator = bigbatch.Accumulator(model, optimizer, lr_scheduler=scheduler)
    x, y = models.regression_data(8)
    for step in range(3):
        result = accumulator.step(
            split_rows((x, y), [2, 2, 2, 2]), lambda m, b: models.mse_per_sample(m, *b).mean()
        )
        assert result.learning_rate == 0.5**step
    assert optimizer.param_groups[0]["lr"] == 0.5**3


def test_non_finite_loss_skips_and_leaves_weights_untouched():
    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0))
    x, y = models.regression_data(4)
    y[1, 0] = math.inf
    result = accumulator.step(
        split_rows((x, y), [2, 2]), lambda m, b: models.mse_per_sample(m, *b).mean()
    )
    assert result.skipped and "non-finite" in result.skip_reason
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_zero_items_skips_with_a_warning():
    model = models.token_model()
    tokens, labels = models.token_data(4)
    labels[:] = models.IGNORE
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.warns(UserWarning, match="no loss items"):
        result = accumulator.step(split_rows((tokens, labels), [2, 2]), models.token_loss_fn)
    assert result.skipped and result.num_items == 0


def test_empty_micro_batches_are_skipped_outside_ddp():
    model = models.mlp()
    x, y = models.regression_data(3)
    expected = sgd_update(
        model,
        full_batch_gradients(model, lambda m: (models.mse_per_sample(m, x, y), torch.ones(3))),
        1.0,
    )
    actual, result = accumulated_weights(
        model, split_rows((x, y), [1, 1, 1, 0]), lambda m, b: models.mse_per_sample(m, *b).mean()
    )
    assert relative_error(actual, expected) < TOLERANCE
    assert result.num_items == 3


@pytest.mark.parametrize(
    ("window", "loss_fn", "error", "match"),
    [
        ([], lambda m, b: m(b).sum(), ValueError, "window is empty"),
        ([torch.randn(2, 5)], lambda m, b: m(b), ValueError, "scalar loss"),
        ([torch.randn(2, 5)], lambda m, b: (m(b).sum(), -1), ValueError, "num_items must be >= 0"),
        (
            [torch.randn(2, 5)],
            lambda m, b: (m(b).sum(), 1.5),
            TypeError,
            "num_items must be an int",
        ),
        (
            [torch.randn(2, 5)],
            lambda m, b: (m(b).sum(), torch.tensor(1.5)),
            ValueError,
            "non-integer",
        ),
        ([torch.randn(2, 5)], lambda m, b: (m(b).sum(), 1, 2), TypeError, "length 3"),
        (["text"], lambda m, b: m(b).sum(), TypeError, "micro-batch must be a tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(window, loss_fn, error, match):
    model = models.mlp().float()
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(error, match=match):
        accumulator.step(window, loss_fn)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": True}, "max_grad_norm"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = models.mlp()
    with pytest.raises(ValueError, match=match):
        bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_grad_scaler_with_bf16_warns_it_has_no_effect():
    model = models.mlp().float()
    with pytest.warns(UserWarning, match="no effect"):
        bigbatch.Accumulator(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            precision="bf16",
            grad_scaler=torch.amp.GradScaler("cpu"),
        )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_runs_and_approximates_the_full_batch(precision):
    model = models.mlp().float()
    x, y = (t.float() for t in models.regression_data(32))
    expected = sgd_update(
        model,
        full_batch_gradients(model, lambda m: (models.mse_per_sample(m, x, y), torch.ones(32))),
        0.1,
    )
    model_copy = copy.deepcopy(model)
    accumulator = bigbatch.Accumulator(
        model_copy, torch.optim.SGD(model_copy.parameters(), lr=0.1), precision=precision
    )
    window = split_rows((x, y), [8, 8, 8, 8])
    result = accumulator.step(window, lambda m, b: models.mse_per_sample(m, *b).mean())
    assert not result.skipped
    actual = {n: p.detach() for n, p in model_copy.named_parameters()}
    before = {n: p.detach() for n, p in model.named_parameters()}
    step_expected = {k: expected[k] - before[k] for k in expected}
    step_actual = {k: actual[k] - before[k] for k in expected}
    assert relative_error(step_actual, step_expected) < 0.05
    if precision == "fp16":
        assert accumulator.grad_scaler is not None
        assert accumulator.state_dict()["grad_scaler"]["scale"] > 0


def test_fp16_overflow_skips_and_backs_off_the_scale():
    model = models.mlp().float()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    accumulator = bigbatch.Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", grad_scaler=scaler
    )
    x, y = (t.float() for t in models.regression_data(8))
    result = accumulator.step([(x, y * 1e4)], lambda m, b: models.mse_per_sample(m, *b).mean())
    assert result.skipped
    assert scaler.get_scale() < 2.0**60
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_dict_micro_batches_and_helpers_agree():
    model = models.token_model()
    tokens, labels = models.token_data(10)
    window = batches.split({"tokens": tokens, "labels": labels}, [4, 3, 3])
    assert batches.num_rows(batches.join(window)) == 10
    expected = sgd_update(
        model,
        full_batch_gradients(
            model,
            lambda m: (models.token_losses(m, tokens, labels), (labels != models.IGNORE).double()),
        ),
        lr=1.0,
    )
    actual, _ = accumulated_weights(
        model, window, lambda m, b: models.token_loss_fn(m, (b["tokens"], b["labels"]))
    )
    assert relative_error(actual, expected) < TOLERANCE


def count_hooks(model: torch.nn.Module) -> int:
    """Forward and backward hooks on every module, and tensor hooks on every parameter."""
    module_hooks = sum(
        len(hooks)
        for module in model.modules()
        for hooks in (
            module._forward_pre_hooks,
            module._forward_hooks,
            module._backward_pre_hooks,
            module._backward_hooks,
        )
    )
    return module_hooks + sum(len(p._backward_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize("batchnorm", ["window", "freeze"])
def test_close_removes_every_hook_and_the_model_trains_with_plain_autograd(batchnorm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    plain = copy.deepcopy(model)  # never seen by bigbatch: no hook
    accumulator = bigbatch.Accumulator(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        batchnorm=batchnorm,
        measure_noise_scale=True,
    )
    assert count_hooks(model) > 0
    x, y = models.regression_data(8)
    window = [(x[:5], y[:5]), (x[5:], y[5:])]
    accumulator.step(window, lambda m, b: models.mse_per_sample(m, *b).mean())
    accumulator.close()
    accumulator.close()  # idempotent
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match="after close"):
        accumulator.step(window, lambda m, b: models.mse_per_sample(m, *b).mean())
    # Plain autograd: the same gradients and running statistics as a copy bigbatch never touched.
    plain.load_state_dict(model.state_dict())
    for network in (model, plain):
        network.train()
        models.mse_per_sample(network, x, y).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
