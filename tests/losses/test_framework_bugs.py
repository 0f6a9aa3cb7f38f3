"""The public accumulation bugs of the frameworks, each computed here as the bug describes it.

Each test builds the gradient the framework applies from its normalisation (plain autograd, a
formula in the test), shows that it is off from the float64 full-batch gradient by the factor the
report states, and that `bigbatch.Accumulator` with the matching `bigbatch.losses` loss applies
the full-batch gradient for the same micro-batches. The 2-process versions of these splits are in
the matrix (test_matrix.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

from tests.losses import cases
from tests.losses.cases import Recorder, relative_error

EXACT = 1e-10


def model() -> torch.nn.Module:
    torch.manual_seed(3)
    return cases.TokenModel().double()


def gradient(loss: Callable[[torch.nn.Module], torch.Tensor]) -> list[torch.Tensor]:
    """Plain autograd: the gradient of loss(model) at the test's model."""
    net = model()
    loss(net).backward()
    return [p.grad.clone() for p in net.parameters()]


def bigbatch_gradient(window: list[dict], loss_fn: Callable) -> list[torch.Tensor]:
    import bigbatch

    net = model()
    recorder = Recorder(net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mean-loss warning: the losses return sums
        bigbatch.Accumulator(net, recorder).step(window, loss_fn)
    return [recorder.gradients[i] for i in sorted(recorder.gradients)]


def scaled(values: list[torch.Tensor], factor: float) -> list[torch.Tensor]:
    return [factor * value for value in values]


def concatenated(micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([m[key] for m in micro_batches]) for key in micro_batches[0]}


def chunks(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    rows = len(next(iter(batch.values())))
    return [cases.rows(batch, start, start + size) for start in range(0, rows, size)]


# -- policy gradient: DAPO's token mean -------------------------------------------------------


def full_rollouts(count: int) -> dict[str, torch.Tensor]:
    """Rollouts whose every token carries loss: each micro-step holds as many tokens."""
    batch = cases.rollouts(torch.Generator().manual_seed(count), count)
    batch["mask"] = torch.ones_like(batch["mask"])
    return batch


def token_sum(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the PPO-clip surrogate over the batch's tokens (no KL term), from the formula."""
    return (cases.surrogate(net, batch, 0.0) * batch["mask"]).sum()


def dapo_loss_fn(net: torch.nn.Module, batch: dict[str, torch.Tensor]):
    from bigbatch.losses import policy_gradient_loss

    logps = cases.token_logps(net, batch["context"], batch["tokens"])
    return policy_gradient_loss(
        logps, batch["old_logps"], batch["advantages"], batch["mask"], "token",
        clip_range=cases.CLIP,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("steps_per_generation", "gradient_accumulation_steps", "factor"), [(4, 2, 0.5), (8, 32, 4.0)]
)
def test_trl_6024_dapo_normalised_by_the_generation_batch(
    steps_per_generation, gradient_accumulation_steps, factor
):
    """TRL PR #6024: every micro-step divided its token-loss sum by the tokens of its whole
    *generation* batch (steps_per_generation micro-steps), while the optimizer steps every
    gradient_accumulation_steps micro-steps: the update is gas / spg times DAPO's token mean
    (0.5x for spg 4, gas 2; 4x for spg 8, gas 32)."""
    rows_per_micro_step = 2 if gradient_accumulation_steps < 8 else 1
    window = chunks(
        full_rollouts(gradient_accumulation_steps * rows_per_micro_step), rows_per_micro_step
    )
    generation_tokens = steps_per_generation * rows_per_micro_step * cases.POSITIONS

    def trl(net):  # each micro-step: its sum over its generation batch's tokens
        return sum(token_sum(net, micro) / generation_tokens for micro in window)

    whole = concatenated(window)
    exact = gradient(lambda net: token_sum(net, whole) / whole["mask"].sum())
    assert relative_error(gradient(trl), scaled(exact, factor)) < EXACT
    assert relative_error(gradient(trl), exact) > 0.4
    assert relative_error(bigbatch_gradient(window, dapo_loss_fn), exact) < EXACT


def test_torchtune_2334_ppo_token_mean_per_micro_batch():
    """torchtune #2334: the DPO/PPO recipes lack the SFT recipes' accumulation fix: each
    micro-batch's loss is its own token mean, divided by the accumulation steps. With micro-batches
    of unequal token counts the update weighs a token by 1 / (steps x its micro-batch's tokens),
    not 1 / (tokens of the step)."""
    batch = cases.rollouts(torch.Generator().manual_seed(5))
    window = [cases.rows(batch, 0, 1), cases.rows(batch, 1, 6), cases.rows(batch, 6, 8)]

    def recipe(net):
        return sum(token_sum(net, m) / m["mask"].sum().clamp(min=1) for m in window) / len(window)

    exact = gradient(lambda net: token_sum(net, batch) / batch["mask"].sum())
    total = int(batch["mask"].sum())
    weights = [total / (len(window) * max(1, int(m["mask"].sum()))) for m in window]
    assert max(weights) / min(weights) > 2  # the tokens of a small micro-batch weigh more
    per_micro_batch = [
        gradient(lambda net, m=m: token_sum(net, m) / batch["mask"].sum()) for m in window
    ]
    weighted = [sum(w * g[i] for w, g in zip(weights, per_micro_batch)) for i in range(len(exact))]
    assert relative_error(gradient(recipe), weighted) < EXACT  # the recipe's weighting, by formula
    assert relative_error(gradient(recipe), exact) > 0.05
    assert relative_error(bigbatch_gradient(window, dapo_loss_fn), exact) < EXACT


# -- token cross-entropy: the transformers Trainer ----------------------------------------------


def full_text(rows: int) -> dict[str, torch.Tensor]:
    """Rows with no padding: every micro-batch of as many rows holds as many scored tokens."""
    ids = torch.randint(
        0, cases.VOCABULARY, (rows, cases.POSITIONS), generator=torch.Generator().manual_seed(rows)
    )
    return {"ids": ids, "labels": ids.clone()}


def causal_sum(net, batch) -> torch.Tensor:
    loss_sum, _ = cases.causal_reference(net, batch["ids"], batch["labels"])
    return loss_sum


def scored(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def causal_loss_fn(net, batch):
    from bigbatch.losses import token_cross_entropy

    return token_cross_entropy(net(batch["ids"]), batch["labels"])


def test_transformers_47688_head_drops_num_items():
    """transformers #47688: a head whose forward takes **kwargs but drops num_items_in_batch
    returns its micro-batch's token mean, and the Trainer, believing the model normalised by the
    step's tokens, skips its division by the accumulation steps: gas (here 4) times the loss."""
    steps = 4
    window = chunks(full_text(8), 2)

    def trainer(net):
        return sum(causal_sum(net, m) / scored(m) for m in window)

    whole = concatenated(window)
    exact = gradient(lambda net: causal_sum(net, whole) / scored(whole))
    assert relative_error(gradient(trainer), scaled(exact, steps)) < EXACT
    assert relative_error(bigbatch_gradient(window, causal_loss_fn), exact) < EXACT


def test_transformers_37474_token_mean_divided_by_n_gpu():
    """transformers #37474: with n_gpu > 1 (DataParallel) every replica already divides its sum
    by num_items_in_batch, the tokens of all replicas, and training_step then takes the mean over
    the replicas: 1 / n_gpu (here 0.5) times the token mean."""
    n_gpu = 2
    batch = cases.text(torch.Generator().manual_seed(9))
    replicas = [cases.rows(batch, 0, 3), cases.rows(batch, 3, 8)]
    num_items_in_batch = scored(batch)

    def trainer(net):
        return sum(causal_sum(net, r) / num_items_in_batch for r in replicas) / n_gpu

    exact = gradient(lambda net: causal_sum(net, batch) / num_items_in_batch)
    assert relative_error(gradient(trainer), scaled(exact, 1 / n_gpu)) < EXACT
    assert relative_error(bigbatch_gradient(replicas, causal_loss_fn), exact) < EXACT


def test_transformers_34242_token_mean_per_rank():
    """transformers #34242: under DDP each rank divided by its own tokens and DDP averages the
    ranks: a token weighs 1 / (world_size x its rank's tokens), not 1 / (tokens of the step)."""
    batch = cases.text(torch.Generator().manual_seed(9))
    ranks = [cases.rows(batch, 0, 2), cases.rows(batch, 2, 8)]
    counts = [scored(r) for r in ranks]
    assert counts[1] > 2 * counts[0], counts

    def ddp(net):
        return sum(causal_sum(net, r) / count for r, count in zip(ranks, counts)) / len(ranks)

    exact = gradient(lambda net: causal_sum(net, batch) / sum(counts))
    assert relative_error(gradient(ddp), exact) > 0.05
    assert relative_error(bigbatch_gradient(ranks, causal_loss_fn), exact) < EXACT


# -- preference pairs: a loss per micro-batch --------------------------------------------------


def pair_sum(net, batch) -> torch.Tensor:
    u = (cases.pair_logps(net, batch, "chosen") - batch["ref_chosen"]) - (
        cases.pair_logps(net, batch, "rejected") - batch["ref_rejected"]
    )
    return torch.nn.functional.softplus(-cases.BETA * u).sum()


def dpo_loss_fn(net, batch):
    from bigbatch.losses import dpo_loss

    chosen, rejected = (
        cases.pair_logps(net, batch, "chosen"),
        cases.pair_logps(net, batch, "rejected"),
    )
    return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=cases.BETA)


def pairs_of(rows: int) -> dict[str, torch.Tensor]:
    return cases.pairs(torch.Generator().manual_seed(rows))


def test_trl_5710_dpo_not_divided_by_accumulation_steps():
    """TRL PR #5710: DPOTrainer and RewardTrainer compute their own per-micro-batch mean but left
    model_accepts_loss_kwargs true, so the Trainer skipped its division by the accumulation steps:
    gas (here 4) times the DPO loss."""
    steps = 4
    window = chunks(pairs_of(8), 2)

    def trainer(net):
        return sum(pair_sum(net, m) / 2 for m in window)

    exact = gradient(lambda net: pair_sum(net, pairs_of(8)) / 8)
    assert relative_error(gradient(trainer), scaled(exact, steps)) < EXACT
    assert relative_error(bigbatch_gradient(window, dpo_loss_fn), exact) < EXACT


def test_lightning_19987_short_last_window():
    """Lightning #19987: at the end of an epoch the last window holds fewer micro-batches than
    accumulate_grad_batches, and each micro-batch's loss is still divided by
    accumulate_grad_batches: a window of 2 of 4 micro-batches steps with 2 / 4 = 0.5 times the
    gradient."""
    accumulate_grad_batches = 4
    window = chunks(pairs_of(8), 4)  # what is left of the epoch: 2 micro-batches of 4 pairs

    def lightning(net):
        return sum(pair_sum(net, m) / 4 / accumulate_grad_batches for m in window)

    exact = gradient(lambda net: pair_sum(net, pairs_of(8)) / 8)
    assert (
        relative_error(gradient(lightning), scaled(exact, len(window) / accumulate_grad_batches))
        < EXACT
    )
    assert relative_error(bigbatch_gradient(window, dpo_loss_fn), exact) < EXACT
