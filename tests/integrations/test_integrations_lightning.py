"""bigbatch.integrations.lightning: the mixin's steps are exact on 1 and 2 gloo processes.

Reference: plain float64 full-batch SGD on the same global batches (tests/reference.py). A
DistributedSampler without shuffling (Lightning's own shuffles the training set) deals rank r the
samples r, r + 2, ...: each rank's batch is its share of one contiguous global batch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

from bigbatch.core.divergence import RankDivergenceError  # noqa: E402
from bigbatch.integrations.huggingface import causal_lm_loss  # noqa: E402
from bigbatch.integrations.lightning import AccumulatorMixin  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.distributed_helpers import run_processes  # noqa: E402
from tests.reference import full_batch_sgd, relative_error  # noqa: E402

GLOBAL_BATCH = 10
STEPS = 3
LR = 0.5


def data() -> dict[str, torch.Tensor]:
    return hf_models.causal_batch(GLOBAL_BATCH * STEPS, seed=9)


class CausalLM(AccumulatorMixin, pl.LightningModule):
    """A LightningModule around a transformers GPT-2, trained by the mixin."""

    def __init__(self, micro_batch_size: int, divergence_every_n_steps: int | None = 100) -> None:
        super().__init__()
        self.model = hf_models.gpt2()
        self.micro_batch_size = micro_batch_size
        self.divergence_every_n_steps = divergence_every_n_steps

    def micro_batch_loss(self, micro_batch):
        return causal_lm_loss(self.model, micro_batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Desynchronise(pl.Callback):
    """Nudges one weight on rank 1 alone after the first step: what a skipped sync leaves."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.global_rank == 1:
            with torch.no_grad():
                next(module.parameters()).add_(1e-6)


def reference_weights() -> dict[str, torch.Tensor]:
    batches = hf_models.global_batches(data(), GLOBAL_BATCH)
    expected = full_batch_sgd(hf_models.gpt2(), batches, hf_models.causal_item_losses, LR)
    return {f"model.{name}": value for name, value in expected.items()}


GRADIENT_ALL_REDUCES: list[int] = []  # one entry per gradient bucket all-reduced, per process


def counting_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    GRADIENT_ALL_REDUCES.append(1)
    return default_hooks.allreduce_hook(state, bucket)


class CountGradientAllReduces(pl.Callback):
    """Lightning registers DDP comm hooks on CUDA only: register the counting one here."""

    def on_train_start(self, trainer, module):
        trainer.strategy.model.register_comm_hook(None, counting_hook)


def fit(rank: int, world_size: int, micro: int, desync: bool = False) -> dict:
    module = CausalLM(micro, divergence_every_n_steps=2 if desync else 100)
    strategy = pl.strategies.DDPStrategy(bucket_cap_mb=1000) if world_size > 1 else "auto"
    callbacks: list[pl.Callback] = [Desynchronise()] if desync else []
    if world_size > 1:
        callbacks.append(CountGradientAllReduces())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=STEPS,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        use_distributed_sampler=False,
    )
    dataset = hf_models.Rows(data())
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler
    )
    error = None
    try:
        trainer.fit(module, loader)
    except RankDivergenceError as caught:
        error = str(caught)
    return {
        "weights": {n: p.detach().clone() for n, p in module.named_parameters()},
        "global_step": trainer.global_step,
        "error": error,
        "gradient_all_reduces": len(GRADIENT_ALL_REDUCES),
    }


@pytest.mark.parametrize("micro", [10, 3])
def test_one_process_matches_the_full_batch(micro):
    result = fit(0, 1, micro)
    assert result["global_step"] == STEPS
    assert relative_error(result["weights"], reference_weights()) < 1e-12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ddp_processes_match_the_full_batch():
    results = run_processes(fit, 2, 2)
    expected = reference_weights()
    for result in results:
        assert result["error"] is None
        assert result["global_step"] == STEPS
        assert relative_error(result["weights"], expected) < 1e-12
        # One bucket: exactly one gradient all-reduce per optimizer step, not one per micro-step.
        assert result["gradient_all_reduces"] == STEPS


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_desynchronised_rank_is_caught():
    results = run_processes(fit, 2, 2, True)
    for result in results:
        assert result["error"] is not None, "the divergence went unnoticed"
        # the desynchronised training step is the first: the engine's own check in the next
        # step's all-reduce (after step 1) or the mixin's after step 2 stops every rank
        assert "after step 1" in result["error"] or "after step 2" in result["error"]
    assert results[0]["error"] == results[1]["error"]


def test_lightning_fp16_is_refused_with_the_fix():
    from bigbatch.integrations.lightning import _precision

    with pytest.raises(ValueError, match="bigbatch_precision = 'fp16'"):
        _precision("16-mixed", "fp32")
    assert _precision("bf16-mixed", "fp32") == "bf16"
    assert _precision("32-true", "fp16") == "fp16"


class Float32LM(CausalLM):
    def __init__(self, bigbatch_precision: str) -> None:
        super().__init__(micro_batch_size=4)
        self.model = hf_models.gpt2(dtype=torch.float32)
        self.bigbatch_precision = bigbatch_precision


@pytest.mark.parametrize(
    ("trainer_precision", "bigbatch_precision", "expected"),
    [("32-true", "fp16", "fp16"), ("bf16-mixed", "fp32", "bf16")],
)
def test_mixed_precision_runs_with_the_step_count(trainer_precision, bigbatch_precision, expected):
    module = Float32LM(bigbatch_precision)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        precision=trainer_precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(hf_models.Rows(data()), batch_size=GLOBAL_BATCH)
    trainer.fit(module, loader)
    accumulator = module._bigbatch_accumulator_object
    assert accumulator is not None and accumulator.precision == expected
    assert (accumulator.grad_scaler is not None) == (expected == "fp16")
    assert trainer.global_step == 2
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["loss"])))
