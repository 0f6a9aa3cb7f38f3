"""bigbatch.integrations.trl: TRL's DPO trainer and GRPO batches against a float64 full batch.

Every reference here is written independently of the code under test: each sequence is scored
alone, unpadded, in float64, and the losses follow the papers' formulas over the whole global
batch. TRL is a dev dependency; these tests run against the installed release.
"""

from __future__ import annotations

import copy
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

import bigbatch
from bigbatch.core.batches import split
from bigbatch.integrations.trl import (
    ExactPreferenceMixin,
    dpo_loss_fn,
    policy_gradient_loss_fn,
    preference_pairs,
)
from tests import hf_models

VOCAB = hf_models.VOCAB  # 61 words t0..t60, then <unk>, <eos>, <pad>
EOS, PAD = VOCAB - 2, VOCAB - 1
BETA = 0.1


def tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary, built here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    vocab |= {"<unk>": VOCAB - 3, "<eos>": EOS, "<pad>": PAD}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def random_pairs(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompts of 1-4 tokens, responses of 1-8 tokens ending in <eos>: lengths differ widely."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(0, VOCAB - 3, (length,), generator=generator).tolist()

    pairs = []
    for _ in range(count):
        prompt, chosen, rejected = ids(1, 4), ids(1, 8) + [EOS], ids(1, 8) + [EOS]
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def response_logp(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response | prompt), the sequence scored alone and unpadded, in float64."""
    ids = torch.tensor([prompt + response])
    log_probs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return log_probs[positions, ids[0, len(prompt) :]].sum()


def dpo_reference_gradient(model, ref_model, pairs, kind: str) -> torch.Tensor:
    """The gradient of the preference loss averaged over every pair, from the papers' formulas."""
    model = copy.deepcopy(model)
    losses = []
    for pair in pairs:
        scores = []
        for key in ("chosen_ids", "rejected_ids"):
            policy = response_logp(model, pair["prompt_ids"], pair[key])
            with torch.no_grad():
                reference = response_logp(ref_model, pair["prompt_ids"], pair[key])
            ratio = policy - reference
            scores.append(ratio / len(pair[key]) if kind == "ipo" else ratio)
        margin = scores[0] - scores[1]
        if kind == "sigmoid":
            losses.append(-F.logsigmoid(BETA * margin))
        elif kind == "ipo":
            losses.append((margin - 1 / (2 * BETA)) ** 2)
        else:
            losses.append(torch.relu(1 - BETA * margin))
    torch.stack(losses).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def applied_gradient(before: torch.nn.Module, after: torch.nn.Module) -> torch.Tensor:
    """With SGD(lr=1), the applied gradient is the weights before minus after."""
    old = torch.cat([p.detach().flatten() for p in before.parameters()])
    return old - torch.cat([p.detach().flatten() for p in after.parameters()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def dpo_trainer(model, pairs, trainer_class, **settings):
    """TRL's `trainer_class` for one SGD(lr=1) step over `pairs` on a copy of `model`.

    Micro-batches of 2 pairs and 4 accumulation steps unless `settings` (DPOConfig's fields)
    say otherwise; the reference model is a copy of `model`."""
    from datasets import Dataset
    from trl import DPOConfig

    rows = [
        {
            "prompt": " ".join(f"t{i}" for i in pair["prompt_ids"]),
            "chosen": " " + " ".join(f"t{i}" for i in pair["chosen_ids"][:-1]),
            "rejected": " " + " ".join(f"t{i}" for i in pair["rejected_ids"][:-1]),
        }
        for pair in pairs
    ]
    model = copy.deepcopy(model)
    arguments = DPOConfig(
        **{
            "output_dir": tempfile.mkdtemp(prefix="bigbatch-trl-"),
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 4,
            "max_steps": 1,
            "beta": BETA,
            "max_grad_norm": 0.0,
            "lr_scheduler_type": "constant",
            "activation_checkpointing": False,
            "bf16": False,  # TRL defaults to bf16 autocast, even on a CPU
            "report_to": "none",
            "save_strategy": "no",
            "logging_strategy": "no",
            "disable_tqdm": True,
            "use_cpu": True,
        }
        | settings
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_class(
            model=model,
            ref_model=copy.deepcopy(model),
            args=arguments,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer(),
            optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
        )


def train_one_dpo_step(model, pairs, *, exact: bool) -> torch.nn.Module:
    """One optimizer step of TRL's DPOTrainer over every pair: micro-batches of 2, so 2, 2, 2, 1."""
    from trl import DPOTrainer

    class ExactDPOTrainer(ExactPreferenceMixin, DPOTrainer):
        pass

    trainer = dpo_trainer(model, pairs, ExactDPOTrainer if exact else DPOTrainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer.model


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_trainer_with_the_mixin_is_exact_on_a_short_last_window() -> None:
    """TRL's DPOTrainer divides each micro-batch's pair mean by the accumulation steps: the lone
    pair of the last micro-batch weighs twice as much as the others (a 4-micro-batch window of
    2, 2, 2, 1 pairs). With ExactPreferenceMixin the step is the mean over the 7 pairs, to the
    float32 of TRL's fused log-prob kernel (it computes in float32 whatever the model's dtype,
    so 1e-6 is its floor here, not the 1e-10 of bigbatch's own loss functions below)."""
    model = hf_models.gpt2()
    pairs = random_pairs(7)
    reference = dpo_reference_gradient(model, model, pairs, "sigmoid")
    exact = applied_gradient(model, train_one_dpo_step(model, pairs, exact=True))
    trl_own = applied_gradient(model, train_one_dpo_step(model, pairs, exact=False))
    assert relative_error(exact, reference) < 1e-6
    assert relative_error(trl_own, reference) > 1e-2


def collate(pairs) -> dict[str, torch.Tensor]:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=PAD)(pairs)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("reference_from", ["ref_model", "precomputed"])
def test_dpo_loss_fn_over_uneven_micro_batches_is_the_full_batch(
    kind: str, reference_from: str
) -> None:
    """Micro-batches of 3, 1 and 3 pairs, the last re-split by the engine into 2 and 1 (as an
    out-of-memory retry would): one row per pair keeps every pair whole."""
    model, ref_model = hf_models.gpt2(seed=0), hf_models.gpt2(seed=1)
    pairs = random_pairs(7, seed=2)
    window = [preference_pairs(collate(pairs[a:b])) for a, b in ((0, 3), (3, 4), (4, 7))]
    window[2:] = split(window[2], [2, 1])
    if reference_from == "precomputed":  # as DPOConfig(precompute_ref_log_probs=True) adds them
        for micro_batch, (a, b) in zip(window, ((0, 3), (3, 4), (4, 6), (6, 7))):
            with torch.no_grad():
                for side in ("chosen", "rejected"):
                    micro_batch[f"ref_{side}_logps"] = torch.stack(
                        [
                            response_logp(ref_model, p["prompt_ids"], p[f"{side}_ids"])
                            for p in pairs[a:b]
                        ]
                    )
        ref_model = None
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
    bigbatch.Accumulator(trained, optimizer).step(window, dpo_loss_fn(BETA, kind, ref_model))
    reference = dpo_reference_gradient(model, hf_models.gpt2(seed=1), pairs, kind)
    assert relative_error(applied_gradient(model, trained), reference) < 1e-10


def test_dpo_loss_fn_without_reference_log_probs_says_what_it_needs() -> None:
    batch = preference_pairs(collate(random_pairs(2)))
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps"):
        dpo_loss_fn()(hf_models.gpt2(), batch)


def test_dpo_loss_fn_refuses_the_stacked_layout_that_a_split_would_mispair() -> None:
    with pytest.raises(ValueError, match=r"one row per pair.*preference_pairs"):
        dpo_loss_fn()(hf_models.gpt2(), collate(random_pairs(2)))
    with pytest.raises(ValueError, match="missing completion_mask"):
        preference_pairs({"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)})


def generation_batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GRPOTrainer's layout: prompts of 3 tokens, completions of 1-9 right-padded tokens, one
    advantage per completion, sampling log-probs that differ from the policy's (ratios clip)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (rows,), generator=generator)
    completion_mask = (torch.arange(9).view(1, -1) < lengths.view(-1, 1)).long()
    completion_ids = torch.randint(0, VOCAB - 3, (rows, 9), generator=generator)
    completion_ids[completion_mask == 0] = PAD
    return {
        "prompt_ids": torch.randint(0, VOCAB - 3, (rows, 3), generator=generator),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=generator, dtype=torch.float64),
        # a log-ratio of +-0.5 puts some tokens outside the clip range of 0.2
        "old_shift": torch.rand(rows, 9, generator=generator, dtype=torch.float64) - 0.5,
        "ref_shift": torch.rand(rows, 9, generator=generator, dtype=torch.float64) - 0.5,
    }


def completion_token_logps(model: torch.nn.Module, batch) -> list[torch.Tensor]:
    """Each completion's token log-probs, the row scored alone without its padding, float64."""
    result = []
    for row in range(batch["prompt_ids"].shape[0]):
        length = int(batch["completion_mask"][row].sum())
        ids = torch.cat([batch["prompt_ids"][row], batch["completion_ids"][row, :length]])
        log_probs = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
        positions = torch.arange(2, 2 + length)
        result.append(log_probs[positions, ids[3:]])
    return result


def policy_reference_gradient(model, batch, normalization: str, max_length: int, kl: float):
    """PPO-clip with the k3 KL over the whole batch, normalised as GRPO, DAPO or Dr. GRPO say."""
    model = copy.deepcopy(model)
    per_sequence = []
    for row, logps in enumerate(completion_token_logps(model, batch)):
        length = logps.shape[0]
        old = logps.detach() + batch["old_shift"][row, :length]
        ref = logps.detach() + batch["ref_shift"][row, :length]
        ratio = torch.exp(logps - old)
        advantage = batch["advantages"][row]
        surrogate = -torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
        token_loss = surrogate + kl * (torch.exp(ref - logps) - (ref - logps) - 1)
        per_sequence.append(token_loss)
    if normalization == "sequence":
        loss = torch.stack([losses.mean() for losses in per_sequence]).mean()
    elif normalization == "token":
        loss = torch.cat(per_sequence).sum() / sum(len(losses) for losses in per_sequence)
    else:
        loss = torch.cat(per_sequence).sum() / (len(per_sequence) * max_length)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_policy_gradient_loss_fn_over_uneven_micro_batches_is_the_full_batch(
    normalization: str,
) -> None:
    model = hf_models.gpt2()
    batch = generation_batch(8)
    with torch.no_grad():  # TRL's old and reference log-probs, in its padded layout
        padded = torch.zeros(8, 9, dtype=torch.float64)
        for row, logps in enumerate(completion_token_logps(model, batch)):
            padded[row, : logps.shape[0]] = logps
    micro_batch_keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    window = []
    for start, stop in ((0, 3), (3, 4), (4, 8)):
        micro_batch = {key: batch[key][start:stop] for key in (*micro_batch_keys, "advantages")}
        micro_batch["old_per_token_logps"] = (padded + batch["old_shift"])[start:stop]
        micro_batch["ref_per_token_logps"] = (padded + batch["ref_shift"])[start:stop]
        window.append(micro_batch)
    loss_fn = policy_gradient_loss_fn(normalization, max_length=9, beta=0.04)
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
    bigbatch.Accumulator(trained, optimizer).step(window, loss_fn)
    reference = policy_reference_gradient(model, batch, normalization, 9, kl=0.04)
    assert relative_error(applied_gradient(model, trained), reference) < 1e-10
