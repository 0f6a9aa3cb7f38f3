"""micro_batch_tokens for a memory budget, and the token plan `bigbatch plan` shows.

The memory probe (`bigbatch.tools.memory`) runs micro-batches of r rows of the dataset's longest
sample (packed rows when the run packs) and fits memory per padded token; any micro-batch of the
same padded size is no bigger (shorter rows attend over fewer positions), so
`choose_micro_batch_tokens` picks rows x longest that fits the budget, through
`bigbatch.tools.autobatch.choose_micro_batch_size`. `token_plan_report` shows what a token run's
global batches become: the first step's split and padding over an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from bigbatch.choices import DEFAULT_OPTIMIZE, Optimize, Parallelism
from bigbatch.core.engine import LossFn
from bigbatch.data.sampler import GlobalBatchSampler
from bigbatch.planning import TokenBudget, TokenPlan, TokenUnit, plan_tokens, sample_lengths
from bigbatch.tools.autobatch import Agree, MicroBatchChoice, ShardUnits, choose_micro_batch_size
from bigbatch.tools.memory import Batch
from bigbatch.tools.rank_memory import Layout, format_rank_memory
from bigbatch.units import UsageError, format_bytes


def longest_rows(
    dataset: Dataset[Any],
    lengths: np.ndarray,
    collate_fn: Callable[[list[Any]], Any] | None,
    collate_packed: Callable[[list[list[Any]]], Any] | None = None,
) -> Callable[[int], Batch]:
    """``make_rows(r)``: r rows of the longest sample, collated as training does (packed rows
    of one sample each when collate_packed is given)."""
    longest = dataset[int(np.argmax(lengths))]
    collate = collate_fn or default_collate

    def make_rows(rows: int) -> Batch:
        if collate_packed is not None:
            return collate_packed([[longest] for _ in range(rows)])
        return collate([longest] * rows)

    return make_rows


@dataclass(frozen=True)
class TokenBatchChoice:
    """The chosen micro_batch_tokens and why.

    Attributes:
        micro_batch_tokens: rows x row_tokens of the chosen micro-batch.
        row_tokens: the probed row length (the longest sample).
        bytes_per_token: the fit's memory per padded token (bytes per row / row_tokens).
        rows: the chosen micro-batch's rows at row_tokens.
        choice: the probe and the choice in rows.
    """

    micro_batch_tokens: int
    row_tokens: int
    bytes_per_token: float
    rows: int
    choice: MicroBatchChoice

    @property
    def reason(self) -> str:
        """One sentence with the numbers."""
        return (
            f"{self.rows} rows x {self.row_tokens} tokens (the longest sample): "
            f"{self.choice.reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for logs and `bigbatch plan --json`."""
        return {
            "micro_batch_tokens": self.micro_batch_tokens,
            "row_tokens": self.row_tokens,
            "bytes_per_token": self.bytes_per_token,
            "rows": self.rows,
            **{f"probe_{k}": v for k, v in self.choice.to_dict().items() if k != "reason"},
            "reason": self.reason,
        }


def choose_micro_batch_tokens(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    *,
    row_tokens: int,
    max_micro_batch_tokens: int,
    memory_budget_bytes: int | str | None,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    layout: Layout | None = None,
    agree: Agree | None = None,
    shard_units: ShardUnits | None = None,
) -> TokenBatchChoice:
    """Probe rows of row_tokens tokens and choose the padded tokens of a micro-batch.

    ``make_rows(r)`` gives r rows of the longest sample; the choice is the rows that fit
    ``memory_budget_bytes`` (largest, or fastest with optimize throughput, see
    `choose_micro_batch_size`) times row_tokens, at most max_micro_batch_tokens rounded down to
    whole rows (one row at least). ``layout``, ``agree`` and ``shard_units`` as for
    `choose_micro_batch_size`.

    Raises:
        ValueError: one row of the longest sample does not fit the budget (with the numbers).
    """
    if isinstance(row_tokens, bool) or not isinstance(row_tokens, int) or row_tokens < 1:
        raise UsageError(f"row_tokens must be a positive integer, got {row_tokens!r}")
    choice = choose_micro_batch_size(
        model,
        loss_fn,
        make_rows,
        max_micro_batch_size=max(1, max_micro_batch_tokens // row_tokens),
        memory_budget_bytes=memory_budget_bytes,
        optimize=optimize,
        optimizer=optimizer,
        device=device,
        headroom=headroom,
        layout=layout,
        agree=agree,
        shard_units=shard_units,
    )
    rows = choice.micro_batch_size
    per_token = choice.probe.bytes_per_sample / row_tokens
    return TokenBatchChoice(rows * row_tokens, row_tokens, per_token, rows, choice)


def _epoch_figures(
    lengths: np.ndarray, budget: TokenBudget, seed: int
) -> tuple[TokenPlan, dict[str, float]]:
    """The first step's plan and padding / micro-steps over one epoch's global batches."""
    sampler = GlobalBatchSampler(len(lengths), seed=seed, unit=TokenUnit(lengths))
    plans = []
    while sampler.next_epoch(budget.global_batch_tokens) == 0:
        indices = sampler.next_global_batch(budget.global_batch_tokens)
        plans.append(
            plan_tokens(
                lengths[indices].tolist(),
                budget.world_size,
                budget.micro_batch_tokens,
                packing=budget.packing,
                row_tokens=budget.longest if budget.packing else None,
                global_batch_tokens=budget.global_batch_tokens,
            )
        )
    tokens = sum(plan.num_tokens for plan in plans)
    padded = sum(plan.num_padded_tokens for plan in plans)
    steps = [plan.gradient_accumulation_steps for plan in plans]
    return plans[0], {
        "steps_per_epoch": len(plans),
        "padding_fraction": 1.0 - tokens / padded,
        "min_micro_steps": min(steps),
        "max_micro_steps": max(steps),
        "mean_samples_per_step": sum(plan.num_samples for plan in plans) / len(plans),
    }


def token_plan_report(
    recipe_spec: str,
    global_batch_tokens: int,
    *,
    world_size: int = 1,
    micro_batch_tokens: int | None = None,
    packing: bool = False,
    memory_budget: int | str | None = None,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    seed: int = 0,
    recipe_options: Mapping[str, Any] | None = None,
    parallelism: Parallelism = "ddp",
) -> tuple[str, dict[str, Any]]:
    """The token plan of a recipe as text and as a JSON-able dict: its training set's lengths
    give the first step's split and the padding over an epoch; memory_budget probes
    micro_batch_tokens first, the budget being one rank's of world_size under parallelism.
    """
    from bigbatch import recipes  # recipes import the engine: keep this module light to import

    recipe = recipes.build(
        recipe_spec, {"seed": seed, "recipe_options": dict(recipe_options or {})}
    )
    lengths = sample_lengths(recipe.train_dataset, recipe.sample_length)
    if packing and recipe.collate_packed is None:
        raise UsageError(f"--packing: recipe {recipe_spec!r} has no collate_packed")
    lines, extra = [], {}
    if memory_budget is not None:
        module = recipe.model.train()
        longest = int(lengths.max())
        choice = choose_micro_batch_tokens(
            module,
            recipe.loss_fn,
            longest_rows(
                recipe.train_dataset,
                lengths,
                recipe.collate_fn,
                recipe.collate_packed if packing else None,
            ),
            row_tokens=longest,
            max_micro_batch_tokens=max(longest, math.ceil(global_batch_tokens / world_size)),
            memory_budget_bytes=memory_budget,
            optimize=optimize,
            optimizer=recipe.build_optimizer(module, lr=float(recipe.defaults.get("lr", 1e-3))),
            layout=Layout(parallelism, world_size, "auto"),
            shard_units=recipe.shard_units,
        )
        micro_batch_tokens = choice.micro_batch_tokens
        lines.append(
            f"memory per padded token {format_bytes(choice.bytes_per_token)} (fit over rows of "
            f"{longest} tokens); micro_batch_tokens {micro_batch_tokens}: {choice.reason}"
        )
        if choice.choice.rank_memory:  # in rows of the longest sample
            memory = choice.choice.rank_memory
            lines.append(format_rank_memory(memory, choice.choice.memory_budget_bytes))
        extra["micro_batch_choice"] = choice.to_dict()
    budget = TokenBudget(
        global_batch_tokens, world_size, micro_batch_tokens, packing, int(lengths.max())
    )
    first, figures = _epoch_figures(lengths, budget, seed)
    lines += [
        str(budget),
        "",
        f"first step of recipe {recipe_spec} (seed {seed}):",
        str(first),
        "",
        f"over epoch 0: {figures['steps_per_epoch']} steps, "
        f"{figures['mean_samples_per_step']:.1f} samples per step, "
        f"{figures['min_micro_steps']}-{figures['max_micro_steps']} micro-steps per step, "
        f"padding {figures['padding_fraction']:.1%}",
    ]
    return "\n".join(lines), {**budget.to_dict(), "first_step": first.to_dict(), **figures, **extra}
