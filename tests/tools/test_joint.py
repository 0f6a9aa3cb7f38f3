"""The joint choice of activation checkpointing and micro-batch (`bigbatch.tools.joint`).

`pick` is checked on synthetic measurements (memory and time as formulas of the micro-batch)
against a brute-force search written here; the recompute accounting against the bytes a
Linear and a ReLU save, by formula; one real probe shows a tight budget choosing checkpointing
and a loose one choosing none, the model left checkpointed as chosen.
"""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.core.checkpointing import apply_activation_checkpointing, checkpointed_units
from bigbatch.recipes import tinylm
from bigbatch.tools.joint import PlanCandidate, choose_plan, pick, unit_recompute
from bigbatch.units import UsageError

SHARE = 96
HEADROOM = 0.1
FIXED = 1000.0
# policy: (checkpointed units of 8, bytes per row, seconds per micro-batch: overhead + per row)
POLICIES = {
    "none": (0, 40.0, (0.010, 0.0010)),
    "every_2": (4, 24.0, (0.012, 0.0012)),
    "full": (8, 8.0, (0.014, 0.0014)),
}


def seconds(policy: str, rows: int) -> float:
    overhead, per_row = POLICIES[policy][2]
    return overhead + per_row * rows


def items_per_s(policy: str, rows: int) -> float:
    return SHARE / (math.ceil(SHARE / rows) * seconds(policy, rows))


def synthetic(budget: float, optimize: str) -> list[PlanCandidate]:
    """Per policy the largest (memory) or fastest (throughput) rows whose memory fits."""
    candidates = []
    for policy, (units, per_row, _) in POLICIES.items():
        fitting = [m for m in range(1, SHARE + 1) if (FIXED + per_row * m) * 1.1 <= budget]
        if not fitting:
            candidates.append(PlanCandidate(policy, 0, 0, None, 0.0, None, units, note="no"))
            continue
        rows = max(fitting, key=lambda m: (items_per_s(policy, m), m))
        rows = max(fitting) if optimize == "memory" else rows
        speed = items_per_s(policy, rows) if optimize == "throughput" else None
        peak = FIXED + per_row * rows
        candidates.append(
            PlanCandidate(policy, rows, math.ceil(SHARE / rows), None, peak, speed, units)
        )
    return candidates


def fewest_steps_reference(budget: float) -> str:
    """Count micro-steps up from 1; at the first count some policy fits, the least recompute."""
    for steps in range(1, SHARE + 1):
        rows = math.ceil(SHARE / steps)
        for policy, (_, per_row, _) in POLICIES.items():  # the least recompute first
            if (FIXED + per_row * rows) * 1.1 <= budget:
                return policy
    raise AssertionError("nothing fits")


def fastest_reference(budget: float) -> str:
    """Every feasible (policy, rows); the fastest, then the least recompute within 3%."""
    speeds = {}
    for policy, (_, per_row, _) in POLICIES.items():
        rows = [m for m in range(1, SHARE + 1) if (FIXED + per_row * m) * 1.1 <= budget]
        if rows:
            speeds[policy] = max(items_per_s(policy, m) for m in rows)
    best = max(speeds.values())
    return next(p for p in POLICIES if p in speeds and speeds[p] * 1.03 >= best)


@pytest.mark.parametrize("budget", [1200.0, 1500.0, 2000.0, 3000.0, 5000.0, 6000.0])
def test_memory_picks_the_fewest_micro_steps_then_the_least_recompute(budget: float) -> None:
    chosen, reason = pick(synthetic(budget, "memory"), "memory")
    assert chosen.activation_checkpointing == fewest_steps_reference(budget)
    assert f"activation_checkpointing {chosen.activation_checkpointing}" in reason


@pytest.mark.parametrize("budget", [1200.0, 1500.0, 2000.0, 3000.0, 6000.0])
def test_throughput_picks_the_fastest_plan_that_fits(budget: float) -> None:
    chosen, _ = pick(synthetic(budget, "throughput"), "throughput")
    assert chosen.activation_checkpointing == fastest_reference(budget)


def test_nothing_fits_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match="no candidate fits"):
        pick(synthetic(1000.0, "memory"), "memory")


class Unit(torch.nn.Module):
    """A Linear then a ReLU: the Linear saves its input, the ReLU its output."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


def test_unit_recompute_is_what_the_largest_unit_saves() -> None:
    model = torch.nn.Sequential(Unit(6, 20), Unit(20, 4)).double()
    units = list(model)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(32, 6, dtype=torch.float64, generator=generator)
    loss = lambda m, x: m(x).sum()  # noqa: E731
    recompute = unit_recompute(
        model, loss, lambda n: data[:n].clone(), units, device=torch.device("cpu")
    )
    for rows in (1, 5, 32):
        # unit 0 saves its input (rows x 6) and output (rows x 20); unit 1: rows x 20, rows x 4
        expected = max(rows * (6 + 20), rows * (20 + 4)) * 8
        assert recompute(rows) == expected
    apply_activation_checkpointing(model, "every_2", units)  # measured as if not checkpointed
    assert recompute(7) == 7 * (6 + 20) * 8
    assert checkpointed_units(model) == [units[0]]  # and put back as it was
    assert all(p.grad is None for p in model.parameters())


OPTIONS = {
    "num_layers": 4,
    "d_model": 16,
    "num_heads": 2,
    "max_digits": 18,
    "num_train_samples": 32,
}


@pytest.mark.parametrize(("budget", "expected"), [(int(8e5), "full"), (int(6e6), "none")])
def test_a_tight_budget_checkpoints_and_a_loose_one_does_not(budget: int, expected: str) -> None:
    recipe = tinylm.build({"seed": 0, "recipe_options": OPTIONS})
    model = recipe.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def make_rows(n: int):  # noqa: ANN202
        return tinylm.collate([recipe.train_dataset[i] for i in range(n)])

    joint = choose_plan(
        model, tinylm.loss_fn, make_rows, max_rows=16, memory_budget_bytes=budget,
        optimizer=torch.optim.AdamW(model.parameters()), device="cpu",
    )  # fmt: skip
    assert joint.activation_checkpointing == expected
    steps = {c.activation_checkpointing: c.micro_steps for c in joint.candidates}
    if expected == "full":
        assert steps["full"] < steps["none"]
    else:
        assert steps == {"none": 1, "every_2": 1, "full": 1}  # a tie: the least recompute
    # the model is left as the chosen policy wants it: every block checkpointed, or none
    assert checkpointed_units(model) == (list(model.blocks) if expected == "full" else [])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
