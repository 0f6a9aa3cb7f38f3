"""Global batches in tokens on long-tailed sequences: padding, tokens/s, memory, steps to a loss.

`tinylm` with chains of 1 to 16 sums a sample (their count long-tailed: most samples are one or two
sums, a few are long) trained three ways under the same memory budget per micro-batch (MICRO padded
tokens, rows x longest row):

- samples: `global_batch_size` G, `micro_batch_size` = MICRO // longest sample, what keeps the
  longest sequences within the budget;
- tokens: `global_batch_tokens` = G x the mean sample tokens, `micro_batch_tokens` MICRO;
- tokens + packing: the same, several sequences a row (`packing: true`).

Each is a `Trainer` run as `bigbatch train` builds it, with the same model, data order, learning
rate and warm-up (in tokens). Measured: padding (padded tokens of every micro-batch that are
padding), tokens/s (input tokens per CPU second of the optimizer steps, one torch thread, so time
other processes take is not counted), peak activation memory (bytes autograd saves for backward in
the largest micro-batch, parameters excluded; counted, not sampled), and the optimizer steps and
input tokens until the eval loss first reaches a target.

    python benchmarks/token_batches.py            # writes benchmarks/results/token_batches.{md,png}
    python benchmarks/token_batches.py --smoke    # a few steps of each arm, prints (CI)
"""

from __future__ import annotations

import logging
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from bigbatch.recipes import tinylm
from bigbatch.train.configfile import validate, with_recipe_defaults
from bigbatch.train.metrics import read_metrics
from bigbatch.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

ARMS = ("samples", "tokens", "tokens + packing")


@dataclass(frozen=True)
class Setup:
    """The task and the budgets shared by the three arms."""

    options: dict[str, int]
    global_batch_size: int
    micro_tokens: int
    max_steps: int
    eval_every: int
    target_loss: float
    lr: float = 3e-3
    warmup_steps: int = 20


FULL = Setup(
    options={
        "max_digits": 2,
        "max_sums": 16,
        "num_train_samples": 8000,
        "num_eval_samples": 400,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
    },
    global_batch_size=64,
    micro_tokens=640,
    max_steps=300,
    eval_every=20,
    target_loss=1.3,
)
SMOKE = Setup(
    options={
        "max_digits": 2,
        "max_sums": 6,
        "num_train_samples": 300,
        "num_eval_samples": 40,
        "d_model": 16,
        "num_layers": 1,
        "num_heads": 2,
    },
    global_batch_size=16,
    micro_tokens=160,
    max_steps=3,
    warmup_steps=1,
    eval_every=1,
    target_loss=10.0,
)


@dataclass
class Meter:
    """What the wrapped loss_fn and the wrapped optimizer steps count, training steps only."""

    parameters: set[int] = field(default_factory=set)
    active: bool = False
    tokens: int = 0
    padded_tokens: int = 0
    peak_saved_bytes: int = 0
    cpu_s: float = 0.0
    tokens_after_step: list[int] = field(default_factory=list)
    cpu_s_after_step: list[float] = field(default_factory=list)

    def loss_fn(self, model: torch.nn.Module, batch: Any) -> Any:
        """tinylm's loss, counting the micro-batch's tokens and what it saves for backward."""
        if not self.active:  # evaluation
            return tinylm.loss_fn(model, batch)
        inputs = batch[0]
        self.padded_tokens += inputs.numel()
        self.tokens += int((inputs != tinylm.PAD).sum())  # PAD only ever pads
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.parameters:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with saved_tensors_hooks(pack, lambda tensor: tensor):
            output = tinylm.loss_fn(model, batch)
        self.peak_saved_bytes = max(self.peak_saved_bytes, sum(seen.values()))
        return output


def arm_config(arm: str, setup: Setup, longest: int, mean_tokens: float) -> dict[str, Any]:
    """The config of one arm, as `--set` would give it."""
    shared = {
        "recipe": "tinylm",
        "max_steps": setup.max_steps,
        "eval_every": setup.eval_every,
        "checkpoint_every": 0,
        "lr": setup.lr,
        "warmup_steps": setup.warmup_steps,
        "lr_scaling": {"rule": "none"},
        "max_grad_norm": 1.0,
    }
    if arm == "samples":
        micro = max(1, setup.micro_tokens // longest)
        return {**shared, "global_batch_size": setup.global_batch_size, "micro_batch_size": micro}
    return {
        **shared,
        "global_batch_tokens": round(setup.global_batch_size * mean_tokens),
        "micro_batch_tokens": setup.micro_tokens,
        "packing": arm == "tokens + packing",
    }


def run_arm(arm: str, setup: Setup) -> dict[str, Any]:
    """Train one arm; its figures."""
    recipe = tinylm.build({"seed": 0, "recipe_options": setup.options})
    lengths = recipe.train_dataset.lengths
    config = arm_config(arm, setup, max(lengths), sum(lengths) / len(lengths))
    config = with_recipe_defaults(validate(config), recipe.defaults)
    meter = Meter(parameters={p.untyped_storage().data_ptr() for p in recipe.model.parameters()})
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            recipe.model,
            recipe.build_optimizer(recipe.model, config.lr, config.weight_decay),
            meter.loss_fn,
            recipe.train_dataset,
            config,
            eval_dataset=recipe.eval_dataset,
            collate_fn=recipe.collate_fn,
            collate_packed=recipe.collate_packed,
            run_dir=run_dir,
            progress=False,
            name=arm,
        )
        step = trainer.accumulator.step

        def timed_step(window: Any, loss_fn: Any) -> Any:
            meter.active, start = True, time.thread_time()
            try:
                return step(window, loss_fn)
            finally:
                meter.cpu_s += time.thread_time() - start
                meter.active = False
                meter.tokens_after_step.append(meter.tokens)
                meter.cpu_s_after_step.append(meter.cpu_s)

        trainer.accumulator.step = timed_step  # type: ignore[method-assign]
        trainer.fit()
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
    evals = [(r["step"], r["eval/loss"]) for r in records if r.get("kind") == "eval"]
    reached = next((step for step, loss in evals if loss <= setup.target_loss), None)
    return {
        "arm": arm,
        "padding": 1 - meter.tokens / meter.padded_tokens,
        "tokens_per_s": meter.tokens / meter.cpu_s,
        "peak_saved_bytes": meter.peak_saved_bytes,
        "steps_to_target": reached,
        "tokens_to_target": None if reached is None else meter.tokens_after_step[reached - 1],
        "cpu_s_to_target": None if reached is None else meter.cpu_s_after_step[reached - 1],
        "final_eval_loss": evals[-1][1],
        "evals": evals,
        "tokens_after_step": meter.tokens_after_step,
        "cpu_s_after_step": meter.cpu_s_after_step,
        "micro_batch": (
            f"{config.micro_batch_size} rows"
            if config.micro_batch_size
            else f"{config.micro_batch_tokens} tokens"
        ),
    }


def format_table(results: list[dict[str, Any]], setup: Setup) -> str:
    """The markdown table of the three arms."""
    lines = [
        f"| global batch | micro-batch | padding | tokens/s | peak activations | steps to eval "
        f"loss {setup.target_loss} | tokens to it | CPU s to it | final eval loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        steps, tokens = result["steps_to_target"], result["tokens_to_target"]
        cpu_s = result["cpu_s_to_target"]
        lines.append(
            f"| {result['arm']} | {result['micro_batch']} | {result['padding']:.1%} | "
            f"{result['tokens_per_s']:,.0f} | {result['peak_saved_bytes'] / 2**20:.2f} MiB | "
            f"{steps if steps is not None else 'not reached'} | "
            f"{f'{tokens:,}' if tokens is not None else '-'} | "
            f"{f'{cpu_s:.1f}' if cpu_s is not None else '-'} | {result['final_eval_loss']:.3f} |"
        )
    return "\n".join(lines)


def note(setup: Setup, results: list[dict[str, Any]]) -> str:
    recipe = tinylm.build({"seed": 0, "recipe_options": setup.options})
    lengths = recipe.train_dataset.lengths
    mean = sum(lengths) / len(lengths)
    tokens = round(setup.global_batch_size * mean)
    return (
        f"tinylm {setup.options}: sample lengths {min(lengths)} to {max(lengths)} input tokens, "
        f"mean {mean:.1f}. Same memory budget per micro-batch: {setup.micro_tokens} padded "
        f"tokens (samples: {setup.micro_tokens} // {max(lengths)} = "
        f"{setup.micro_tokens // max(lengths)} rows; tokens: micro_batch_tokens "
        f"{setup.micro_tokens}). Global batch: {setup.global_batch_size} samples, or "
        f"{tokens} tokens = {setup.global_batch_size} x the mean. AdamW lr {setup.lr}, warm-up "
        f"{setup.warmup_steps} steps, {setup.max_steps} steps, eval every {setup.eval_every}. "
        "tokens/s: input tokens per CPU second of the optimizer steps (one torch thread); peak "
        "activations: bytes saved for backward by the largest micro-batch. "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}."
    )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for result in results:
        losses = [loss for _, loss in result["evals"]]
        for axis, key in zip(axes, ("tokens_after_step", "cpu_s_after_step")):
            x = [result[key][step - 1] for step, _ in result["evals"]]
            axis.plot(x, losses, marker="o", ms=3, label=result["arm"])
    axes[0].set_xlabel("input tokens trained on")
    axes[1].set_xlabel("CPU seconds of the optimizer steps")
    axes[0].set_ylabel("eval loss (per answer token)")
    for axis in axes:
        axis.grid(True, alpha=0.3)
    axes[1].legend()
    save_figure(figure, path)


def main() -> None:
    args = argument_parser(__doc__, "three arms of a few steps, prints only").parse_args()
    setup = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    logging.getLogger("bigbatch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    results = [run_arm(arm, setup) for arm in ARMS]
    publish(
        "token_batches",
        format_table(results, setup),
        note(setup, results),
        smoke=args.smoke,
        plot=lambda path: plot(results, path),
    )


if __name__ == "__main__":
    main()
