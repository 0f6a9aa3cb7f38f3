"""ExactPreferenceMixin under DDP: TRL's DPOTrainer on 2 gloo ranks against a float64 full batch.

The one-process test (test_trl.py) leaves out what only several ranks exercise: the gather of the
window's pair count over the ranks and the factor of the number of ranks that undoes DDP's
average. Here both ranks run `DPOTrainer.train()` for one step over 8 pairs, then over 7, with
the model, pairs and float64 reference of test_trl.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")

from bigbatch.integrations.trl import ExactPreferenceMixin  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.distributed_helpers import run_processes  # noqa: E402
from tests.integrations.test_trl import (  # noqa: E402
    applied_gradient,
    dpo_reference_gradient,
    dpo_trainer,
    random_pairs,
    relative_error,
)


class CountsPairs:
    """Records the pairs of every training micro-batch this rank computes a loss on."""

    pairs_per_micro_batch: list[int]

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.pairs_per_micro_batch.append(int(inputs["input_ids"].shape[0]) // 2)
        return super().compute_loss(model, inputs, *args, **kwargs)


def gather_of_any_length(accelerator):
    """`accelerator.gather` that pads each rank's tensor to the longest first: TRL's metrics
    gather per-pair tensors, which only works where every rank's micro-batch holds as many
    pairs. Only TRL's logged metrics see the padding; a scalar (the mixin's count) is gathered
    as before."""
    gather = accelerator.gather

    def padded_gather(tensor: torch.Tensor) -> torch.Tensor:
        return gather(accelerator.pad_across_processes(tensor) if tensor.dim() else tensor)

    return padded_gather


def train(model, pairs, trainer_class, **settings) -> dict:
    """One step of `trainer_class` on this rank: SGD(lr=1), micro-batches of 2 pairs, 2
    accumulation steps, so 8 places for the pairs over 2 ranks."""
    trainer = dpo_trainer(
        model, pairs, trainer_class, gradient_accumulation_steps=2, ddp_backend="gloo", **settings
    )
    trainer.pairs_per_micro_batch = []
    if not trainer.accelerator.even_batches:
        trainer.accelerator.gather = gather_of_any_length(trainer.accelerator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return {
        "gradient": applied_gradient(model, trainer.model),
        "pairs_per_micro_batch": trainer.pairs_per_micro_batch,
        "num_processes": trainer.accelerator.num_processes,
    }


def train_each_way(rank: int, world_size: int) -> dict[str, dict]:
    """8 pairs as Accelerate shards them by default, and 7 pairs with ``even_batches=False``.

    By default Accelerate fills a short last micro-batch with pairs from the start of the
    epoch, so every micro-batch holds 2 pairs; without that, one rank's window holds 2 + 2
    pairs and the other's 2 + 1."""
    from trl import DPOTrainer

    class ExactDPOTrainer(CountsPairs, ExactPreferenceMixin, DPOTrainer):
        pass

    class PlainDPOTrainer(CountsPairs, DPOTrainer):
        pass

    model, uneven = hf_models.gpt2(), {"accelerator_config": {"even_batches": False}}
    return {
        "even exact": train(model, random_pairs(8), ExactDPOTrainer),
        "uneven exact": train(model, random_pairs(7), ExactDPOTrainer, **uneven),
        "uneven plain": train(model, random_pairs(7), PlainDPOTrainer, **uneven),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_trainer_with_the_mixin_is_exact_on_two_ranks() -> None:
    """Both ranks count every pair of the step and undo DDP's average over the 2 ranks: the step
    is the mean over the 8 pairs of full micro-batches and over the 7 pairs of windows of 2 + 2
    and 2 + 1, to the float32 floor of TRL's log-prob kernel (1e-6, as in test_trl.py).

    TRL's own DPOTrainer gathers per-pair metrics, which Accelerate's default sharding (full
    micro-batches on every rank) allows and uneven windows do not: these run with the metrics'
    gather padded. There plain DPOTrainer divides each micro-batch's pair mean by the
    accumulation steps and DDP averages the ranks: the lone pair weighs 1/4, the others 1/8.
    Measured (TRL 1.16.0, transformers 5.25.0): the mixin 1.4e-07 (8 pairs) and 1.6e-07 (7
    pairs) off the full batch, plain DPOTrainer 2.9e-01 on the uneven windows."""
    ranks = run_processes(train_each_way, 2)
    model = hf_models.gpt2()
    reference = {
        count: dpo_reference_gradient(model, model, random_pairs(count), "sigmoid")
        for count in (7, 8)
    }
    for rank in ranks:
        assert rank["even exact"]["pairs_per_micro_batch"] == [2, 2]
        assert rank["even exact"]["num_processes"] == 2
        assert relative_error(rank["even exact"]["gradient"], reference[8]) < 1e-6
        assert relative_error(rank["uneven exact"]["gradient"], reference[7]) < 1e-6
        assert relative_error(rank["uneven plain"]["gradient"], reference[7]) > 1e-2
    for way in ("uneven exact", "uneven plain"):
        # every pair once (the sampler shards one permutation), in uneven windows
        windows = sorted(rank[way]["pairs_per_micro_batch"] for rank in ranks)
        assert windows == [[2, 1], [2, 2]]
