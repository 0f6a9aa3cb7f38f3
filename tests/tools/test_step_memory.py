"""The optimizer step's own temporaries (`bigbatch.tools.step_memory`), against formulas, and
measured once per optimizer setup where probes share a `StepBytesCache`."""

from __future__ import annotations

import pytest
import torch

from bigbatch.recipes import tinylm
from bigbatch.tools import memory, step_memory
from bigbatch.tools.joint import CANDIDATES, choose_plan
from bigbatch.tools.step_memory import AllocatedBytes, StepBytesCache, optimizer_step_bytes

SHAPES = [(30, 50), (50,), (50, 7), (7,)]  # a Linear(30, 50) and a Linear(50, 7)
LARGEST, TOTAL = 4 * 30 * 50, 4 * (30 * 50 + 50 + 50 * 7 + 7)
TINY_LM = {"num_layers": 2, "d_model": 16, "num_heads": 2, "num_train_samples": 16}


def parameters() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


@pytest.mark.parametrize(
    ("make_optimizer", "expected"),
    [
        # single-tensor Adam(W): sqrt(v) and sqrt(v) / bias correction, per parameter
        (lambda ps: torch.optim.AdamW(ps, weight_decay=0.1), 2 * LARGEST),
        (lambda ps: torch.optim.Adam(ps, amsgrad=True), 2 * LARGEST),
        # foreach: sqrt(v) of every parameter at once, then divided and shifted in place
        (lambda ps: torch.optim.AdamW(ps, foreach=True), TOTAL),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False), 0),
    ],
)
def test_step_bytes_match_the_formula(make_optimizer, expected) -> None:
    params = parameters()
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer(params)
    assert optimizer_step_bytes(optimizer) == expected
    assert not optimizer.state  # the optimizer and its parameters are left as they were
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_no_optimizer_counts_nothing() -> None:
    assert optimizer_step_bytes(None) == 0


def test_allocated_bytes_skip_views_and_in_place_updates() -> None:
    held = torch.ones(1000)  # 4,000 bytes from before: not counted, nor what reuses it
    tracker = AllocatedBytes()
    with tracker:
        transposed = held.view(10, 100).t()  # a view
        held.mul_(2)  # in place
        first = held * 2  # 4,000 new bytes
        second = first + 1  # 4,000 more while both live
        del first
        third = torch.zeros(500, dtype=torch.float64)  # 4,000 after the first was freed
    assert tracker.peak == 8_000
    assert tracker.live == 8_000
    assert transposed.shape == (100, 10) and second.shape == third.shape[:0] + (1000,)


def _mlp_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().sum()


def _rows(n: int) -> torch.Tensor:
    return torch.ones(n, 30)


@pytest.fixture
def measurements(monkeypatch) -> list[torch.optim.Optimizer]:
    """Every optimizer whose step is measured from now on, in order."""
    measured: list[torch.optim.Optimizer] = []

    def counting(optimizer: torch.optim.Optimizer) -> int:
        measured.append(optimizer)
        return optimizer_step_bytes(optimizer)

    monkeypatch.setattr(step_memory, "optimizer_step_bytes", counting)
    return measured


def test_probes_sharing_a_cache_measure_each_optimizer_setup_once(measurements) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.Linear(50, 7))
    adamw = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    cache = StepBytesCache()
    probed = [
        memory.probe(model, _mlp_loss, _rows, [1, 2], optimizer=adamw, step_bytes_cache=cache)
        for _ in range(3)
    ]
    assert measurements == [adamw]
    fresh = optimizer_step_bytes(adamw)  # measured again, outside the cache
    assert [p.step_bytes for p in probed] == [fresh] * 3 == [2 * LARGEST] * 3
    # another optimizer over the same parameters is another setup: measured again
    foreach = torch.optim.AdamW(model.parameters(), foreach=True)
    again = memory.probe(model, _mlp_loss, _rows, [1], optimizer=foreach, step_bytes_cache=cache)
    assert measurements == [adamw, foreach]
    assert again.step_bytes == optimizer_step_bytes(foreach) == TOTAL
    # so are other parameter shapes under the same options
    wider = torch.nn.Sequential(torch.nn.Linear(30, 60), torch.nn.Linear(60, 7))
    other = torch.optim.AdamW(wider.parameters(), weight_decay=0.1)
    third = memory.probe(wider, _mlp_loss, _rows, [1], optimizer=other, step_bytes_cache=cache)
    assert measurements == [adamw, foreach, other]
    assert third.step_bytes == optimizer_step_bytes(other) == 2 * 4 * 30 * 60
    # and an option changed in place on the first
    adamw.param_groups[0]["foreach"] = True
    memory.probe(model, _mlp_loss, _rows, [1], optimizer=adamw, step_bytes_cache=cache)
    assert measurements == [adamw, foreach, other, adamw]


def test_a_probe_without_a_cache_measures_afresh(measurements) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(30, 50), torch.nn.Linear(50, 7))
    adamw = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        assert memory.probe(model, _mlp_loss, _rows, [1], optimizer=adamw).step_bytes == 2 * LARGEST
    assert measurements == [adamw, adamw]


def test_a_joint_choice_measures_the_step_once_over_every_policy(measurements) -> None:
    recipe = tinylm.build({"seed": 0, "recipe_options": TINY_LM})
    model = recipe.model
    adamw = torch.optim.AdamW(model.parameters())

    def make_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tinylm.collate([recipe.train_dataset[i] for i in range(n)])

    joint = choose_plan(
        model, tinylm.loss_fn, make_rows, max_rows=8, memory_budget_bytes=10**9,
        optimizer=adamw, device="cpu",
    )  # fmt: skip
    assert len(joint.choices) == len(CANDIDATES) > 1  # every policy probed, several sizes each
    assert measurements == [adamw]
    assert joint.choice.probe.step_bytes == optimizer_step_bytes(adamw) > 0
