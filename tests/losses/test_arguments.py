"""bigbatch.losses on bad arguments and on empty micro-batches.

Bad arguments raise one ValueError naming the argument; an empty micro-batch (what a rank with no
rows runs to join DDP's gradient sync) gives a zero loss sum that still reaches the inputs, and
no items.
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.losses import (
    dpo_loss,
    policy_gradient_loss,
    sequence_classification,
    token_cross_entropy,
)


def rollout(rows: int = 2, positions: int = 3) -> dict[str, torch.Tensor]:
    logps = torch.full((rows, positions), -1.0, requires_grad=True)
    return {
        "logps": logps,
        "old_logps": torch.full((rows, positions), -1.0),
        "advantages": torch.ones(rows),
        "mask": torch.ones(rows, positions, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"normalization": "mean"}, "normalization"),
        ({"normalization": "constant"}, "max_length"),
        ({"normalization": "constant", "max_length": 0}, "max_length"),
        ({"mask": torch.ones(2, 4)}, "mask"),
        ({"old_logps": torch.ones(3, 3)}, "old_logps"),
        ({"advantages": torch.ones(3)}, "advantages"),
        ({"clip_range": -0.1}, "clip_range"),
        ({"clip_range": (0.2,)}, "clip_range"),
        ({"kl_coef": 0.1}, "ref_logps"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"ref_logps": torch.ones(2, 2), "kl_coef": 0.1}, "ref_logps"),
        ({"logps": torch.ones(6)}, "logps"),
    ],
)
def test_policy_gradient_names_the_bad_argument(change, argument):
    arguments = {**rollout(), "normalization": "token", **change}
    with pytest.raises(ValueError, match=argument):
        policy_gradient_loss(**arguments)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"kind": "logistic"}, "kind"),
        ({"beta": 0.0}, "beta"),
        ({"rejected_logps": torch.zeros(3)}, "rejected_logps"),
        ({"ref_chosen_logps": torch.zeros(2, 1)}, "ref_chosen_logps"),
    ],
)
def test_dpo_names_the_bad_argument(change, argument):
    pairs = {
        name: torch.zeros(2)
        for name in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    with pytest.raises(ValueError, match=argument):
        dpo_loss(**{**pairs, **change})


def test_token_and_classification_name_the_bad_argument():
    with pytest.raises(ValueError, match="labels"):
        token_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="problem_type"):
        sequence_classification(
            torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), problem_type="ranking"
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        sequence_classification(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def empty_outputs(logps: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
    """Every loss on zero rows built from ``logps`` (shape [0, 3])."""
    zeros = torch.zeros(0)
    pairs = logps.sum(1)
    outputs = [
        token_cross_entropy(
            logps.unsqueeze(-1).expand(0, 3, 4), torch.zeros(0, 3, dtype=torch.long)
        ),
        dpo_loss(pairs, pairs, zeros, zeros),
    ]
    for normalization in ("sequence", "token", "constant"):
        outputs.append(
            policy_gradient_loss(
                logps, logps.detach(), zeros, torch.zeros(0, 3), normalization, max_length=4,
                ref_logps=logps.detach(), kl_coef=0.1,
            )
        )  # fmt: skip
    return outputs


def test_an_empty_micro_batch_has_a_zero_sum_on_the_graph_and_no_items():
    logps = torch.zeros(0, 3, requires_grad=True)
    for loss_sum, num_items in empty_outputs(logps):
        assert loss_sum.dim() == 0 and float(loss_sum.detach()) == 0.0
        assert int(num_items) == 0
        assert loss_sum.requires_grad  # backward runs, so a rank with no rows joins DDP's sync
        (grad,) = torch.autograd.grad(loss_sum, logps)
        assert grad.shape == (0, 3)


def test_a_sequence_with_no_loss_token_counts_as_an_item_with_zero_loss():
    """GRPO divides a sequence by max(1, its tokens): an empty one adds 0 and one item."""
    data = rollout()
    data["mask"] = torch.tensor([[True, True, False], [False, False, False]])
    loss_sum, num_items = policy_gradient_loss(**data, normalization="sequence")
    assert num_items == 2
    assert float(loss_sum.detach()) == pytest.approx(-1.0)  # ratio 1, advantage 1: -1, once


def test_bf16_inputs_are_computed_in_float32():
    data = {
        k: (v.detach().bfloat16() if v.is_floating_point() else v) for k, v in rollout().items()
    }
    loss_sum, _ = policy_gradient_loss(**data, normalization="token")
    assert loss_sum.dtype == torch.float32
    pairs = torch.zeros(2, dtype=torch.bfloat16)
    assert dpo_loss(pairs, pairs, pairs, pairs)[0].dtype == torch.float32
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    assert (
        token_cross_entropy(logits, torch.zeros(1, 3, dtype=torch.long))[0].dtype == torch.float32
    )


def test_the_package_face_exports_the_losses():
    import bigbatch

    assert "losses" in bigbatch.__all__ and "losses" in dir(bigbatch)
    assert bigbatch.losses.dpo_loss is dpo_loss
    assert bigbatch.losses.policy_gradient_loss is policy_gradient_loss
