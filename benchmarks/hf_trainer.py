"""The HF Trainer's accumulation on real transformers classes: its gradient error and its cause.

The Trainer divides each window's summed loss by `num_items_in_batch`, the labels it counts over
the window. Two things keep it from the full-batch gradient, and this script measures both on
tiny models built from a config (random init, nothing downloaded), in float64, against one
full-batch gradient computed here (float64 logits, float64 cross-entropy over the shifted labels):

- the count: for a class whose `loss_type` transformers does not map to its causal-LM loss
  (`GPT2LMHeadModel`), the Trainer counts the *unshifted* labels, one more per row than carry a
  loss. Every step's gradient has the right direction and is shorter by 1 - shifted/unshifted,
  which depends on the data: this script measures it on five datasets with different padding and
  prints the ratio beside it. A dataset whose first label of every row is already -100 (a masked
  prompt) has no error at all.
- the precision: `*ForCausalLM` classes (Llama, Qwen2) compute their loss in float32 (transformers
  upcasts the logits with `.float()`, which turns float64 logits into float32), so even in float64
  the Trainer lands ~1e-8 from the full batch. bigbatch's `causal_lm_loss` keeps float64 logits.

    python benchmarks/hf_trainer.py            # writes benchmarks/results/hf_trainer.md
    python benchmarks/hf_trainer.py --smoke    # two datasets, two classes
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import bigbatch
from bigbatch.integrations.huggingface import causal_lm_loss

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import applied_gradient, argument_parser, publish  # noqa: E402

VOCAB = 64
IGNORE = -100
MAX_LEN = 32
Batch = dict[str, torch.Tensor]

# name: (shortest row, longest row, whether the first token of every row is a masked prompt)
DATASETS: dict[str, tuple[int, int, bool]] = {
    "prompt masked, lengths 4-32": (4, 32, True),
    "full rows of 32": (32, 32, False),
    "lengths 16-32": (16, 32, False),
    "lengths 4-32": (4, 32, False),
    "lengths 2-12": (2, 12, False),
}


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=MAX_LEN)  # fmt: skip
    return LlamaForCausalLM(config)


def qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=MAX_LEN)  # fmt: skip
    return Qwen2ForCausalLM(config)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "GPT2LMHeadModel": gpt2,
    "LlamaForCausalLM": llama,
    "Qwen2ForCausalLM": qwen2,
}


def make_window(dataset: str, micro: int, accumulation: int, seed: int) -> list[Batch]:
    """Right-padded micro-batches; labels are the ids, -100 on padding (and on a masked prompt)."""
    shortest, longest, masked_prompt = DATASETS[dataset]
    generator = torch.Generator().manual_seed(seed)
    window = []
    for _ in range(accumulation):
        lengths = torch.randint(shortest, longest + 1, (micro,), generator=generator)
        width = int(lengths.max())
        input_ids = torch.randint(1, VOCAB, (micro, width), generator=generator)
        attention_mask = (torch.arange(width).view(1, -1) < lengths.view(-1, 1)).long()
        input_ids[attention_mask == 0] = 0
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        if masked_prompt:
            labels[:, 0] = IGNORE
        window.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return window


def full_batch_gradient(model: torch.nn.Module, window: list[Batch]) -> torch.Tensor:
    """The reference: (sum of every shifted label's float64 loss) / (their number), one backward."""
    model = copy.deepcopy(model)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in window:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total = total + F.cross_entropy(
            logits[:, :-1].double().reshape(-1, VOCAB),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        count += int((targets != IGNORE).sum())
    (total / count).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def trainer_step(window: list[Batch]):
    """One optimizer step of the HF Trainer over the window: one dataset item per micro-batch."""

    def step(model, optimizer):
        from transformers import Trainer, TrainingArguments

        arguments = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="bigbatch-hf-trainer-"),
            per_device_train_batch_size=1,
            gradient_accumulation_steps=len(window),
            max_steps=1,
            max_grad_norm=0.0,  # no clipping
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            remove_unused_columns=False,
        )
        Trainer(
            model=model,
            args=arguments,
            train_dataset=window,
            data_collator=lambda items: items[0],
            optimizers=(optimizer, None),
        ).train()

    return step


def bigbatch_step(window: list[Batch]):
    def step(model, optimizer):
        bigbatch.Accumulator(model, optimizer).step(window, causal_lm_loss)

    return step


def shortfall(window: list[Batch]) -> float:
    """1 - shifted / unshifted label count: the GPT-2 class's predicted relative error."""
    shifted = sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in window)
    unshifted = sum(int((batch["labels"] != IGNORE).sum()) for batch in window)
    return 1.0 - shifted / unshifted


def relative_error(gradient: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    relative = float((gradient - reference).norm() / reference.norm())
    return relative, float(F.cosine_similarity(gradient, reference, dim=0))


def measure(model_name: str, dataset: str, micro: int, accumulation: int) -> str:
    torch.manual_seed(0)
    model = MODELS[model_name]().double()
    window = make_window(dataset, micro, accumulation, seed=1)
    reference = full_batch_gradient(model, window)
    trainer, cosine = relative_error(applied_gradient(trainer_step(window), model), reference)
    exact, _ = relative_error(applied_gradient(bigbatch_step(window), model), reference)
    return (
        f"| {model_name} | {dataset} | {trainer:.2e} | {cosine:.9f} | {shortfall(window):.2e} "
        f"| {exact:.2e} |"
    )


def main() -> None:
    args = argument_parser(__doc__, "two datasets, two classes").parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    models = ["GPT2LMHeadModel", "LlamaForCausalLM"] if args.smoke else list(MODELS)
    datasets = list(DATASETS)[:2] if args.smoke else list(DATASETS)
    micro, accumulation = 4, 4
    rows = [
        "| class | dataset | HF Trainer error | cosine | 1 - shifted/unshifted | bigbatch error |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows += [measure(m, d, micro, accumulation) for m in models for d in datasets]
    import transformers

    note = (
        f"{accumulation} micro-batches of {micro} right-padded rows, float64, relative error of "
        f"the applied gradient (one SGD step, lr 1) against one float64 full-batch gradient; "
        f"transformers {transformers.__version__}, torch {torch.__version__}. Deterministic: the "
        f"figures do not depend on the machine's load."
    )
    publish("hf_trainer", "\n".join(rows), note, smoke=args.smoke)


if __name__ == "__main__":
    main()
