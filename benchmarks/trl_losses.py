"""TRL's own accumulation vs bigbatch vs one full batch: DPO, GRPO, DAPO and Dr. GRPO losses.

A tiny GPT-2 built from a config (random init, nothing downloaded) in float64; sequences of
uneven lengths; accumulation 2 and 4. Every figure is the relative error of the applied gradient
against one float64 full-batch gradient computed here (each sequence scored alone, the loss as
the paper writes it over the whole batch). Columns:

- TRL accumulated: TRL's own loss code and normalisation over the window's micro-batches (DPO
  through `DPOTrainer.train()`; GRPO-style through `GRPOTrainer.compute_loss` on a generation
  batch given here, backpropagated per micro-batch as the Trainer does).
- bigbatch Accumulator: `Accumulator.step` with `bigbatch.integrations.trl`'s loss functions.
- bigbatch in DPOTrainer: `DPOTrainer` with `ExactPreferenceMixin` (TRL's own log-probs).
- TRL, one full batch: TRL's code on one micro-batch holding the whole window (its own floor).

DPO's micro-batches hold 2 pairs each but the last one (the short last window of an epoch:
3 pairs in 2 micro-batches, 7 in 4). GRPO's hold 4 completions each, as TRL's always do.

    python benchmarks/trl_losses.py            # writes benchmarks/results/trl_losses.md
    python benchmarks/trl_losses.py --smoke    # accumulation 2 only
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import bigbatch
from bigbatch.integrations.trl import ExactPreferenceMixin, policy_gradient_loss_fn

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

VOCAB = 64  # t0..t60, <unk>, <eos>, <pad>
EOS, PAD = VOCAB - 2, VOCAB - 1
BETA_DPO, BETA_KL, CLIP, MAX_COMPLETION = 0.1, 0.04, 0.2, 9
PAIRS_PER_MICRO_BATCH, COMPLETIONS_PER_MICRO_BATCH = 2, 4


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).double()


def tokenizer():
    """Word-level over the model's vocabulary: "t5 t17" is [5, 17] (the trainers need one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    vocab |= {"<unk>": VOCAB - 3, "<eos>": EOS, "<pad>": PAD}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def random_ids(generator: torch.Generator, low: int, high: int) -> list[int]:
    length = int(torch.randint(low, high + 1, (1,), generator=generator))
    return torch.randint(0, VOCAB - 3, (length,), generator=generator).tolist()


def token_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The response's token log-probs, the sequence scored alone and unpadded, in float64."""
    ids = torch.tensor([prompt + response])
    log_probs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return log_probs[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]]


def flat_gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


# DPO ------------------------------------------------------------------------------------------


def dpo_reference(model: torch.nn.Module, pairs: list[dict]) -> torch.Tensor:
    """-log sigmoid(beta * margin) averaged over every pair (the reference model is the start)."""
    model, reference = copy.deepcopy(model), copy.deepcopy(model)
    losses = []
    for pair in pairs:
        margin = torch.zeros((), dtype=torch.float64)
        for key, sign in (("chosen_ids", 1), ("rejected_ids", -1)):
            policy = token_logps(model, pair["prompt_ids"], pair[key]).sum()
            with torch.no_grad():
                start = token_logps(reference, pair["prompt_ids"], pair[key]).sum()
            margin = margin + sign * (policy - start)
        losses.append(-F.logsigmoid(BETA_DPO * margin))
    torch.stack(losses).mean().backward()
    return flat_gradient(model)


def dpo_trainer_gradient(model, pairs, accumulation: int, micro: int, exact: bool) -> torch.Tensor:
    """The gradient one `DPOTrainer.train()` step applies (SGD, lr 1: weights before - after)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class ExactDPOTrainer(ExactPreferenceMixin, DPOTrainer):
        pass

    def text(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    rows = [{"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"][:-1]),
             "rejected": " " + text(p["rejected_ids"][:-1])} for p in pairs]  # fmt: skip
    model = copy.deepcopy(model)
    before = weights(model)
    arguments = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bigbatch-trl-"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        beta=BETA_DPO,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        activation_checkpointing=False,
        bf16=False,  # TRL's default is bf16 autocast, even on a CPU
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = (ExactDPOTrainer if exact else DPOTrainer)(
        model=model,
        ref_model=copy.deepcopy(model),
        args=arguments,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer(),
        optimizers=(torch.optim.SGD(model.parameters(), lr=1.0), None),
    )
    trainer.train()
    return before - weights(model)


def dpo_row(model: torch.nn.Module, accumulation: int) -> list[str]:
    count = PAIRS_PER_MICRO_BATCH * (accumulation - 1) + 1  # the last micro-batch holds one pair
    generator = torch.Generator().manual_seed(accumulation)
    pairs = []
    for _ in range(count):
        prompt = random_ids(generator, 1, 4)
        chosen, rejected = random_ids(generator, 1, 8) + [EOS], random_ids(generator, 1, 8) + [EOS]
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    reference = dpo_reference(model, pairs)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from bigbatch.integrations.trl import dpo_loss_fn, preference_pairs

    collate = DataCollatorForPreference(pad_token_id=PAD)
    window = [preference_pairs(collate(pairs[i : i + 2])) for i in range(0, count, 2)]
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
    bigbatch.Accumulator(trained, optimizer).step(window, dpo_loss_fn(BETA_DPO, ref_model=model))
    errors = [
        dpo_trainer_gradient(model, pairs, accumulation, PAIRS_PER_MICRO_BATCH, exact=False),
        weights(model) - weights(trained),
        dpo_trainer_gradient(model, pairs, accumulation, PAIRS_PER_MICRO_BATCH, exact=True),
        dpo_trainer_gradient(model, pairs, 1, count, exact=False),
    ]
    sizes = [PAIRS_PER_MICRO_BATCH] * (accumulation - 1) + [1]
    return ["DPO sigmoid", "`sigmoid`", str(accumulation), " + ".join(map(str, sizes))] + [
        f"{relative_error(g, reference):.2e}" for g in errors
    ]


# GRPO-style -------------------------------------------------------------------------------------

# name, TRL loss_type, bigbatch normalization, generation batch in optimizer steps
POLICY_LOSSES = (
    ("GRPO sequence", "grpo", "sequence", 1),
    ("DAPO token", "dapo", "token", 1),
    ("Dr. GRPO constant", "dr_grpo", "constant", 1),
    ("DAPO token, generation batch of 2 steps", "dapo", "token", 2),
)


def generation_batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """GRPOTrainer's layout: 3-token prompts, completions of 1-9 tokens (right-padded), one
    advantage each, and sampling / reference log-probs offset from the policy's by up to 0.5
    (so ratios leave the clip range, as after the first of several iterations)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_COMPLETION + 1, (rows,), generator=generator)
    mask = (torch.arange(MAX_COMPLETION).view(1, -1) < lengths.view(-1, 1)).long()
    completion_ids = torch.randint(0, VOCAB - 3, (rows, MAX_COMPLETION), generator=generator)
    completion_ids[mask == 0] = PAD
    return {
        "prompt_ids": torch.randint(0, VOCAB - 3, (rows, 3), generator=generator),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "advantages": torch.randn(rows, generator=generator, dtype=torch.float64),
        "old_shift": torch.rand(rows, MAX_COMPLETION, generator=generator).double() - 0.5,
        "ref_shift": torch.rand(rows, MAX_COMPLETION, generator=generator).double() - 0.5,
    }


def sequence_logps(model: torch.nn.Module, batch: dict, row: int) -> torch.Tensor:
    length = int(batch["completion_mask"][row].sum())
    prompt = batch["prompt_ids"][row].tolist()
    return token_logps(model, prompt, batch["completion_ids"][row, :length].tolist())


def policy_reference(model: torch.nn.Module, batch: dict, normalization: str) -> torch.Tensor:
    """PPO-clip plus beta * k3 KL per token, averaged as GRPO, DAPO or Dr. GRPO define it."""
    model = copy.deepcopy(model)
    per_sequence = []
    for row in range(batch["prompt_ids"].shape[0]):
        logps = sequence_logps(model, batch, row)
        old = logps.detach() + batch["old_shift"][row, : len(logps)]
        ref = logps.detach() + batch["ref_shift"][row, : len(logps)]
        ratio, advantage = torch.exp(logps - old), batch["advantages"][row]
        surrogate = -torch.minimum(ratio * advantage, ratio.clamp(1 - CLIP, 1 + CLIP) * advantage)
        per_sequence.append(surrogate + BETA_KL * (torch.exp(ref - logps) - (ref - logps) - 1))
    if normalization == "sequence":
        loss = torch.stack([losses.mean() for losses in per_sequence]).mean()
    elif normalization == "token":
        loss = torch.cat(per_sequence).sum() / sum(len(losses) for losses in per_sequence)
    else:
        loss = torch.cat(per_sequence).sum() / (len(per_sequence) * MAX_COMPLETION)
    loss.backward()
    return flat_gradient(model)


def micro_batches(model: torch.nn.Module, batch: dict, sizes: list[int]) -> list[dict]:
    """TRL's micro-batches of the batch: its keys, old and reference log-probs padded as TRL has
    them, and (for DAPO) the generation batch's token count."""
    rows = batch["prompt_ids"].shape[0]
    padded = torch.zeros(rows, MAX_COMPLETION, dtype=torch.float64)
    with torch.no_grad():
        for row in range(rows):
            logps = sequence_logps(model, batch, row)
            padded[row, : len(logps)] = logps
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
    result, start = [], 0
    for size in sizes:
        micro = {key: batch[key][start : start + size] for key in keys}
        micro["old_per_token_logps"] = (padded + batch["old_shift"])[start : start + size]
        micro["ref_per_token_logps"] = (padded + batch["ref_shift"])[start : start + size]
        micro["num_items_in_batch"] = batch["completion_mask"].sum()
        result.append(micro)
        start += size
    return result


def grpo_trainer(model: torch.nn.Module, loss_type: str):
    """A GRPOTrainer around the model, used for its loss code only (no generation runs)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    arguments = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bigbatch-trl-"),
        per_device_train_batch_size=COMPLETIONS_PER_MICRO_BATCH,
        num_generations=2,
        max_completion_length=MAX_COMPLETION,
        loss_type=loss_type,
        epsilon=CLIP,
        beta=0.0,  # set below: a non-zero beta here loads a reference model by name
        use_bias_correction_kl=False,  # the plain k3 KL, as bigbatch.losses writes it
        activation_checkpointing=False,
        bf16=False,
        report_to="none",
        use_cpu=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=arguments,
        train_dataset=Dataset.from_list([{"prompt": "t1 t2 t3"}] * 8),
        processing_class=tokenizer(),
    )
    trainer.beta = BETA_KL  # the KL term reads the batch's ref_per_token_logps
    trainer.model.train()
    return trainer


def trl_policy_gradient(trainer, window: list[dict], accumulation: int, steps_per_generation):
    """Backpropagate TRL's loss of every micro-batch as the Trainer does (GRPOTrainer scales for
    accumulation itself), and return the summed gradient."""
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = steps_per_generation
    trainer.model.zero_grad(set_to_none=True)
    for micro in window:
        trainer.compute_loss(trainer.model, micro).backward()
    return flat_gradient(trainer.model)


def policy_row(model, loss: tuple[str, str, str, int], accumulation: int) -> list[str]:
    name, loss_type, normalization, generation_steps = loss
    sizes = [COMPLETIONS_PER_MICRO_BATCH] * accumulation
    batch = generation_batch(sum(sizes) * generation_steps, seed=7 * accumulation)
    generated = micro_batches(model, batch, sizes * generation_steps)
    window = generated[:accumulation]  # the first optimizer step of the generation batch
    step_rows = sum(sizes)
    step = {key: value[:step_rows] for key, value in batch.items()}
    reference = policy_reference(model, step, normalization)
    trainer = grpo_trainer(copy.deepcopy(model), loss_type)
    trl_own = trl_policy_gradient(trainer, window, accumulation, accumulation * generation_steps)
    whole = micro_batches(model, step, [step_rows])
    trl_full = trl_policy_gradient(trainer, whole, 1, 1)
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
    loss_fn = policy_gradient_loss_fn(normalization, MAX_COMPLETION, CLIP, BETA_KL)
    # bigbatch counts the window's items itself: TRL's scalar count is not a micro-batch column
    ours = [{k: v for k, v in micro.items() if k != "num_items_in_batch"} for micro in window]
    bigbatch.Accumulator(trained, optimizer).step(ours, loss_fn)
    exact = weights(model) - weights(trained)
    cells = [relative_error(g, reference) for g in (trl_own, exact)]
    layout = " + ".join(map(str, sizes))
    if generation_steps > 1:  # DAPO's count: this step's tokens vs the generation batch's
        tokens = int(step["completion_mask"].sum()), int(batch["completion_mask"].sum())
        layout += f" ({tokens[0]} of {tokens[1]} tokens)"
    return [name, f"`{loss_type}`", str(accumulation), layout,
            f"{cells[0]:.2e}", f"{cells[1]:.2e}", "--",
            f"{relative_error(trl_full, reference):.2e}"]  # fmt: skip


def main() -> None:
    args = argument_parser(__doc__, "accumulation 2 only").parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    model = tiny_gpt2()
    rows = []
    for accumulation in (2,) if args.smoke else (2, 4):
        rows.append(dpo_row(model, accumulation))
        rows += [policy_row(model, loss, accumulation) for loss in POLICY_LOSSES]
    header = (
        "| loss | TRL loss_type | accumulation | micro-batches | TRL accumulated "
        "| bigbatch Accumulator | bigbatch in DPOTrainer | TRL, one full batch |"
    )
    table = "\n".join(
        [header, "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        + ["| " + " | ".join(row) + " |" for row in sorted(rows, key=lambda r: (r[0], r[2]))]
    )
    import transformers
    import trl

    note = (
        f"Relative error of the applied gradient against one float64 full-batch gradient; a "
        f"2-layer GPT-2 (32 wide) in float64, DPO responses of 2-9 tokens, GRPO completions of "
        f"1-9 tokens; trl {trl.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__}. Deterministic: the figures do not depend on the machine's load."
    )
    publish("trl_losses", table, note, smoke=args.smoke)


if __name__ == "__main__":
    main()
