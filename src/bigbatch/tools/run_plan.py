"""The plan of a run as its config says: what `bigbatch plan CONFIG --set ...` prints.

`plan_run` takes the settings a training run would (the recipe, the global batch in samples or
tokens, the micro setting, the memory budget, optimize, the layout, activation checkpointing)
and returns the plan as text and as a JSON-able dict. With the micro setting ``auto`` it probes
the recipe's model as training does (`bigbatch.tools.micro_setting.probe_rows`) through the
joint choice (`bigbatch.tools.joint.choose_plan`): every checkpointing candidate with
``activation_checkpointing: auto``, else the one policy given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bigbatch.choices import GradientSync, Optimize, Parallelism
from bigbatch.planning import TokenBudget, plan, sample_lengths
from bigbatch.tools.autobatch import format_choice
from bigbatch.tools.joint import CANDIDATES, choose_plan, format_candidates
from bigbatch.tools.micro_setting import probe_rows, share_in_rows
from bigbatch.tools.rank_memory import Layout

if TYPE_CHECKING:
    from bigbatch.recipes import Recipe


@dataclass(frozen=True)
class RunSettings:
    """What a run's config says about its plan (the fields of the same names).

    ``global_batch_tokens`` set: a run in tokens (``micro`` is micro_batch_tokens), else in
    samples (``micro`` is micro_batch_size). ``micro`` ``"auto"``: probed; None: a rank's share.
    """

    world_size: int
    global_batch_size: int | None
    global_batch_tokens: int | None
    micro: int | str | None
    gradient_accumulation_steps: int | None
    packing: bool
    memory_budget: int | str | None
    optimize: Optimize
    parallelism: Parallelism
    gradient_sync: GradientSync
    activation_checkpointing: str


def plan_run(recipe: Recipe, settings: RunSettings, device: torch.device) -> tuple[str, dict]:
    """The plan of the run as text and as a dict; the micro setting probed when ``auto``.

    Raises:
        UsageError: a plan the settings do not allow, no memory_budget on a device without an
            allocator, or nothing that fits it (the message gives the numbers).
    """
    s = settings
    tokens = s.global_batch_tokens is not None
    lengths = sample_lengths(recipe.train_dataset, recipe.sample_length) if tokens else None
    result: dict[str, Any] = {}
    lines: list[str] = []
    micro = s.micro
    if micro == "auto":
        text, result, micro = _probed(recipe, s, device, lengths)
        lines.append(text)
    given = micro if isinstance(micro, int) else None
    if tokens:
        assert s.global_batch_tokens is not None and lengths is not None
        budget = TokenBudget(
            s.global_batch_tokens, s.world_size, given, s.packing, int(lengths.max())
        )
        lines.append(str(budget))
        result = {**budget.to_dict(), **result}
    else:
        assert s.global_batch_size is not None
        split = plan(
            s.global_batch_size, s.world_size, micro_batch_size=given,
            gradient_accumulation_steps=s.gradient_accumulation_steps,
        )  # fmt: skip
        lines.append(str(split))
        result = {**split.to_dict(), **result}
    if s.micro != "auto":
        result["activation_checkpointing"] = {"chosen": _given(s.activation_checkpointing)}
        lines.append(f"activation_checkpointing {_given(s.activation_checkpointing)}")
    return "\n".join(lines), result


def _given(policy: str) -> str:
    """auto needs a probed micro setting; with a given one it means none (as in training)."""
    return "none" if policy == "auto" else policy


def _probed(
    recipe: Recipe, s: RunSettings, device: torch.device, lengths: Any
) -> tuple[str, dict[str, Any], int]:
    """The joint choice for the recipe: text, dict and the micro setting in the run's unit."""
    module = recipe.model.to(device).train()
    optimizer = recipe.build_optimizer(module, lr=float(recipe.defaults.get("lr", 1e-3)))
    make_rows, row_tokens = probe_rows(
        recipe.train_dataset,
        recipe.collate_fn,
        lengths=lengths,
        collate_packed=recipe.collate_packed if s.packing else None,
    )
    share = s.global_batch_size if row_tokens is None else s.global_batch_tokens
    assert share is not None
    policies = CANDIDATES if s.activation_checkpointing == "auto" else (s.activation_checkpointing,)
    joint = choose_plan(
        module, recipe.loss_fn, make_rows,
        max_rows=share_in_rows(share, s.world_size, row_tokens),
        memory_budget_bytes=None if s.memory_budget == "auto" else s.memory_budget,
        optimize=s.optimize, units=recipe.shard_units(module) if recipe.shard_units else None,
        policies=policies, row_tokens=row_tokens, optimizer=optimizer, device=device,
        layout=Layout(s.parallelism, s.world_size, s.gradient_sync),
        shard_units=recipe.shard_units,
    )  # fmt: skip
    choice = joint.choice
    text = format_choice(choice) + "\n" + format_candidates(joint, choice.memory_budget_bytes)
    described = joint.to_dict()
    result = {
        "micro_batch_choice": described.pop("micro_batch_choice"),
        "activation_checkpointing": {"chosen": described.pop("activation_checkpointing")}
        | described,
    }
    return text, result, choice.value
