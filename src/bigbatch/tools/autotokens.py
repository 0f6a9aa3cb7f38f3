"""micro_batch_tokens for a memory budget, and the token plan `bigbatch plan` shows.

The memory probe (`bigbatch.tools.memory`) runs micro-batches of r rows of the dataset's longest
sample (packed rows when the run packs, `bigbatch.tools.micro_setting.longest_rows`) and fits
memory per padded token; any micro-batch of the same padded size is no bigger (shorter rows
attend over fewer positions), so `choose_micro_batch_tokens` picks rows x longest that fits the
budget: `bigbatch.tools.choice.choose_micro_batch` in tokens. `token_plan_report` shows what a
token run's global batches become: the first step's split and padding over an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bigbatch.choices import DEFAULT_OPTIMIZE, Optimize, Parallelism
from bigbatch.core.engine import LossFn
from bigbatch.data.sampler import GlobalBatchSampler
from bigbatch.planning import TokenBudget, TokenPlan, TokenUnit, plan_tokens, sample_lengths
from bigbatch.tools.choice import MicroBatchChoice, choose_micro_batch
from bigbatch.tools.memory import Batch
from bigbatch.tools.micro_setting import probe_rows, share_in_rows
from bigbatch.tools.projection import Agree, ShardUnits
from bigbatch.tools.rank_memory import Layout, format_rank_memory
from bigbatch.units import UsageError, format_bytes

if TYPE_CHECKING:
    from bigbatch.recipes import Recipe


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
) -> MicroBatchChoice:
    """Probe rows of row_tokens tokens and choose the padded tokens of a micro-batch.

    ``make_rows(r)`` gives r rows of the longest sample; the choice (`MicroBatchChoice.value`,
    in tokens) is the rows that fit ``memory_budget_bytes`` times row_tokens, at most
    max_micro_batch_tokens rounded down to whole rows (one row at least). Every other argument
    as for `bigbatch.tools.choice.choose_micro_batch`.

    Raises:
        ValueError: one row of the longest sample does not fit the budget (with the numbers).
    """
    whole_rows = isinstance(row_tokens, int) and row_tokens > 0  # else choose_micro_batch refuses
    return choose_micro_batch(
        model, loss_fn, make_rows, row_tokens=row_tokens,
        max_rows=max(1, max_micro_batch_tokens // row_tokens) if whole_rows else 1,
        memory_budget_bytes=memory_budget_bytes, optimize=optimize, optimizer=optimizer,
        device=device, headroom=headroom, layout=layout, agree=agree, shard_units=shard_units,
    )  # fmt: skip


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


def _probed(
    recipe: Recipe,
    lengths: np.ndarray,
    global_batch_tokens: int,
    world_size: int,
    packing: bool,
    parallelism: Parallelism,
    *,
    memory_budget: int | str,
    optimize: Optimize,
) -> MicroBatchChoice:
    """micro_batch_tokens of a recipe for a budget: rows of its longest sample, probed whole on
    this process, the budget one rank's of world_size under parallelism."""
    module = recipe.model.train()
    make_rows, longest = probe_rows(
        recipe.train_dataset,
        recipe.collate_fn,
        lengths=lengths,
        collate_packed=recipe.collate_packed if packing else None,
    )
    assert longest is not None
    return choose_micro_batch(
        module,
        recipe.loss_fn,
        make_rows,
        row_tokens=longest,
        max_rows=share_in_rows(global_batch_tokens, world_size, longest),
        memory_budget_bytes=memory_budget,
        optimize=optimize,
        optimizer=recipe.build_optimizer(module, lr=float(recipe.defaults.get("lr", 1e-3))),
        layout=Layout(parallelism, world_size, "auto"),
        shard_units=recipe.shard_units,
    )


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
        choice = _probed(recipe, lengths, global_batch_tokens, world_size, packing, parallelism,
                         memory_budget=memory_budget, optimize=optimize)  # fmt: skip
        micro_batch_tokens = choice.value
        lines.append(
            f"memory per padded token {format_bytes(choice.bytes_per_token or 0)} (fit over rows "
            f"of {choice.row_tokens} tokens); micro_batch_tokens {micro_batch_tokens}: "
            f"{choice.reason}"
        )
        if choice.rank_memory:  # in rows of the longest sample
            lines.append(format_rank_memory(choice.rank_memory, choice.memory_budget_bytes))
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
