"""The joint choice of activation checkpointing and micro-batch under one memory budget.

`choose_plan` probes each checkpointing candidate (``none``, ``every_2``, ``full``) with that
policy applied to the model in turn, through the one micro-batch chooser
(`bigbatch.tools.choice.choose_micro_batch`: per rank, both sync modes under FSDP2), and `pick`
chooses among the plans that fit: ``optimize: memory`` the fewest micro-steps (ties: the least
recompute), ``optimize: throughput`` the most measured items/s. The model is left checkpointed
as the chosen policy says.

Where memory is counted rather than read from an allocator (the CPU), the probe sees what
autograd saves; a checkpointed unit saves only its inputs, then recomputes its forward during its
backward, holding that forward's saved tensors while its backward makes their gradients.
`unit_recompute` measures the largest unit's saved tensors without checkpointing, and
`recompute_factor` times that is added to every candidate that checkpoints
(`bigbatch.tools.search.with_unseen`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from bigbatch.choices import DEFAULT_OPTIMIZE, Optimize, checkpoint_interval
from bigbatch.core import batches, sharding
from bigbatch.core.checkpointing import apply_activation_checkpointing, checkpointed_units
from bigbatch.core.engine import LossFn
from bigbatch.tools import memory
from bigbatch.tools.choice import MicroBatchChoice, choose_micro_batch
from bigbatch.tools.memory import Batch
from bigbatch.tools.search import MARGIN
from bigbatch.tools.step_memory import StepBytesCache
from bigbatch.units import UsageError, format_bytes

logger = logging.getLogger(__name__)

CANDIDATES: tuple[str, ...] = ("none", "every_2", "full")
"""The policies ``activation_checkpointing: auto`` compares, the least recompute first."""
RECOMPUTE_FACTOR = 1.25
"""While a checkpointed unit's backward runs, its recomputed saved tensors and the gradients
its backward makes are live: 1.1 to 1.3 x the unit's saved bytes on an 8-layer tinylm (CPU,
every allocation tracked), so 1.25 x. The saved tensors of the units after it that are not
checkpointed are freed by then (`recompute_factor`)."""


@dataclass(frozen=True)
class PlanCandidate:
    """One checkpointing policy under one sync mode, at the micro-batch it allows.

    Attributes:
        activation_checkpointing: the policy (``none``, ``every_2``, ``full``, ...).
        micro_batch_size: rows of the largest (memory) or fastest (throughput) micro-batch that
            fits the budget; 0 where none fits.
        micro_steps: micro-batches of a rank's share of the global batch; 0 where none fits.
        gradient_sync: the sync mode (FSDP2 over several ranks), else None.
        peak_bytes: predicted peak of one rank at micro_batch_size (0 where none fits).
        items_per_s: measured step throughput in the run's unit (samples or tokens): a rank's
            share over micro_steps x the best forward + backward time; None where not timed
            (``optimize: memory`` does not time plans).
        checkpointed_units: units the policy recomputes: the tie-break, fewer first.
        chosen_sync: this sync mode is the one the chooser picked for the policy.
        note: why nothing fits, where nothing does.
    """

    activation_checkpointing: str
    micro_batch_size: int
    micro_steps: int
    gradient_sync: str | None
    peak_bytes: float
    items_per_s: float | None
    checkpointed_units: int
    chosen_sync: bool = True
    note: str = ""

    @property
    def fits(self) -> bool:
        """A micro-batch of one row at least fits the budget."""
        return self.micro_batch_size >= 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able row for `bigbatch plan --json`."""
        return {
            "activation_checkpointing": self.activation_checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "micro_steps": self.micro_steps,
            "gradient_sync": self.gradient_sync,
            "predicted_peak_bytes": round(self.peak_bytes),
            "items_per_s": self.items_per_s,
            "checkpointed_units": self.checkpointed_units,
            **({"note": self.note} if self.note else {}),
        }


@dataclass(frozen=True)
class JointChoice:
    """The chosen checkpointing policy, its micro-batch choice, every candidate and why.

    Attributes:
        activation_checkpointing: the chosen policy.
        choice: the micro-batch choice of that policy (`MicroBatchChoice`).
        candidates: every policy x sync mode compared, the chosen policy's sync mode first per
            policy.
        reason: one sentence with the numbers.
        choices: every policy's micro-batch choice that fits, by policy (its probe predicts the
            memory of any micro-batch under that policy).
    """

    activation_checkpointing: str
    choice: MicroBatchChoice
    candidates: tuple[PlanCandidate, ...]
    reason: str
    choices: Mapping[str, MicroBatchChoice] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for `bigbatch plan --json`, the run's log and its report."""
        return {
            "activation_checkpointing": self.activation_checkpointing,
            "reason": self.reason,
            "candidates": [c.to_dict() for c in self.candidates],
            "micro_batch_choice": self.choice.to_dict(),
        }


def pick(candidates: Sequence[PlanCandidate], optimize: Optimize) -> tuple[PlanCandidate, str]:
    """The plan to run among the candidates of each policy's chosen sync mode, and why.

    ``memory``: the fewest micro-steps, ties to the fewest checkpointed units. ``throughput``:
    the most items/s; plans within `MARGIN` of the fastest count as equally fast (timing noise)
    and the one of them with the fewest checkpointed units wins.

    Raises:
        UsageError: no candidate fits.
    """
    fitting = [c for c in candidates if c.fits and c.chosen_sync]
    if not fitting:
        notes = "; ".join(f"{c.activation_checkpointing}: {c.note}" for c in candidates)
        raise UsageError(f"activation_checkpointing auto: no candidate fits the budget ({notes})")
    if optimize == "throughput" and all(c.items_per_s is not None for c in fitting):
        best = max(c.items_per_s or 0.0 for c in fitting)
        close = [c for c in fitting if (c.items_per_s or 0.0) * (1 + MARGIN) >= best]
        chosen = min(close, key=lambda c: (c.checkpointed_units, -(c.items_per_s or 0.0)))
        return chosen, (
            f"activation_checkpointing {chosen.activation_checkpointing}: "
            f"{chosen.items_per_s:.1f} items/s, within {MARGIN:.0%} of the fastest plan "
            f"({best:.1f} items/s) with the least recompute; {_others(fitting, chosen)}"
        )
    chosen = min(fitting, key=lambda c: (c.micro_steps, c.checkpointed_units))
    return chosen, (
        f"activation_checkpointing {chosen.activation_checkpointing}: the fewest micro-steps that "
        f"fit ({chosen.micro_steps}, micro_batch_size {chosen.micro_batch_size}) with the least "
        f"recompute; {_others(fitting, chosen)}"
    )


def _others(fitting: Sequence[PlanCandidate], chosen: PlanCandidate) -> str:
    """``none: 8 x 16 micro-steps, 12.0 items/s; ...`` for the other fitting candidates."""
    rows = []
    for c in fitting:
        if c is chosen:
            continue
        speed = "" if c.items_per_s is None else f", {c.items_per_s:.1f} items/s"
        rows.append(
            f"{c.activation_checkpointing}: micro_batch_size {c.micro_batch_size}, "
            f"{c.micro_steps} micro-steps{speed}"
        )
    return "; ".join(rows) or "no other candidate fits"


def unit_recompute(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    units: Sequence[torch.nn.Module],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[int], int]:
    """``recompute(rows)``: the bytes the largest unit's forward saves for backward at rows.

    Measured with one forward (no backward) per row count, under the probe's saved-tensor
    accounting, with the model's checkpointing taken off for the measurement and put back.
    """
    measured: dict[int, int] = {}
    held = [*module.parameters(), *module.buffers()]

    def recompute(rows: int) -> int:
        if rows not in measured:
            policy = [u for u in units if u in checkpointed_units(module)]
            apply_activation_checkpointing(module, "none", list(units))
            try:
                batch = batches.to_device(make_rows(rows), device)
                measured[rows] = _largest_unit_saved_bytes(
                    module, loss_fn, batch, units, held, device, autocast_dtype
                )
            finally:
                if policy:  # the same units checkpointed again
                    apply_activation_checkpointing(module, "full", policy)
        return measured[rows]

    return recompute


def _largest_unit_saved_bytes(
    module: torch.nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    units: Sequence[torch.nn.Module],
    held: list[torch.Tensor],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> int:
    """Bytes of the distinct storages each unit's forward saves for backward; the largest."""
    exclude = set(_keys(held))
    seen: dict[int, int] = {}
    started: dict[int, int] = {}
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _keys([tensor])[0]
        if key not in exclude:
            seen.setdefault(key, memory.tensor_bytes([tensor]))
        return tensor

    def before(unit: torch.nn.Module, *_: Any) -> None:
        started[id(unit)] = len(seen)

    def after(unit: torch.nn.Module, *_: Any) -> None:
        nonlocal largest
        keys = list(seen)[started.pop(id(unit)) :]  # storages first saved inside the unit
        largest = max(largest, sum(seen[k] for k in keys))

    handles = [h for u in units for h in (u.register_forward_pre_hook(before),
                                          u.register_forward_hook(after))]  # fmt: skip
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        hooks = saved_tensors_hooks(pack, lambda t: t)
        with memory.preserved_state(module, device), torch.enable_grad(), hooks, autocast:
            loss_fn(module, batch)  # the graph is dropped unused: no backward needed
    finally:
        for handle in handles:
            handle.remove()
    return largest


def _keys(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The storage address behind each tensor (a sharded tensor's local shard)."""
    return [sharding.local(t).untyped_storage().data_ptr() for t in tensors]


def choose_plan(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    *,
    max_rows: int,
    memory_budget_bytes: int | str | None,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    units: Sequence[torch.nn.Module] | None = None,
    policies: Sequence[str] = CANDIDATES,
    **choose: Any,
) -> JointChoice:
    """Probe every checkpointing policy's micro-batch, choose the plan (`pick`) and leave the
    model checkpointed as the chosen policy says.

    Each policy is applied to the model in place in turn
    (`bigbatch.core.checkpointing.apply_activation_checkpointing`, which replaces the one
    before) over ``units`` (None: the blocks FSDP2 shards); where memory is counted, the largest
    unit's recompute is added to the policies that checkpoint (`unit_recompute`). The other
    arguments (``row_tokens``, ``optimizer``, ``device``, ``layout``, ``shard_units``, ...) go
    to `bigbatch.tools.choice.choose_micro_batch` for every policy.

    Raises:
        UsageError: no policy fits the budget (the model is left without checkpointing).
    """
    units = list(units) if units is not None else sharding.default_shard_units(module)
    apply_activation_checkpointing(module, "none", units)
    device = memory.device_of(module, choose.get("device"))
    counted = device.type != "cuda"  # the CUDA allocator's peak holds the recompute already
    recompute = unit_recompute(
        module, loss_fn, make_rows, units, device=device,
        autocast_dtype=choose.get("autocast_dtype"),
    ) if counted else None  # fmt: skip
    candidates: list[PlanCandidate] = []
    choices: dict[str, MicroBatchChoice] = {}
    choose.setdefault("step_bytes_cache", StepBytesCache())  # one optimizer step, every policy
    try:
        for policy in policies:
            wrapped = apply_activation_checkpointing(module, policy, units)
            checkpointed = len(wrapped) if checkpoint_interval(policy) > 0 else 0  # not offload
            factor = recompute_factor(units, wrapped) if checkpointed else 0.0
            unseen = None
            if factor > 0 and recompute is not None:
                unseen = lambda rows, f=factor: round(f * recompute(rows))  # noqa: E731
            try:
                choice = choose_micro_batch(
                    module, loss_fn, make_rows, max_rows=max_rows,
                    memory_budget_bytes=memory_budget_bytes, optimize=optimize, unseen=unseen,
                    **choose,
                )  # fmt: skip
            except UsageError as error:  # one row does not fit this policy: others may
                candidates.append(
                    PlanCandidate(policy, 0, 0, None, 0.0, None, checkpointed, note=str(error))
                )
                continue
            choices[policy] = choice
            candidates += _candidates(policy, choice, max_rows, checkpointed)
    finally:
        apply_activation_checkpointing(module, "none", units)
    chosen, reason = pick(candidates, optimize)
    apply_activation_checkpointing(module, chosen.activation_checkpointing, units)
    logger.info("%s", reason)
    return JointChoice(
        chosen.activation_checkpointing, choices[chosen.activation_checkpointing],
        tuple(candidates), reason, choices,
    )  # fmt: skip


def recompute_factor(
    units: Sequence[torch.nn.Module], checkpointed: Sequence[torch.nn.Module]
) -> float:
    """Unit-sized saved tensors the peak gains over the counted ones when units recompute.

    Backward meets the last checkpointed unit first; the units after it (not checkpointed) have
    freed their saved tensors by then, about one unit's each. So `RECOMPUTE_FACTOR` minus their
    number, at least 0: ``full`` 1.25; ``every_2`` of 8 units (the last, unit 8, not
    checkpointed) 0.25.

    >>> blocks = [torch.nn.Linear(1, 1) for _ in range(8)]
    >>> recompute_factor(blocks, blocks), recompute_factor(blocks, blocks[::2])
    (1.25, 0.25)
    """
    ids = [id(u) for u in units]
    last = max(ids.index(id(u)) for u in checkpointed)
    return max(0.0, RECOMPUTE_FACTOR - (len(units) - 1 - last))


def _candidates(
    policy: str, choice: MicroBatchChoice, share: int, checkpointed: int
) -> list[PlanCandidate]:
    """One candidate per sync mode compared (one without a layout), the chosen mode first."""
    result = choice.probe
    seconds = {r.micro_batch_size: r.seconds for r in result.rows}
    per_item = choice.row_tokens or 1

    def items_per_s(rows: int) -> float | None:  # timed plans only (optimize throughput)
        if choice.optimize != "throughput" or not math.isfinite(seconds.get(rows, math.nan)):
            return None
        return share * per_item / (math.ceil(share / rows) * seconds[rows])

    if not choice.rank_memory:
        rows = choice.micro_batch_size
        peak = result.peak(rows)
        return [
            PlanCandidate(
                policy, rows, math.ceil(share / rows), None, peak, items_per_s(rows), checkpointed
            )
        ]
    candidates = []
    for index, (rows, rank) in enumerate(choice.rank_memory):
        sync = rank.layout.gradient_sync if rank.layout.sharded else None
        steps = math.ceil(share / rows) if rows else 0
        candidate = PlanCandidate(
            policy, rows, steps, sync, float(rank.total) if rows else 0.0,
            items_per_s(rows) if rows else None, checkpointed, chosen_sync=index == 0,
        )  # fmt: skip
        candidates.append(candidate if rows else replace(candidate, note="one row does not fit"))
    return candidates


def format_candidates(joint: JointChoice, memory_budget_bytes: int) -> str:
    """A table of every candidate: policy, sync mode, micro-batch, micro-steps, peak, items/s."""
    lines = [
        f"{'activation_checkpointing':>24}  {'gradient_sync':>17}  {'micro':>6}  "
        f"{'steps':>6}  {'peak':>10}  {'items/s':>10}",
    ]
    for c in joint.candidates:
        chosen = c.activation_checkpointing == joint.activation_checkpointing and c.chosen_sync
        peak = format_bytes(c.peak_bytes) if c.fits else "does not fit"
        speed = "-" if c.items_per_s is None else f"{c.items_per_s:.1f}"
        lines.append(
            f"{c.activation_checkpointing:>24}  {c.gradient_sync or '-':>17}  "
            f"{c.micro_batch_size:>6}  {c.micro_steps:>6}  {peak:>10}  {speed:>10}"
            + ("  <- chosen" if chosen else "")
        )
    lines.append(f"memory_budget {format_bytes(memory_budget_bytes)}; why: {joint.reason}")
    return "\n".join(lines)
