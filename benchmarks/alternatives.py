"""Gradient error and step time: bigbatch vs the textbook loop, Accelerate, Lightning, HF Trainer.

Every method gets the same model and the same micro-batches of padded variable-length sequences
(a small causal transformer, only real tokens carry loss). The error is measured in float64 against
one full-batch gradient (sum of every token's loss / number of tokens); the step time in float32.
Accelerate, Lightning and transformers are optional (`pip install -e '.[bench]'`); a missing one is
reported. The HF Trainer runs the model behind transformers' causal-LM interface (labels = the
input ids, shifted inside; `num_items_in_batch` accepted), once as a model whose class
transformers maps to its causal-LM loss (e.g. LlamaForCausalLM) and once as one it does not (e.g.
GPT2LMHeadModel), for which the Trainer counts the unshifted labels.

    python benchmarks/alternatives.py            # writes benchmarks/results/alternatives.{md,png}
    python benchmarks/alternatives.py --smoke    # tiny sizes, for CI
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import bigbatch

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import (  # noqa: E402
    applied_gradient,
    argument_parser,
    publish,
    pyplot,
    save_figure,
)

VOCAB = 64
IGNORE = -100
Batch = tuple[torch.Tensor, torch.Tensor]


class TinyCausalLM(torch.nn.Module):
    """Token and position embeddings, two pre-norm causal transformer layers, a vocabulary head."""

    def __init__(self, width: int = 64, layers: int = 2, max_len: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(VOCAB, width)
        self.positions = torch.nn.Embedding(max_len, width)
        layer = torch.nn.TransformerEncoderLayer(
            width,
            nhead=4,
            dim_feedforward=4 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=hidden.dtype)
        return self.head(self.blocks(hidden, mask=mask, is_causal=True))


def make_micro_batches(count: int, micro: int, max_len: int, seed: int) -> list[Batch]:
    """Padded sequences whose lengths vary widely (1 to max_len), padded per micro-batch."""
    generator = torch.Generator().manual_seed(seed)
    micro_batches = []
    for _ in range(count):
        lengths = torch.randint(2, max_len + 1, (micro,), generator=generator)
        width = int(lengths.max())
        tokens = torch.randint(1, VOCAB, (micro, width), generator=generator)
        padding = torch.arange(width).view(1, -1) >= lengths.view(-1, 1)
        tokens[padding] = 0
        labels = tokens.roll(-1, dims=1)
        labels[:, -1] = IGNORE
        labels[padding | padding.roll(-1, dims=1)] = IGNORE
        micro_batches.append((tokens, labels))
    return micro_batches


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, labels = batch
    logits = model(tokens)
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss, (labels != IGNORE).sum()


def token_loss_mean(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    tokens, labels = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def full_batch_gradient(model: torch.nn.Module, window: list[Batch]) -> torch.Tensor:
    """The reference: one backward of (sum of all token losses) / (number of tokens)."""
    model = copy.deepcopy(model)
    total = sum(token_loss_sum(model, batch)[0] for batch in window)
    count = sum(int(token_loss_sum(model, batch)[1]) for batch in window)
    (total / count).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def textbook_step(window: list[Batch]):
    def step(model, optimizer):
        for batch in window:
            (token_loss_mean(model, batch) / len(window)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bigbatch_step(window: list[Batch]):
    accumulators: dict[int, bigbatch.Accumulator] = {}

    def step(model, optimizer):
        key = id(model)
        if key not in accumulators:
            accumulators[key] = bigbatch.Accumulator(model, optimizer)
        accumulators[key].step(window, token_loss_sum)

    return step


def accelerate_step(window: list[Batch]):
    from accelerate import Accelerator

    prepared: dict[int, tuple] = {}

    def step(model, optimizer):
        key = id(model)
        if key not in prepared:
            accelerator = Accelerator(gradient_accumulation_steps=len(window), cpu=True)
            prepared[key] = (accelerator, *accelerator.prepare(model, optimizer))
        accelerator, model, optimizer = prepared[key]
        for batch in window:
            with accelerator.accumulate(model):
                accelerator.backward(token_loss_mean(model, batch))
                optimizer.step()
                optimizer.zero_grad()

    return step


def _lightning_module(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_index):
            return token_loss_mean(self.model, batch)

        def configure_optimizers(self):
            return optimizer

    return Module()


def _lightning_fit(model, optimizer, window: list[Batch], steps: int, callbacks=()) -> None:
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        accumulate_grad_batches=len(window),
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        precision="64-true" if next(model.parameters()).dtype == torch.float64 else "32-true",
    )
    loader = torch.utils.data.DataLoader(window * steps, batch_size=None, shuffle=False)
    trainer.fit(_lightning_module(model, optimizer), loader)


def lightning_step(window: list[Batch]):
    def step(model, optimizer):
        _lightning_fit(model, optimizer, window, steps=1)

    return step


def lightning_step_times(window: list[Batch], model: torch.nn.Module, steps: int) -> list[float]:
    """Seconds between consecutive optimizer steps inside one long-lived Lightning fit."""
    import pytorch_lightning as pl

    stamps: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
            if (batch_index + 1) % len(window) == 0:
                stamps.append(time.perf_counter())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _lightning_fit(model, optimizer, window, steps=steps + 1, callbacks=[Clock()])
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


class HFCausalLM(torch.nn.Module):
    """The model behind transformers' causal-LM interface: labels are the input ids, scored shifted.

    The loss is transformers' ForCausalLMLoss (sum over the shifted labels divided by the Trainer's
    num_items_in_batch, or a mean without it), computed here in the model's dtype so that float64
    measures the accumulation, not transformers' float32 upcast. `loss_type` is what the Trainer
    reads to decide whether the labels it counts are shifted.
    """

    def __init__(self, model: torch.nn.Module, loss_type: str | None) -> None:
        super().__init__()
        self.model = model
        self.loss_type = loss_type

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.model(input_ids)
        shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        loss = F.cross_entropy(
            logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        count = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum()
        return {"loss": loss / count, "logits": logits}


def hf_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The same micro-batch as transformers takes it: labels are the ids, -100 on padding."""
    tokens, shifted = batch
    labels = torch.cat(
        [tokens[:, :1], tokens[:, 1:].masked_fill(shifted[:, :-1] == IGNORE, IGNORE)], 1
    )
    return {"input_ids": tokens, "labels": labels}


def _hf_trainer(model, optimizer, window: list[Batch], steps: int, loss_type, callbacks=()):
    from transformers import Trainer, TrainingArguments

    output_dir = tempfile.mkdtemp(prefix="bigbatch-hf-trainer-")
    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,  # one dataset item is one prepared micro-batch
        gradient_accumulation_steps=len(window),
        max_steps=steps,
        max_grad_norm=0.0,  # no clipping, as for the other methods
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
    )
    return Trainer(
        model=HFCausalLM(model, loss_type),
        args=arguments,
        train_dataset=[hf_inputs(batch) for batch in window] * steps,
        data_collator=lambda items: items[0],
        optimizers=(optimizer, None),
        callbacks=list(callbacks),
    )


def hf_trainer_step(loss_type: str | None):
    def factory(window: list[Batch]):
        def step(model, optimizer):
            _hf_trainer(model, optimizer, window, 1, loss_type).train()

        return step

    return factory


def hf_trainer_step_times(window: list[Batch], model: torch.nn.Module, steps: int) -> list[float]:
    """Seconds between consecutive optimizer steps inside one long-lived HF Trainer run."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _hf_trainer(model, optimizer, window, steps + 1, "ForCausalLM", [Clock()]).train()
    return [later - earlier for earlier, later in zip(stamps, stamps[1:])]


HF_TRAINER = "HF Trainer num_items_in_batch"
HF_TRAINER_UNSHIFTED = "HF Trainer num_items_in_batch, GPT-2 class"


METHODS: dict[str, tuple[Callable, str | None]] = {
    "textbook loop (loss / k)": (textbook_step, None),
    "HF Accelerate accumulate": (accelerate_step, "accelerate"),
    "Lightning accumulate_grad_batches": (lightning_step, "pytorch_lightning"),
    HF_TRAINER: (hf_trainer_step("ForCausalLM"), "transformers"),
    HF_TRAINER_UNSHIFTED: (hf_trainer_step(None), "transformers"),
    "bigbatch Accumulator.step": (bigbatch_step, None),
}
# Methods that run their own loop: timed inside one long run, set-up excluded.
OWN_LOOP = ("pytorch_lightning", "transformers")


def gradient_errors(window: list[Batch]) -> dict[str, tuple[float, float] | None]:
    model = TinyCausalLM().double()
    reference = full_batch_gradient(model, window)
    errors: dict[str, tuple[float, float] | None] = {}
    for name, (factory, package) in METHODS.items():
        if package and importlib.util.find_spec(package) is None:
            errors[name] = None
            continue
        gradient = applied_gradient(factory(window), model)
        relative = float((gradient - reference).norm() / reference.norm())
        cosine = float(F.cosine_similarity(gradient, reference, dim=0))
        errors[name] = (relative, cosine)
    return errors


def step_times(window: list[Batch], repeats: int) -> dict[str, float | None]:
    """Median seconds per optimizer step (float32), the methods interleaved round by round.

    Lightning and the HF Trainer run their own loop, so they are timed inside one long run
    (set-up excluded); the Trainer once, its count does not change its speed."""
    model = TinyCausalLM()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    steps = {}
    for name, (factory, package) in METHODS.items():
        if package in OWN_LOOP or (package and importlib.util.find_spec(package) is None):
            continue
        method_model = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(method_model.parameters(), lr=1e-4)
        steps[name] = (factory(window), method_model, optimizer)
    for round_index in range(repeats + 1):
        for name, (step, method_model, optimizer) in steps.items():
            start = time.perf_counter()
            step(method_model, optimizer)
            if round_index > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    if importlib.util.find_spec("pytorch_lightning") is not None:
        times["Lightning accumulate_grad_batches"] = lightning_step_times(
            window, copy.deepcopy(model), repeats
        )
    if importlib.util.find_spec("transformers") is not None:
        times[HF_TRAINER] = hf_trainer_step_times(window, copy.deepcopy(model), repeats)
    return {name: statistics.median(t) if t else None for name, t in times.items()}


def main() -> None:
    parser = argument_parser(__doc__, "tiny sizes (CI)")
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric",
                 "transformers"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    micro, accumulation, max_len = (4, 2, 16) if args.smoke else (8, 8, 64)
    repeats = 2 if args.smoke else 7
    window = make_micro_batches(accumulation, micro, max_len, seed=0)
    tokens = [int((labels != IGNORE).sum()) for _, labels in window]
    errors = gradient_errors(window)
    times = step_times(window, repeats)
    baseline = times["textbook loop (loss / k)"]
    rows = [
        "| method | relative gradient error | cosine to full batch | step time | vs textbook |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in METHODS:
        error, seconds = errors[name], times.get(name)
        if error is None or baseline is None:
            rows.append(f"| {name} | not installed | | | |")
            continue
        if seconds is None:  # measured once per framework: same loop, another count
            rows.append(f"| {name} | {error[0]:.2e} | {error[1]:.6f} | as above | |")
            continue
        rows.append(
            f"| {name} | {error[0]:.2e} | {error[1]:.6f} | {seconds * 1e3:.1f} ms "
            f"| {seconds / baseline:.2f} |"
        )
    table = "\n".join(rows)
    note = (
        f"{accumulation} micro-batches of {micro} padded sequences (lengths 2-{max_len}); loss "
        f"tokens per micro-batch: {tokens}. Errors in float64 against one full-batch gradient; "
        f"step times in float32, median of {repeats} interleaved rounds, torch {torch.__version__}."
    )
    publish("alternatives", table, note, smoke=args.smoke, plot=lambda path: plot(errors, path))


def plot(errors: dict[str, tuple[float, float] | None], path: Path) -> None:
    plt = pyplot()
    names = [name for name, error in errors.items() if error is not None]
    values = [max(errors[name][0], 1e-17) for name in names]  # type: ignore[index]
    figure, axis = plt.subplots(figsize=(7, 3))
    axis.barh(names, values, color=["#c44" if v > 1e-6 else "#4a4" for v in values])
    axis.set_xscale("log")
    axis.set_xlabel("relative error of the applied gradient vs one full batch (float64)")
    axis.invert_yaxis()
    for y, value in enumerate(values):
        axis.text(value, y, f" {value:.1e}", va="center")
    axis.set_xlim(1e-17, 10)
    save_figure(figure, path)
    assert math.isfinite(sum(values))


if __name__ == "__main__":
    main()
