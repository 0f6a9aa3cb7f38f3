"""The memory probe (`bigbatch.tools.memory`) and the micro-batch choice (`tools.autobatch`).

Both are checked against formulas and an independent count of the autograd graph.
"""

from __future__ import annotations

import copy
import math
import random
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigbatch import units
from bigbatch.core.engine import LossFn
from bigbatch.recipes import Recipe
from bigbatch.tools import autobatch, memory, projection

D_IN, D_HIDDEN, D_OUT = 5, 16, 3


def make_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(D_HIDDEN, D_OUT)
    ).double()


def mlp_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, D_IN, dtype=torch.float64), torch.randn(n, D_OUT, dtype=torch.float64)


def mlp_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).sum(dim=1).mean()


# By hand, float64: addmm saves its input x (n x 5), tanh saves its output (n x 16) which the
# second addmm saves again (same storage), pow saves model(x) - y (n x 3); weights are parameters.
MLP_SAVED_PER_SAMPLE = 8 * (D_IN + D_HIDDEN + D_OUT)
MLP_PARAMETER_BYTES = 8 * (D_IN * D_HIDDEN + D_HIDDEN + D_HIDDEN * D_OUT + D_OUT)
# AdamW's single-tensor step (CPU) builds sqrt(v) and its division by the bias correction out of
# place: two tensors the size of the largest parameter live at once. SGD updates in place.
ADAMW_STEP_BYTES = 2 * 8 * D_IN * D_HIDDEN


class TinyGPT(torch.nn.Module):
    """Token and position embeddings, one causal pre-norm block, a tied output projection."""

    def __init__(self, vocab: int = 13, width: int = 16, length: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.randn(length, width) * 0.1)
        self.block = torch.nn.TransformerEncoderLayer(
            width, 2, 2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.mask = torch.nn.Transformer.generate_square_subsequent_mask(length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.block(self.embed(tokens) + self.position, src_mask=self.mask, is_causal=True)
        return hidden @ self.embed.weight.t()


def gpt_batch(n: int) -> torch.Tensor:
    return torch.randint(0, 13, (n, 7))


def gpt_loss(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return loss, tokens[:, 1:].numel()


def graph_saved_bytes(model: torch.nn.Module, loss: torch.Tensor) -> int:
    """An independent count: walk the autograd graph and read every node's saved tensors."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                values = getattr(node, name)
                for value in values if isinstance(values, (tuple, list)) else [values]:
                    if isinstance(value, torch.Tensor) and value.numel():
                        storage = value.untyped_storage()
                        if storage.data_ptr() not in parameters:
                            storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def test_parse_memory_size() -> None:
    assert units.parse_memory_size(123) == 123
    assert units.parse_memory_size("512MiB") == 512 * 1024**2
    assert units.parse_memory_size("20GiB") == 20 * 1024**3
    assert units.parse_memory_size("1.5GB") == 1_500_000_000
    assert units.parse_memory_size("2 kib") == 2048
    for bad in ("2 parsecs", "GiB", "-1GiB", "0", 0):
        with pytest.raises(ValueError, match="memory_budget"):
            units.parse_memory_size(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="memory_budget"):
        units.parse_memory_size(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make_optimizer", "state_buffers"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 0),
        (None, None),
    ],
)
def test_mlp_memory_is_linear_and_matches_the_formula(make_optimizer, state_buffers) -> None:
    model = make_mlp()
    optimizer = make_optimizer(model.parameters()) if make_optimizer else None
    result = memory.probe(model, mlp_loss, mlp_batch, [1, 2, 4, 8], optimizer=optimizer)
    # parameters + gradients + optimizer state buffers, all the size of the parameters
    fixed = MLP_PARAMETER_BYTES * (2 + (state_buffers or 0))
    assert [row.micro_batch_size for row in result.rows] == [1, 2, 4, 8]
    assert result.step_bytes == 0  # SGD steps in place
    for row in result.rows:
        assert row.saved_tensor_bytes == MLP_SAVED_PER_SAMPLE * row.micro_batch_size
        assert row.memory_bytes == fixed + MLP_SAVED_PER_SAMPLE * row.micro_batch_size
        assert row.samples_per_s > 0
    assert result.fit_relative_error < 1e-9
    assert result.fixed_bytes == pytest.approx(fixed)
    assert result.bytes_per_sample == pytest.approx(MLP_SAVED_PER_SAMPLE)
    assert result.predict(100) == pytest.approx(fixed + 100 * MLP_SAVED_PER_SAMPLE)
    assert result.device_type == "cpu"


def test_adamw_memory_is_the_larger_of_backward_and_step() -> None:
    """The step runs after the backward freed the activations: below ADAMW_STEP_BYTES of saved
    tensors (6.7 samples) the step's temporaries set the peak, above it the activations do."""
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    result = memory.probe(model, mlp_loss, mlp_batch, [1, 2, 4, 8, 16], optimizer=optimizer)
    fixed = MLP_PARAMETER_BYTES * 4  # parameters, gradients, two AdamW buffers
    assert result.step_bytes == ADAMW_STEP_BYTES
    assert result.step_peak_bytes == fixed + ADAMW_STEP_BYTES
    for row in result.rows:
        saved = MLP_SAVED_PER_SAMPLE * row.micro_batch_size
        assert row.saved_tensor_bytes == saved
        assert row.memory_bytes == fixed + saved  # the forward + backward alone
        assert result.peak(row.micro_batch_size) == fixed + max(saved, ADAMW_STEP_BYTES)
    assert result.largest_fitting(fixed + ADAMW_STEP_BYTES - 1, 64) == 0  # the step does not fit
    assert result.largest_fitting(fixed + ADAMW_STEP_BYTES, 64) == 6


def test_transformer_memory_is_linear_and_matches_the_graph() -> None:
    model = TinyGPT().train()
    result = memory.probe(model, gpt_loss, gpt_batch, [1, 2, 4, 8], repetitions=1)
    assert result.fit_relative_error < 1e-3
    assert result.bytes_per_sample > 0
    for row in result.rows:
        torch.manual_seed(1)
        loss, _ = gpt_loss(model, gpt_batch(row.micro_batch_size))
        assert row.saved_tensor_bytes == graph_saved_bytes(model, loss)
        del loss
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert result.model_bytes == 2 * parameter_bytes + buffer_bytes


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, amsgrad=True),
        lambda ps: torch.optim.RMSprop(ps, momentum=0.9, centered=True),
        lambda ps: torch.optim.Adafactor(ps),  # not in the table: counted by stepping a copy
        lambda ps: torch.optim.ASGD(ps),
    ],
)
def test_optimizer_state_bytes_match_a_stepped_copy(make_optimizer) -> None:
    model = make_mlp()
    optimizer = make_optimizer(model.parameters())
    counted = memory.optimizer_state_bytes(optimizer)
    assert not optimizer.state  # not stepped
    mlp_loss(model, mlp_batch(4)).backward()
    optimizer.step()
    stepped = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    assert stepped <= counted <= stepped + 64 * len(optimizer.state)  # scalar step counters


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HIDDEN),
        torch.nn.BatchNorm1d(D_HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(D_HIDDEN, D_OUT),
    ).double()


def random_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from torch, numpy and python's RNGs, so the probe must restore all three."""
    shift = np.random.rand() + random.random()
    return mlp_batch(n)[0] + shift, mlp_batch(n)[1]


def test_probe_leaves_model_optimizer_grads_and_rng_as_they_were() -> None:
    model = bn_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    mlp_loss(model, random_batch(6)).backward()
    optimizer.step()  # some optimizer state, running stats and gradients to keep
    model[0].bias.grad = None  # and one parameter without a gradient
    parameters = copy.deepcopy(dict(model.named_parameters()))
    buffers = copy.deepcopy(dict(model.named_buffers()))
    grads = {name: p.grad for name, p in model.named_parameters()}
    grad_values = {name: None if g is None else g.clone() for name, g in grads.items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    memory.probe(model, mlp_loss, random_batch, [2, 4], optimizer=optimizer)  # BN needs 2

    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    assert [name for name, value in grad_values.items() if value is None] == ["0.bias"]
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters[name])
        assert parameter.grad is grads[name]  # the same tensor, or still None
        if grad_values[name] is not None:
            assert torch.equal(parameter.grad, grad_values[name])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value)


def test_choice_is_the_largest_that_fits_the_budget() -> None:
    fixed = 4 * MLP_PARAMETER_BYTES  # AdamW: parameters, gradients, two state buffers
    # Up to 6 samples the step's temporaries (ADAMW_STEP_BYTES) exceed the saved activations.
    for expected in (6, 7, 37):
        needs = fixed + max(expected * MLP_SAVED_PER_SAMPLE, ADAMW_STEP_BYTES)
        budget = math.ceil((needs + 10) * 1.1)
        model = make_mlp()
        choice = autobatch.choose_micro_batch_size(
            model,
            mlp_loss,
            mlp_batch,
            max_micro_batch_size=1000,
            memory_budget_bytes=budget,
            optimizer=torch.optim.AdamW(model.parameters()),
            repetitions=1,
        )
        assert choice.micro_batch_size == expected
        assert choice.memory_budget_bytes == budget
        row = {r.micro_batch_size: r for r in choice.probe.rows}[expected]
        assert row.memory_bytes * 1.1 <= budget  # the chosen size was measured and fits
        assert "fits" in choice.reason


def workspace_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """The MLP's loss plus a saved workspace of 64 float64 per row that stops growing at 8 rows:
    memory is steeper over the first probes (1, 2, 4, 8) than beyond them."""
    rows = batch[0].shape[0]
    workspace = torch.ones(64 * min(rows, 8), dtype=torch.float64)
    weight = next(model.parameters())
    return mlp_loss(model, batch) + (weight.sum() * workspace).sum() * 0.0


def test_memory_choice_grows_past_the_first_fit_where_measurements_allow() -> None:
    # Issue 25: the line through 1, 2, 4, 8 overestimates larger sizes; its first fit (16 here)
    # fits with room to spare, and the choice must grow to the largest size that fits.
    measured = memory.probe(make_mlp(), workspace_loss, mlp_batch, range(1, 65), repetitions=1)
    used = {row.micro_batch_size: row.memory_bytes for row in measured.rows}
    budget = math.ceil((used[40] + 10) * 1.1)
    # Independent of the search: the largest size whose measured memory fits.
    expected = max(size for size, bytes_ in used.items() if bytes_ * 1.1 <= budget)
    first = memory.probe(make_mlp(), workspace_loss, mlp_batch, [1, 2, 4, 8], repetitions=1)
    assert first.largest_fitting(budget / 1.1, 64) < expected == 40  # the line stops short
    choice = autobatch.choose_micro_batch_size(
        make_mlp(),
        workspace_loss,
        mlp_batch,
        max_micro_batch_size=64,
        memory_budget_bytes=budget,
        repetitions=1,
    )
    assert choice.micro_batch_size == expected
    row = {r.micro_batch_size: r for r in choice.probe.rows}[expected]
    assert row.memory_bytes * 1.1 <= budget


def test_choice_never_exceeds_the_rank_share() -> None:
    choice = autobatch.choose_micro_batch_size(
        make_mlp(), mlp_loss, mlp_batch, max_micro_batch_size=6, memory_budget_bytes="1GiB"
    )
    assert choice.micro_batch_size == 6
    assert max(row.micro_batch_size for row in choice.probe.rows) == 6
    assert "max_micro_batch_size 6" in choice.reason


def test_budget_below_the_smallest_size_is_a_clear_error() -> None:
    model = make_mlp()
    # micro_batch_size 1 with SGD and momentum (one state buffer, a step in place)
    needs = 3 * MLP_PARAMETER_BYTES + MLP_SAVED_PER_SAMPLE
    with pytest.raises(ValueError) as error:
        autobatch.choose_micro_batch_size(
            model,
            mlp_loss,
            mlp_batch,
            max_micro_batch_size=64,
            memory_budget_bytes=needs,  # fits without headroom, not with 10%
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        )
    message = str(error.value)
    assert f"memory_budget {units.format_bytes(needs)} is below" in message
    assert "micro_batch_size 1 needs" in message
    assert f"{units.format_bytes(MLP_SAVED_PER_SAMPLE)} per sample" in message
    assert f"at least {units.format_bytes(needs * 1.1)}" in message


def test_cpu_without_a_budget_asks_for_one() -> None:
    with pytest.raises(ValueError, match="memory_budget is required on cpu"):
        autobatch.choose_micro_batch_size(
            make_mlp(), mlp_loss, mlp_batch, max_micro_batch_size=8, memory_budget_bytes=None
        )


def counted_cost(monkeypatch, seconds_per_pass) -> LossFn:
    """A loss whose every pass costs seconds_per_pass(rows) on a fake clock: no machine timing.

    The clock (time.perf_counter and time.thread_time) moves only when the loss runs, so the
    time of a pass is exactly its cost and the choice is the same on any machine and load.
    """
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "thread_time", lambda: now[0])

    def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        now[0] += seconds_per_pass(batch[0].shape[0])
        return mlp_loss(model, batch)

    return loss


def test_throughput_choice_is_the_best_measured_that_fits(monkeypatch) -> None:
    # 5 ms per sample, except 1 ms for the whole micro-batch of 4: 4 is the fastest. On the counted
    # clock, not a sleep: with one torch thread the choice times CPU time, which a sleep never uses.
    loss = counted_cost(monkeypatch, lambda rows: 1e-3 if rows == 4 else 5e-3 * rows)
    budget = math.ceil((2 * MLP_PARAMETER_BYTES + 20 * MLP_SAVED_PER_SAMPLE) * 1.1)
    choice = autobatch.choose_micro_batch_size(
        make_mlp(),
        loss,
        mlp_batch,
        max_micro_batch_size=64,
        memory_budget_bytes=budget,
        optimize="throughput",
    )
    rows = choice.probe.rows
    assert {1, 2, 4, 8, 16, 20} <= {row.micro_batch_size for row in rows}
    fitting = [row for row in rows if row.memory_bytes * 1.1 <= budget]
    assert (
        choice.micro_batch_size == max(fitting, key=lambda row: row.samples_per_s).micro_batch_size
    )
    assert choice.micro_batch_size == 4
    assert "throughput" in choice.reason


def choose_for_throughput(loss, max_micro_batch_size: int, largest: int) -> int:
    """The throughput choice with a budget that fits exactly `largest` samples (AdamW)."""
    fixed = 4 * MLP_PARAMETER_BYTES
    budget = math.ceil((fixed + largest * MLP_SAVED_PER_SAMPLE + 10) * 1.1)
    model = make_mlp()
    choice = autobatch.choose_micro_batch_size(
        model,
        loss,
        mlp_batch,
        max_micro_batch_size=max_micro_batch_size,
        memory_budget_bytes=budget,
        optimizer=torch.optim.AdamW(model.parameters()),
        optimize="throughput",
    )
    assert "within 3% of the fastest" in choice.reason
    return choice.micro_batch_size


@pytest.mark.parametrize(
    ("speedup_at_32", "expected"),
    [
        (1.00, 64),  # a tie: the largest plan
        (0.99, 64),  # 2 x 32 x 0.99 ms = 63.4 ms vs 64 ms: 1% faster, within the 3% margin
        (0.975, 64),  # 2.5% faster: still within
        (0.96, 32),  # 4% faster: clearly faster, wins
        (0.90, 32),
    ],
)
def test_throughput_prefers_the_largest_plan_unless_a_smaller_is_clearly_faster(
    monkeypatch, speedup_at_32: float, expected: int
) -> None:
    # 1 ms per sample at every size: every plan of 64 samples takes 64 ms, except 32.
    loss = counted_cost(
        monkeypatch, lambda rows: 1e-3 * rows * (speedup_at_32 if rows == 32 else 1)
    )
    assert choose_for_throughput(loss, max_micro_batch_size=64, largest=64) == expected


def test_throughput_counts_micro_batches_per_step_and_refines_between_powers_of_two(
    monkeypatch,
) -> None:
    # 2 ms per pass + 1 ms per sample: fewer micro-batches per step are faster. The largest that
    # fits is 138, which on 256 samples runs as 2 micro-batches of 128: 128 is chosen.
    loss = counted_cost(monkeypatch, lambda rows: 2e-3 + 1e-3 * rows)
    assert choose_for_throughput(loss, max_micro_batch_size=256, largest=138) == 128
    # Now 86 (3 micro-batches of 86, 85, 85) is 20% faster per sample than anything else: it is
    # no power of two, and found only around the best power of two.
    loss = counted_cost(monkeypatch, lambda rows: 1e-3 * rows * (0.8 if rows == 86 else 1))
    assert choose_for_throughput(loss, max_micro_batch_size=256, largest=138) == 86


def oom_above_8(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    if batch[0].shape[0] > 8:
        raise torch.OutOfMemoryError("simulated: more than 8 rows")
    return mlp_loss(model, batch)


def test_out_of_memory_during_the_probe_caps_the_choice() -> None:
    choice = autobatch.choose_micro_batch_size(
        make_mlp(), oom_above_8, mlp_batch, max_micro_batch_size=100, memory_budget_bytes="1GiB"
    )
    assert choice.micro_batch_size == 8
    assert choice.probe.oom_micro_batch_size is not None
    assert choice.probe.oom_micro_batch_size > 8


def tiny_recipe(config: dict) -> Recipe:
    """A recipe for plan_for_budget: the MLP on a tensor dataset."""
    x, y = mlp_batch(40)
    return Recipe(
        name="tiny",
        model=make_mlp(),
        train_dataset=torch.utils.data.TensorDataset(x, y),
        eval_dataset=None,
        loss_fn=mlp_loss,
        optimizer="sgd",
        defaults={"momentum": 0.9},
    )


def test_plan_for_budget_and_format_choice() -> None:
    # Parameters, gradients and SGD's momentum buffer on each of the 2 ranks (DDP's buckets are
    # the gradient: gradient_as_bucket_view).
    fixed = 3 * MLP_PARAMETER_BYTES
    budget = math.ceil((fixed + 10 * MLP_SAVED_PER_SAMPLE) * 1.1)
    choice, plan = autobatch.plan_for_budget(
        "tests.tools.test_memory:tiny_recipe",
        100,
        world_size=2,
        memory_budget=budget,
        device="cpu",
    )
    assert choice.micro_batch_size == 10
    assert plan.world_size == 2 and plan.micro_batch_size == 10
    assert plan.gradient_accumulation_steps == 5  # 100 = 10 x 2 x 5
    text = autobatch.format_choice(choice, plan)
    assert "micro_batch_size" in text and "samples/s" in text
    assert "<- chosen" in text
    assert str(plan) in text
    for row in choice.probe.rows:
        assert units.format_bytes(row.memory_bytes) in text
    assert choice.to_dict()["micro_batch_size"] == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_choice_fits_the_budget_when_trained() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 256)
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters())

    def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 256), torch.randn(n, 256)

    budget = 256 * 1024**2
    choice = autobatch.choose_micro_batch_size(
        model,
        mlp_loss,
        make_batch,
        max_micro_batch_size=1 << 20,
        memory_budget_bytes=budget,
        optimizer=optimizer,
    )
    assert choice.probe.fit_relative_error < 0.05
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() - sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # two real steps: optimizer state allocated, gradients kept between
        optimizer.zero_grad(set_to_none=True)
        batch = [t.to(device) for t in make_batch(choice.micro_batch_size)]
        mlp_loss(model, batch).backward()
        optimizer.step()
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert used <= budget, (used, budget, autobatch.format_choice(choice))


def test_cuda_default_budget_is_90_percent_of_free(monkeypatch) -> None:
    """The arithmetic only (no GPU here): a model held off the device adds nothing."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    budget = projection.resolve_budget(None, torch.device("cuda"), make_mlp(), None)
    assert budget == 900
