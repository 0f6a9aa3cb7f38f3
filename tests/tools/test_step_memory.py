"""The optimizer step's own temporaries (`bigbatch.tools.step_memory`), against formulas."""

from __future__ import annotations

import pytest
import torch

from bigbatch.tools.step_memory import AllocatedBytes, optimizer_step_bytes

SHAPES = [(30, 50), (50,), (50, 7), (7,)]  # a Linear(30, 50) and a Linear(50, 7)
LARGEST, TOTAL = 4 * 30 * 50, 4 * (30 * 50 + 50 + 50 * 7 + 7)


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
