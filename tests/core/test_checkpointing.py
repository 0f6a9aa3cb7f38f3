"""Activation checkpointing of units: which units, and the same numbers as without it.

Exactness is checked against the float64 full-batch reference of tests/reference.py; where the
split itself changes the numbers (BatchNorm normalises per micro-batch) against the same run
without checkpointing, computed separately. Each test also checks that the recompute happened,
so none of them can pass with checkpointing quietly off.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest
import torch

from bigbatch import Accumulator, apply_activation_checkpointing
from bigbatch.choices import checkpoint_interval, parse_activation_checkpointing
from bigbatch.core.checkpointing import (
    checkpointed_units,
    remove_activation_checkpointing,
    summarize_checkpointing,
)
from bigbatch.units import UsageError
from tests import hf_models
from tests.reference import full_batch_sgd, relative_error

LR = 0.3
ROWS = [3, 5, 2]  # uneven micro-batches of one window


class Block(torch.nn.Module):
    """A residual block: linear, optional BatchNorm and dropout, tanh."""

    def __init__(self, width: int, batchnorm: bool, dropout: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.norm = torch.nn.BatchNorm1d(width) if batchnorm else torch.nn.Identity()
        self.dropout = torch.nn.Dropout(dropout)
        self.calls = 0  # forwards run, recomputes included
        # Under full checkpointing every second call is a recompute: above this many rows it
        # raises torch.OutOfMemoryError there, in backward.
        self.recompute_limit: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        limit = self.recompute_limit
        if limit is not None and self.calls % 2 == 0 and len(x) > limit:
            raise torch.OutOfMemoryError(f"simulated: {len(x)} rows in a recompute")
        return x + self.dropout(torch.tanh(self.norm(self.linear(x))))


class Net(torch.nn.Module):
    def __init__(self, blocks: int = 5, batchnorm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(4, 6)
        self.blocks = torch.nn.ModuleList(Block(6, batchnorm, dropout) for _ in range(blocks))
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=generator, dtype=torch.float64)
    return x, torch.randn(rows, 2, generator=generator, dtype=torch.float64)


def per_item_losses(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    dtype = next(model.parameters()).dtype
    losses = (model(x.to(dtype)) - y.to(dtype)).pow(2).sum(dim=1)
    return losses, torch.ones_like(losses)


def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    losses, _ = per_item_losses(model, batch)
    return losses.sum(), len(losses)


def windows(steps: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    out = []
    for step in range(steps):
        x, y = data(sum(ROWS), seed=10 + step)
        bounds = torch.tensor([0, *ROWS]).cumsum(0).tolist()
        out.append([(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])])
    return out


def train(model: torch.nn.Module, steps: int = 2, **accumulator_options) -> Accumulator:
    accumulator = Accumulator(
        model, torch.optim.SGD(model.parameters(), lr=LR), **accumulator_options
    )
    for window in windows(steps):
        accumulator.step(window, loss_fn)
    return accumulator


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("none", "none"),
        (" FULL ", "full"),
        ("every_2", "every_2"),
        ("every_003", "every_3"),
        ("offload", "offload"),
        ("auto", "auto"),
        (1, "full"),
        (4, "every_4"),
    ],
)
def test_policy_spellings(given, expected):
    assert parse_activation_checkpointing(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "every_1",
        "every_0",
        "every_",
        "every_x",
        "half",
        "",
        0,
        -2,
        True,
        2.5,
        None,
        "every_" + "9" * 40,
    ],
)
def test_bad_policy_is_one_line_naming_the_field(bad):
    with pytest.raises(UsageError) as error:
        parse_activation_checkpointing(bad)
    message = str(error.value)
    assert message.startswith("activation_checkpointing must be") and "\n" not in message
    assert '"every_<k>" with k >= 2' in message and len(message) < 200


def test_interval_of_each_policy():
    assert [checkpoint_interval(p) for p in ("none", "full", "every_4", "offload")] == [0, 1, 4, 0]
    with pytest.raises(UsageError, match="memory probe"):
        checkpoint_interval("auto")


@pytest.mark.parametrize(
    ("policy", "chosen"),
    [
        ("none", []),
        ("full", [0, 1, 2, 3, 4]),
        ("every_2", [0, 2, 4]),
        ("every_3", [0, 3]),
        ("every_9", [0]),
        (2, [0, 2, 4]),
    ],
)
def test_units_chosen_from_the_shard_units(policy, chosen):
    model = Net()
    names = list(model.state_dict())
    wrapped = apply_activation_checkpointing(model, policy)
    assert wrapped == [model.blocks[i] for i in chosen]
    assert checkpointed_units(model) == wrapped
    assert list(model.state_dict()) == names  # no wrapper module: the same parameter names
    summary = summarize_checkpointing(model, policy, wrapped)
    assert summary.num_candidates == 5
    assert summary.units == tuple(f"blocks.{i}" for i in chosen)
    if chosen:
        assert summary.describe().startswith(
            f"{summary.policy}: {len(chosen)} of 5 units (blocks.0"
        )
    else:
        assert summary.describe() == "none (5 units run without checkpointing)"


def test_second_call_replaces_the_first_and_none_removes():
    model = Net()
    apply_activation_checkpointing(model, "full")
    assert apply_activation_checkpointing(model, "every_2") == [model.blocks[i] for i in (0, 2, 4)]
    assert checkpointed_units(model) == [model.blocks[i] for i in (0, 2, 4)]
    apply_activation_checkpointing(model, "none")
    assert checkpointed_units(model) == []
    assert "forward" not in model.blocks[0].__dict__
    apply_activation_checkpointing(model, "full", units=[model.head])
    remove_activation_checkpointing(model)
    assert checkpointed_units(model) == []


def test_auto_and_foreign_units_are_refused():
    model = Net()
    with pytest.raises(UsageError, match="memory probe"):
        apply_activation_checkpointing(model, "auto")
    with pytest.raises(UsageError, match="not a submodule"):
        apply_activation_checkpointing(model, "full", units=[torch.nn.Linear(2, 2)])
    assert checkpointed_units(model) == []


@pytest.mark.parametrize("policy", ["full", "every_2", "every_3", "offload"])
def test_exact_against_the_full_batch_reference(policy):
    model = Net().double()
    reference = full_batch_sgd(
        model,
        [(torch.cat([b[0] for b in w]), torch.cat([b[1] for b in w])) for w in windows(2)],
        per_item_losses,
        LR,
    )
    wrapped = apply_activation_checkpointing(model, policy)
    train(model)
    assert relative_error(weights(model), reference) < 1e-12
    forwards = 2 * len(ROWS)
    recomputed = 0 if policy == "offload" else forwards
    for block in model.blocks:
        assert block.calls == forwards + (recomputed if block in wrapped else 0)


def test_out_of_memory_in_a_recompute_redoes_the_window_exactly(caplog):
    model = Net().double()
    reference = full_batch_sgd(
        model,
        [(torch.cat([b[0] for b in w]), torch.cat([b[1] for b in w])) for w in windows(2)],
        per_item_losses,
        LR,
    )
    apply_activation_checkpointing(model, "full")
    model.blocks[2].recompute_limit = 2
    accumulator = train(model)
    assert accumulator.max_micro_batch_size == 2  # 5 -> 3 -> 2, each failing in backward
    assert "out of memory with micro-batches of 5" in caplog.text
    assert relative_error(weights(model), reference) < 1e-12


def test_a_deep_copy_stays_checkpointed_on_its_own_units():
    model = Net().double()
    apply_activation_checkpointing(model, "every_2")
    twin = copy.deepcopy(model)
    assert checkpointed_units(twin) == [twin.blocks[i] for i in (0, 2, 4)]
    train(twin, steps=1)
    assert twin.blocks[0].calls == 2 * len(ROWS) and model.blocks[0].calls == 0


def test_dropout_draws_the_same_masks_in_the_recompute():
    plain, checkpointed = Net(dropout=0.3).double(), Net(dropout=0.3).double()
    apply_activation_checkpointing(checkpointed, "full")
    torch.manual_seed(7)
    train(plain)
    torch.manual_seed(7)
    train(checkpointed)
    assert relative_error(weights(checkpointed), weights(plain)) < 1e-13
    assert checkpointed.blocks[0].calls == 2 * plain.blocks[0].calls


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu_gives_the_same_step(precision):
    plain, checkpointed = Net(), Net()
    apply_activation_checkpointing(checkpointed, "every_2")
    train(plain, precision=precision)
    train(checkpointed, precision=precision)
    # Recomputed under the same autocast state: the same bf16 kernels on the same inputs.
    for name, value in weights(plain).items():
        assert torch.equal(weights(checkpointed)[name], value), name
    assert checkpointed.blocks[0].calls == 2 * plain.blocks[0].calls


@pytest.mark.filterwarnings("ignore:.*normalise with micro-batches")
@pytest.mark.parametrize("batchnorm", ["keep", "window"])
def test_batchnorm_running_statistics_updated_once(batchnorm):
    plain, checkpointed = Net(batchnorm=True).double(), Net(batchnorm=True).double()
    apply_activation_checkpointing(checkpointed, "every_2")
    train(plain, batchnorm=batchnorm)
    train(checkpointed, batchnorm=batchnorm)
    expected = plain.state_dict()
    for name, value in checkpointed.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=1e-13, atol=0), name
    steps = 2 if batchnorm == "window" else 2 * len(ROWS)
    assert int(checkpointed.blocks[0].norm.num_batches_tracked) == steps
    assert checkpointed.blocks[0].calls == 2 * plain.blocks[0].calls


def test_noise_scale_statistics_unchanged():
    plain, checkpointed = Net().double(), Net().double()
    apply_activation_checkpointing(checkpointed, "full")
    first = train(plain, steps=3, measure_noise_scale=True).noise_scale()
    second = train(checkpointed, steps=3, measure_noise_scale=True).noise_scale()
    assert first is not None and second is not None
    assert first.critical_batch_size is not None
    for field in ("critical_batch_size", "trace_covariance", "gradient_sq_norm"):
        assert getattr(second, field) == pytest.approx(getattr(first, field), rel=1e-10), field


def causal_loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    losses, mask = hf_models.causal_item_losses(model, batch)
    return losses.sum(), mask.sum()


@pytest.mark.parametrize(("policy", "layers"), [("full", [0, 1]), ("every_2", [0])])
def test_hugging_face_models_checkpoint_through_their_own_method(policy, layers):
    pytest.importorskip("transformers")
    model = hf_models.gpt2().train()
    everything = hf_models.causal_batch(9)
    reference = full_batch_sgd(model, [everything], hf_models.causal_item_losses, LR)
    wrapped = apply_activation_checkpointing(model, policy)
    blocks = model.transformer.h
    assert wrapped == [blocks[i] for i in layers]
    assert [bool(block.gradient_checkpointing) for block in blocks] == [i in layers for i in (0, 1)]
    assert "forward" not in blocks[0].__dict__  # the model's own mechanism, not bigbatch's
    calls = [0, 0]
    for index, block in enumerate(blocks):
        block.mlp.register_forward_pre_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    window = [hf_models.rows_of(everything, a, b) for a, b in ((0, 4), (4, 5), (5, 9))]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    Accumulator(model, optimizer).step(window, causal_loss_fn)
    assert relative_error(weights(model), reference) < 1e-12
    assert calls == [6 if i in layers else 3 for i in (0, 1)]
    summary = summarize_checkpointing(model, policy, wrapped)
    assert summary.units == tuple(f"transformer.h.{i}" for i in layers)
    assert summary.num_candidates == 2
    apply_activation_checkpointing(model, "none")
    assert not model.is_activation_checkpointing and checkpointed_units(model) == []
    model.activation_checkpointing_enable()  # by the user: bigbatch sees it
    assert checkpointed_units(model) == list(blocks)


def test_the_example_in_the_docs_prints_what_they_say():
    text = (Path(__file__).resolve().parents[2] / "docs" / "memory.md").read_text()
    section = text.split("**In your own loop**")[1]
    code, printed = re.findall(r"```(?:python|text)\n(.*?)```", section, re.DOTALL)[:2]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "docs/memory.md", "exec"), {"__name__": "docs_example"})
    assert output.getvalue() == printed


class WideBlock(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_falls_and_bf16_gradients_stay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(WideBlock(1024) for _ in range(8))).cuda()
    x = torch.randn(4096, 1024, device="cuda")
    peaks, gradients = {}, {}
    for policy in ("none", "every_2", "full", "offload"):
        apply_activation_checkpointing(model, policy)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        torch.cuda.synchronize()
        peaks[policy] = torch.cuda.max_memory_allocated() - before
        gradients[policy] = [p.grad.detach().clone() for p in model.parameters()]
    assert peaks["full"] < peaks["every_2"] < peaks["none"]
    assert peaks["offload"] < peaks["none"]
    for policy in ("every_2", "full", "offload"):
        for actual, expected in zip(gradients[policy], gradients["none"]):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
