"""The activation_checkpointing config key: validated, applied at setup, printed, reported.

A run with checkpointing ends with the float64 full-batch reference's weights, as the run
without it; auto without a memory probe runs none and says why; a resume may change the key.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bigbatch import apply_activation_checkpointing
from bigbatch.cli import main
from bigbatch.train.configfile import load_config, validate
from bigbatch.train.trainer import Trainer
from bigbatch.units import UsageError
from tests.core.test_checkpointing import LR, Net, per_item_losses
from tests.reference import full_batch_sgd, relative_error

ROWS = 40
GLOBAL = 16  # steps of 16, 16, 8 rows: a short last global batch
BUDGET = 8000  # bytes: none fits 4 micro-steps of the 16 rows, full 3 (tests.core Net, float64)


def dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(ROWS, 4, generator=generator, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, torch.randn(ROWS, 2, generator=generator).double())


def sum_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
    losses, _ = per_item_losses(model, batch)
    return losses.sum(), len(losses)


def reference(steps: int) -> dict[str, torch.Tensor]:
    """Plain SGD on each step's global batch in the trainer's order (a seeded permutation)."""
    x, y = dataset().tensors
    order = torch.as_tensor(np.random.default_rng([0, 0]).permutation(ROWS))
    starts = range(0, GLOBAL * steps, GLOBAL)
    batches = [(x[order[i : i + GLOBAL]], y[order[i : i + GLOBAL]]) for i in starts]
    return full_batch_sgd(Net().double(), batches, per_item_losses, LR)


def train(run_dir=None, resume=False, model=None, **settings):
    model = model or Net().double()
    config = validate(dict(global_batch_size=GLOBAL, micro_batch_size=5, max_steps=3) | settings)
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR),
        sum_loss,
        dataset(),
        config,
        run_dir=run_dir,
        progress=False,
    )
    summary = trainer.fit(resume=resume)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return summary, weights, model


@pytest.mark.parametrize(
    ("policy", "checkpointed"), [("full", 5), ("every_2", 3), ("every_3", 2), ("offload", 5)]
)
def test_a_run_with_checkpointing_ends_with_the_full_batch_weights(policy, checkpointed, caplog):
    caplog.set_level(logging.INFO, logger="bigbatch")
    summary, weights, model = train(activation_checkpointing=policy)
    assert relative_error(weights, reference(3)) < 1e-12
    described = f"{policy}: {checkpointed} of 5 units (blocks.0"
    assert summary.extra["activation_checkpointing"].startswith(described)
    assert f"activation_checkpointing {described}" in caplog.text
    # 4 micro-batches a step (the last global batch of 8 in 4 of 2): a recompute for each
    # checkpointed forward.
    forwards = 12
    assert model.blocks[0].calls == (forwards if policy == "offload" else 2 * forwards)
    assert model.blocks[1].calls == forwards * (2 if policy == "full" else 1)


def test_auto_without_a_probe_runs_none_and_says_why(caplog):
    caplog.set_level(logging.INFO, logger="bigbatch")
    summary, weights, model = train(activation_checkpointing="auto")
    assert relative_error(weights, reference(3)) < 1e-12
    reason = "auto: none, as the micro setting is given (no memory probe)"
    assert reason in summary.extra["activation_checkpointing"]
    assert summary.extra["activation_checkpointing"].startswith("none (5 units run without")
    assert reason in caplog.text
    assert model.blocks[0].calls == 12


def test_the_report_and_the_config_record_it(tmp_path):
    train(run_dir=tmp_path / "run", activation_checkpointing="every_2")
    report = (tmp_path / "run" / "report.md").read_text()
    row = "| activation_checkpointing | every_2: 3 of 5 units (blocks.0, blocks.2, blocks.4) |"
    assert row in report
    assert "activation_checkpointing: every_2" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_resume_may_change_it_and_stays_exact(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir=run_dir, max_steps=2, checkpoint_every=1)
    _, weights, model = train(run_dir=run_dir, resume=True, activation_checkpointing="full")
    assert relative_error(weights, reference(3)) < 1e-12
    assert model.blocks[3].calls == 2 * 4  # the last step's 4 micro-batches, each recomputed


@pytest.mark.parametrize("bad", ["every_1", "half", "2", "true"])
def test_a_bad_value_is_one_line_naming_the_field(bad, capsys, tmp_path):
    with pytest.raises(UsageError) as error:
        load_config(None, [f"activation_checkpointing={bad}"])
    assert str(error.value).startswith(
        'config: activation_checkpointing: must be "none", "full", "every_<k>" with k >= 2'
    )
    code = main(["train", "--set", f"activation_checkpointing={bad}", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "activation_checkpointing" in err


def test_the_default_is_none():
    assert validate({}).activation_checkpointing == "none"
    assert validate({"activation_checkpointing": "Every_02"}).activation_checkpointing == "every_2"


def test_auto_with_the_memory_probe_at_a_loose_budget_runs_none(caplog):
    caplog.set_level(logging.INFO, logger="bigbatch")
    summary, weights, _ = train(
        activation_checkpointing="auto", micro_batch_size="auto", memory_budget="1GiB"
    )
    assert relative_error(weights, reference(3)) < 1e-12
    described = summary.extra["activation_checkpointing"]
    # every policy fits the whole global batch in one micro-step: the least recompute wins
    assert described.startswith("none") and "the fewest micro-steps that fit (1" in described


def test_auto_with_the_memory_probe_at_a_tight_budget_checkpoints(caplog):
    """The joint choice in a run: fewer micro-steps with checkpointing, the same weights."""
    caplog.set_level(logging.INFO, logger="bigbatch")
    reference_weights = reference(3)
    none = train(micro_batch_size="auto", memory_budget=BUDGET)[0]
    summary, weights, model = train(
        activation_checkpointing="auto", micro_batch_size="auto", memory_budget=BUDGET
    )
    assert relative_error(weights, reference_weights) < 1e-12
    described = summary.extra["activation_checkpointing"]
    assert not described.startswith("none") and "auto: activation_checkpointing" in described
    assert summary.plan["gradient_accumulation_steps"] < none.plan["gradient_accumulation_steps"]


def test_a_model_that_comes_checkpointed_keeps_it_under_none(caplog):
    caplog.set_level(logging.INFO, logger="bigbatch")
    given = Net().double()
    apply_activation_checkpointing(given, "every_3")
    summary, weights, model = train(model=given)
    assert relative_error(weights, reference(3)) < 1e-12
    described = summary.extra["activation_checkpointing"]
    assert described.startswith("as given: 2 of 5 units (blocks.0, blocks.3); the model came")
    assert model.blocks[0].calls == 24 and model.blocks[1].calls == 12
    replaced = Net().double()
    apply_activation_checkpointing(replaced, "every_3")
    summary, _, model = train(model=replaced, activation_checkpointing="full")
    assert summary.extra["activation_checkpointing"].startswith("full: 5 of 5 units")
    assert model.blocks[1].calls == 24
