"""The micro-batch for a memory budget: chosen from `bigbatch.tools.memory` probes, then planned.

`choose_micro_batch_size` picks the largest micro-batch whose measured memory x (1 + headroom)
fits the budget, or the fastest feasible one; the chosen size is always a measured row. Given a
`Layout` (DDP or FSDP2 over N ranks), the measurement is carried over to what one rank holds
(`bigbatch.tools.rank_memory`), and under FSDP2 with ``gradient_sync="auto"`` the sync mode is
chosen with it. `plan_for_budget` does it for a recipe and plans the global batch;
`format_choice` prints why.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from bigbatch.choices import DEFAULT_OPTIMIZE, OPTIMIZE_GOALS, Optimize
from bigbatch.core import batches, distributed, sharding
from bigbatch.core.engine import LossFn
from bigbatch.data.loader import first_samples
from bigbatch.planning import Plan, plan
from bigbatch.tools import memory
from bigbatch.tools.memory import Batch, MemoryProbe, device_of, merge_probes, probe, tensor_bytes
from bigbatch.tools.rank_memory import (
    Layout,
    RankMemory,
    format_rank_memory,
    layouts,
    model_sizes,
    rank_memory,
)
from bigbatch.units import UsageError, UsageTypeError, format_bytes, parse_memory_size

if TYPE_CHECKING:
    from bigbatch.choices import Parallelism

ShardUnits = Callable[[torch.nn.Module], list[torch.nn.Module]]
Agree = Callable[[list[float]], list[float]]
"""Reduces measurements over ranks (e.g. an all-reduce MAX) so that every rank decides alike."""

logger = logging.getLogger(__name__)


_FIRST_SIZES = 4  # probe 1, 2, 4, 8 first: cheap, and enough for a straight line
_CONFIRM_TRIES = 3
_ROUNDS = 3  # interleaved timing rounds per stage (throughput), on top of the probe's own
_MARGIN = 0.03  # a smaller plan must be this much faster than a larger one to be chosen


@dataclass(frozen=True)
class MicroBatchChoice:
    """The chosen micro-batch and why.

    Attributes:
        micro_batch_size: the chosen size.
        probe: the measurements it was chosen from.
        memory_budget_bytes: the budget it had to fit.
        optimize: ``"memory"`` (largest that fits) or ``"throughput"`` (fastest that fits).
        reason: one sentence with the numbers.
        headroom: the fraction of the prediction kept free.
        gradient_sync: the sync mode the choice is for (FSDP2 over several ranks), else None.
        rank_memory: per layout compared, the largest micro-batch that fits (0: none) and one
            rank's memory there; the chosen layout first. Empty without a layout.
    """

    micro_batch_size: int
    probe: MemoryProbe
    memory_budget_bytes: int
    optimize: str
    reason: str
    headroom: float = 0.1
    gradient_sync: str | None = None
    rank_memory: tuple[tuple[int, RankMemory], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for the run's log and report."""
        return {
            "gradient_sync": self.gradient_sync,
            "rank_memory": [
                {"micro_batch_size": micro, **memory.to_dict()}
                for micro, memory in self.rank_memory
            ],
            "micro_batch_size": self.micro_batch_size,
            "memory_budget_bytes": self.memory_budget_bytes,
            "optimize": self.optimize,
            "headroom": self.headroom,
            "reason": self.reason,
            "device_type": self.probe.device_type,
            "method": self.probe.method,
            "fixed_bytes": self.probe.fixed_bytes,
            "bytes_per_sample": self.probe.bytes_per_sample,
            "fit_relative_error": self.probe.fit_relative_error,
            "rows": [vars(row) for row in self.probe.rows],
        }


def _probe_more(
    result: MemoryProbe, sizes: list[int], measure: Callable[[list[int]], MemoryProbe]
) -> MemoryProbe:
    """Probe more sizes and merge; an out-of-memory at the first of them is recorded too."""
    try:
        return merge_probes(result, measure(sizes))
    except torch.OutOfMemoryError:
        failed = sizes[0]
    logger.warning("memory probe: micro_batch_size %d ran out of memory", failed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    smallest = min(failed, result.oom_micro_batch_size or failed)
    return replace(result, oom_micro_batch_size=smallest)


def _largest_measured(
    result: MemoryProbe,
    limit: float,
    max_size: int,
    measure: Callable[[list[int]], MemoryProbe],
) -> tuple[MemoryProbe, int]:
    """The largest size predicted to fit, measured; backs off while the measurement is over."""
    chosen = max(1, result.largest_fitting(limit, max_size))
    for _ in range(_CONFIRM_TRIES):
        if chosen not in {row.micro_batch_size for row in result.rows}:
            result = _probe_more(result, [chosen], measure)
        row = {row.micro_batch_size: row for row in result.rows}.get(chosen)
        if row is not None and row.memory_bytes <= limit:
            break
        fits = max(r.micro_batch_size for r in result.rows if r.memory_bytes <= limit)
        bisect = chosen - 1 if row is not None else (fits + chosen) // 2  # None: out of memory
        chosen = max(fits, min(bisect, result.largest_fitting(limit, max_size)))
    fitting = [r.micro_batch_size for r in result.rows if r.memory_bytes <= limit]
    return result, chosen if chosen in fitting else max(fitting)


def _timed(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    sizes: list[int],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[int, float]:
    """Best forward + backward seconds per size over `_ROUNDS` interleaved rounds.

    Interleaved, a burst of load on a shared machine hits every size; the best time is the least
    disturbed. On a CPU with one torch thread the clock is this thread's CPU time (time the OS
    gives other processes is no size's cost), else wall-clock time."""
    one_cpu_thread = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if one_cpu_thread else time.perf_counter
    data = {size: batches.to_device(make_batch(size), device) for size in sizes}
    run = dict(exclude=set(), count=False, autocast_dtype=autocast_dtype, device_type=device.type)
    best = dict.fromkeys(sizes, math.inf)
    with memory.preserved_state(module, device):
        for _, size in itertools.product(range(_ROUNDS), sizes):
            memory.synchronize(device)
            start = clock()
            memory.forward_backward(module, loss_fn, data[size], **run)  # type: ignore[arg-type]
            memory.synchronize(device)
            best[size] = min(best[size], clock() - start)
    return best


def _fastest(
    result: MemoryProbe,
    largest: int,
    share: int,
    limit: float,
    measure: Callable[[list[int], int], MemoryProbe],
    time_sizes: Callable[[list[int]], dict[int, float]],
) -> tuple[MemoryProbe, int, str]:
    """The plan with the best step throughput among powers of two and the plans around the choice.

    A step of the rank's `share` samples at plan size m runs ceil(share / m) micro-batches: its
    time is ceil(share / m) x the best forward + backward time of m, so per-micro-batch overheads
    count. The largest plan within `_MARGIN` of the fastest wins: more timing noise than that.
    """
    seconds, fits = {r.micro_batch_size: r.seconds for r in result.rows}, set[int]()

    def timed(sizes: list[int]) -> None:  # probe memory of new sizes, then time the fitting
        nonlocal result
        if new := [s for s in sizes if s not in seconds]:
            result = _probe_more(result, new, lambda sizes: measure(sizes, 1))
            seconds.update({r.micro_batch_size: r.seconds for r in result.rows} | seconds)
        fits.update(r.micro_batch_size for r in result.rows if r.memory_bytes <= limit)
        for size, best in time_sizes([s for s in sizes if s in fits]).items():
            seconds[size] = min(seconds[size], best)

    def step_s(size: int) -> float:
        return math.ceil(share / size) * seconds[size]

    def plan_size(size: int) -> int:  # plan() spreads evenly: 138 on 256 runs as 2 x 128
        return math.ceil(share / math.ceil(share / size))

    def choose() -> tuple[int, list[int], float]:  # the largest plan within the margin
        plans = [s for s in fits if s == plan_size(s) and s <= largest]
        fastest = min(step_s(s) for s in plans)
        return max(s for s in plans if step_s(s) <= (1 + _MARGIN) * fastest), plans, fastest

    timed(sorted({plan_size(s) for s in _geometric(1, largest)}))
    best = choose()[0]  # then time it again with the plans around it, interleaved
    timed(sorted({plan_size(max(1, min(largest, round(best * f)))) for f in (0.71, 1, 1.41)}))
    chosen, plans, fastest = choose()
    rows = [replace(r, seconds=seconds[r.micro_batch_size]) for r in result.rows]
    rows = [replace(r, samples_per_s=r.micro_batch_size / max(r.seconds, 1e-9)) for r in rows]
    result = replace(result, rows=rows)
    reason = (
        f"best step throughput {share / step_s(chosen):.1f} samples/s, "
        f"{math.ceil(share / chosen)} micro-batches x {seconds[chosen] * 1e3:.3g} ms for the "
        f"rank's {share} samples: the largest of {len(plans)} plans timed within {_MARGIN:.0%} "
        f"of the fastest ({share / fastest:.1f} samples/s; largest that fits: {largest})"
    )
    return result, chosen, reason


def _geometric(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop, and stop itself."""
    count = max(0, math.ceil(math.log2(stop / start)))  # exact for powers of two
    return [start * 2**i for i in range(count)] + [stop]


def _resolve_budget(
    memory_budget: int | str | None,
    device: torch.device,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """The budget in bytes; on CUDA by default 90% of free memory plus what the model holds."""
    if memory_budget is not None:
        return parse_memory_size(memory_budget)
    if device.type != "cuda":
        raise UsageError(
            f"memory_budget is required on {device.type}: there is no allocator to ask for free "
            "memory; set memory_budget to what one rank may use, e.g. memory_budget: 8GiB"
        )
    free, _ = torch.cuda.mem_get_info(device)
    # What the model already holds on the device is not free, but the prediction counts it.
    held = [*module.parameters(), *module.buffers()]
    held += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        held += [v for state in optimizer.state.values() for v in state.values()]
    resident = tensor_bytes([t for t in held if isinstance(t, torch.Tensor) and t.is_cuda])
    budget = int(0.9 * (free + resident))
    sizes = (format_bytes(budget), format_bytes(free), format_bytes(resident))
    logger.info("memory_budget %s = 90%% of (free %s + held by the model %s) on %s", *sizes, device)
    return budget


class _Projection:
    """From what the probe measures to what one rank holds, per layout compared.

    ``offsets[sync]`` is added to a measured (or fitted) memory to give one rank's: the probe
    counts the model as it is (whole, or this rank's shards), the layout says what a rank holds.
    Without a layout (or on one process) the only key is None and the offset 0.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        layout: Layout | None,
        shard_units: ShardUnits | None,
        device: torch.device,
        agree: Agree | None,
    ) -> None:
        self.layouts: dict[str | None, Layout] = {}
        if layout is not None and layout.world_size > 1:
            compared = layouts(layout.parallelism, layout.world_size)
            if layout.sharded and layout.gradient_sync != "auto":
                compared = [layout]
            self.layouts = {(c.gradient_sync if c.sharded else None): c for c in compared}
        self.model_bytes = float(memory.model_state_bytes(module, optimizer))
        if agree is not None:  # the fullest rank's, as the agreed measurements are
            self.model_bytes = agree([self.model_bytes])[0]
        self.sizes = model_sizes(module, optimizer, shard_units) if self.layouts else None
        # The CUDA allocator's peak of a sharded model holds the all-gathered units already.
        self.in_flight_measured = device.type == "cuda" and sharding.is_fsdp(module)
        self.offsets: dict[str | None, float] = {
            key: self.rank_memory(key, self.model_bytes).total - self.model_bytes
            for key in self.layouts
        } or {None: 0.0}

    def rank_memory(self, key: str | None, measured_bytes: float) -> RankMemory:
        """One rank's memory for a layout, from a measured (or fitted) probe memory."""
        assert self.sizes is not None
        return rank_memory(
            self.sizes,
            self.layouts[key],
            measured_bytes - self.model_bytes,
            in_flight_measured=self.in_flight_measured,
        )

    def per_rank(self, key: str | None) -> str:
        return " per rank" if key in self.layouts else ""


def _too_small(result: MemoryProbe, budget: int, headroom: float, projection: _Projection) -> str:
    key = min(projection.offsets, key=lambda k: projection.offsets[k])
    offset = projection.offsets[key]
    needs = max(result.predict(1), result.rows[0].memory_bytes) + offset
    needed = format_bytes(needs * (1 + headroom))
    where = f" ({projection.layouts[key].describe()})" if key in projection.layouts else ""
    return (
        f"memory_budget {format_bytes(budget)} is below the {format_bytes(needs)}{where} that "
        f"micro_batch_size 1 needs (model and optimizer {format_bytes(result.fixed_bytes + offset)}"
        f" + {format_bytes(result.bytes_per_sample)} per sample), {needed} with headroom "
        f"{headroom:.0%}; raise memory_budget to at least {needed}, lower headroom, or use a "
        "smaller model, a lighter optimizer, bf16 or more ranks with parallelism fsdp"
    )


def _agreed(result: MemoryProbe, agree: Agree | None) -> MemoryProbe:
    """The probe with every rank's largest memory and slowest time per row (refitted)."""
    if agree is None:
        return result
    count = len(result.rows)
    values = agree(
        [float(r.memory_bytes) for r in result.rows]
        + [r.seconds for r in result.rows]
        + [float(result.model_bytes)]
    )
    rows = [
        replace(row, memory_bytes=int(values[i]), seconds=values[count + i])
        for i, row in enumerate(result.rows)
    ]
    rows = [replace(r, samples_per_s=r.micro_batch_size / max(r.seconds, 1e-9)) for r in rows]
    model_bytes = int(values[-1])  # the fullest rank's, as the rows are
    intercept, slope, error = memory.fit_rows(rows, model_bytes)
    return replace(
        result,
        rows=rows,
        fixed_bytes=intercept,
        bytes_per_sample=slope,
        fit_relative_error=error,
        model_bytes=model_bytes,
    )


def _largest_per_mode(
    result: MemoryProbe,
    limit: float,
    max_size: int,
    measure: Callable[[list[int]], MemoryProbe],
    offsets: Mapping[str | None, float],
) -> tuple[MemoryProbe, dict[str | None, int]]:
    """Per sync mode (the roomiest first, so its probes serve the next), the largest size that
    fits; a mode where micro_batch_size 1 does not fit is left out."""
    fits: dict[str | None, int] = {}
    for key in sorted(offsets, key=lambda k: offsets[k]):
        if result.rows[0].memory_bytes + offsets[key] > limit:
            continue
        result, fits[key] = _largest_measured(result, limit - offsets[key], max_size, measure)
    return result, fits


def _choose_sync(
    fits: Mapping[str | None, int], share: int, projection: _Projection
) -> tuple[str | None, str]:
    """``auto`` under FSDP2: step_end when the unsharded gradient fits beside a micro-batch that
    needs no more micro-steps than every_micro_batch's; else every_micro_batch."""
    if len(projection.offsets) == 1:
        return next(iter(fits)), ""
    assert projection.sizes is not None
    gradient = format_bytes(projection.sizes.gradient_bytes)
    every = fits["every_micro_batch"]
    steps_every = math.ceil(share / every)
    if "step_end" not in fits:
        return "every_micro_batch", (
            f"gradient_sync every_micro_batch: the unsharded gradient ({gradient}) does not fit "
            "beside micro_batch_size 1"
        )
    steps_end = math.ceil(share / fits["step_end"])
    if steps_end <= steps_every:
        return "step_end", (
            f"gradient_sync step_end: the unsharded gradient ({gradient}) fits beside "
            f"micro_batch_size {fits['step_end']} ({steps_end} micro-steps, one gradient "
            "reduce-scatter per step)"
        )
    return "every_micro_batch", (
        f"gradient_sync every_micro_batch: beside the unsharded gradient ({gradient}) only "
        f"micro_batch_size {fits['step_end']} fits, {steps_end} micro-steps instead of "
        f"{steps_every}"
    )


def choose_micro_batch_size(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    *,
    max_micro_batch_size: int,
    memory_budget_bytes: int | str | None,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    repetitions: int = 2,
    autocast_dtype: torch.dtype | None = None,
    layout: Layout | None = None,
    shard_units: ShardUnits | None = None,
    agree: Agree | None = None,
) -> MicroBatchChoice:
    """Probe a few sizes and choose the micro-batch for a memory budget.

    With ``optimize="memory"`` the largest size whose predicted memory x (1 + headroom) fits the
    budget; it is then measured, and the choice backs off if the measurement does not fit. With
    ``"throughput"`` the plans (micro-batch counts) at powers of two up to that size and around
    the fastest are timed, per step of the rank's max_micro_batch_size samples, in interleaved
    rounds; the largest plan within 3% of the fastest wins. Never above max_micro_batch_size
    (the rank's share of the global batch).

    ``layout`` (`bigbatch.tools.rank_memory`; None: one process) makes the budget one rank's;
    under FSDP2 with ``gradient_sync="auto"`` both sync modes are compared and one is chosen.
    ``shard_units``: the units FSDP2 would shard, for an unsharded model planned for FSDP2.
    ``agree`` reduces measurements over ranks: a sharded model is probed by every rank in
    lockstep (each forward all-gathers), so every rank must decide alike.

    Raises:
        ValueError: no budget on a device without an allocator, or micro_batch_size 1 does not
            fit the budget (the message gives the numbers).
    """
    max_size = max_micro_batch_size
    _check_choice_arguments(max_size, optimize, headroom)
    module = distributed.unwrap(model)
    device = device_of(module, device)
    budget = _resolve_budget(memory_budget_bytes, device, module, optimizer)
    limit = budget / (1 + headroom)
    projection = _Projection(module, optimizer, layout, shard_units, device, agree)

    measure, time_sizes = _measurers(
        module, loss_fn, make_batch, optimizer, device, repetitions, autocast_dtype, agree
    )
    result = measure(_geometric(1, min(max_size, 2 ** (_FIRST_SIZES - 1))))
    room = limit - min(projection.offsets.values())
    if result.rows[0].micro_batch_size != 1 or result.rows[0].memory_bytes > room:
        raise UsageError(_too_small(result, budget, headroom, projection))
    result, fits = _largest_per_mode(result, limit, max_size, measure, projection.offsets)
    sync, sync_reason = _choose_sync(fits, max_size, projection)
    chosen, offset = fits[sync], projection.offsets[sync]
    if optimize == "throughput":
        result, chosen, reason = _fastest(
            result, chosen, max_size, limit - offset, measure, time_sizes
        )
    else:
        reason = _memory_reason(result, chosen, max_size, offset, headroom)
    row = {r.micro_batch_size: r for r in result.rows}[chosen]
    predicted = row.memory_bytes + offset
    reason += (
        f"; measured {format_bytes(predicted)}{projection.per_rank(sync)} x (1 + headroom "
        f"{headroom:.0%}) = {format_bytes(predicted * (1 + headroom))} <= memory_budget "
        f"{format_bytes(budget)}"
    )
    reason += f"; {sync_reason}" if sync_reason else ""
    logger.info("micro_batch_size %d: %s", chosen, reason)
    return MicroBatchChoice(
        chosen, result, budget, optimize, reason, float(headroom),
        gradient_sync=sync if sync in projection.layouts else None,
        rank_memory=_compared(result, projection, fits, sync, chosen),
    )  # fmt: skip


def _measurers(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    repetitions: int,
    autocast_dtype: torch.dtype | None,
    agree: Agree | None,
) -> tuple[Callable[..., MemoryProbe], Callable[[list[int]], dict[int, float]]]:
    """``measure(sizes, repeat)``: a probe of these sizes; ``time_sizes(sizes)``: their best
    forward + backward seconds; both agreed over ranks when ``agree`` is given."""

    def measure(sizes: list[int], repeat: int = repetitions) -> MemoryProbe:
        return _agreed(probe(
            module, loss_fn, make_batch, sizes, optimizer=optimizer, device=device,
            repetitions=repeat, autocast_dtype=autocast_dtype,
        ), agree)  # fmt: skip

    def time_sizes(sizes: list[int]) -> dict[int, float]:
        best = _timed(
            module, loss_fn, make_batch, sizes, device=device, autocast_dtype=autocast_dtype
        )
        return best if agree is None else dict(zip(best, agree(list(best.values()))))

    return measure, time_sizes


def _memory_reason(
    result: MemoryProbe, chosen: int, max_size: int, offset: float, headroom: float
) -> str:
    """Why the largest size that fits is this one (optimize memory)."""
    if chosen == max_size:
        return f"capped by max_micro_batch_size {max_size} (the rank's share of the global batch)"
    needs = format_bytes((result.predict(chosen + 1) + offset) * (1 + headroom))
    return f"the largest micro_batch_size that fits; {chosen + 1} would need {needs}"


def _compared(
    result: MemoryProbe,
    projection: _Projection,
    fits: Mapping[str | None, int],
    chosen_sync: str | None,
    chosen: int,
) -> tuple[tuple[int, RankMemory], ...]:
    """Per layout compared: its largest micro-batch (the chosen one for the chosen layout) and
    one rank's memory there; a layout where nothing fits at micro_batch_size 1."""
    if not projection.layouts:
        return ()
    rows = {r.micro_batch_size: r.memory_bytes for r in result.rows}
    compared = []
    for key in sorted(projection.layouts, key=lambda k: (k != chosen_sync, str(k))):
        micro = chosen if key == chosen_sync else fits.get(key, 0)
        measured = rows.get(max(micro, 1), result.predict(max(micro, 1)))
        compared.append((micro, projection.rank_memory(key, measured)))
    return tuple(compared)


def _check_choice_arguments(max_size: object, optimize: object, headroom: object) -> None:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_micro_batch_size must be a positive integer, got {max_size!r}")
    if optimize not in OPTIMIZE_GOALS:
        raise ValueError(f"optimize must be one of {', '.join(OPTIMIZE_GOALS)}, got {optimize!r}")
    if not (isinstance(headroom, (int, float)) and 0 <= headroom < 10):
        raise ValueError(f"headroom must be a fraction >= 0 such as 0.1, got {headroom!r}")


def plan_for_budget(
    recipe_spec: str,
    global_batch_size: int,
    *,
    world_size: int = 1,
    memory_budget: int | str,
    optimize: Optimize = DEFAULT_OPTIMIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    recipe_options: Mapping[str, Any] | None = None,
    parallelism: Parallelism = "ddp",
) -> tuple[MicroBatchChoice, Plan]:
    """Build a recipe, choose its micro-batch for the budget and plan the global batch.

    The micro-batch is capped at a rank's share, ceil(global_batch_size / world_size); the device
    defaults to CUDA when available. The recipe's model is probed whole on this one process, and
    the budget is one rank's of `world_size` under `parallelism` (FSDP2: both sync modes
    compared, with the recipe's shard units).
    """
    from bigbatch import recipes  # recipes import the engine; keep this module light to import

    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise UsageTypeError(
            f"global_batch_size must be a positive integer, got {global_batch_size!r}"
        )
    if global_batch_size < 1 or world_size < 1 or world_size > global_batch_size:
        raise UsageError(
            f"global_batch_size {global_batch_size} and world_size {world_size} must be positive "
            "with world_size <= global_batch_size"
        )
    config = {"seed": seed, "recipe_options": dict(recipe_options or {})}
    recipe = recipes.build(recipe_spec, config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = recipe.model.to(device).train()
    choice = choose_micro_batch_size(
        module,
        recipe.loss_fn,
        first_samples(recipe.train_dataset, recipe.collate_fn),
        max_micro_batch_size=math.ceil(global_batch_size / world_size),
        memory_budget_bytes=memory_budget,
        optimize=optimize,
        optimizer=recipe.build_optimizer(module, lr=float(recipe.defaults.get("lr", 1e-3))),
        device=device,
        headroom=headroom,
        layout=Layout(parallelism, world_size, "auto"),
        shard_units=recipe.shard_units,
    )
    return choice, plan(global_batch_size, world_size, micro_batch_size=choice.micro_batch_size)


def format_choice(choice: MicroBatchChoice, plan: Plan | None = None) -> str:
    """The probe table (size, memory, predicted, samples/s), the choice and why, and the plan."""
    result = choice.probe
    # Per rank: what the chosen layout's rank holds at each measured size.
    offset = choice.rank_memory[0][1].state - result.model_bytes if choice.rank_memory else None
    lines = [
        f"memory probe on {result.device_type} ({result.method}"
        f"{', sharded: this rank' if result.sharded else ''}):",
        f"{'micro_batch_size':>16}  {'memory':>10}  {'fit':>10}  {'samples/s':>10}"
        + ("" if offset is None else f"  {'per rank':>10}"),
    ]
    for row in result.rows:
        mark = "  <- chosen" if row.micro_batch_size == choice.micro_batch_size else ""
        per_rank = "" if offset is None else f"  {format_bytes(row.memory_bytes + offset):>10}"
        lines.append(
            f"{row.micro_batch_size:>16}  {format_bytes(row.memory_bytes):>10}  "
            f"{format_bytes(result.predict(row.micro_batch_size)):>10}  "
            f"{row.samples_per_s:>10.1f}{per_rank}{mark}"
        )
    if result.oom_micro_batch_size is not None:
        lines.append(f"{result.oom_micro_batch_size:>16}  out of memory")
    lines += [
        f"fit: memory(n) = {format_bytes(result.fixed_bytes)} + "
        f"{format_bytes(result.bytes_per_sample)} x n "
        f"(largest relative error {result.fit_relative_error:.2%})",
        f"memory_budget {format_bytes(choice.memory_budget_bytes)}"
        f"{' per rank' if choice.rank_memory else ''}, "
        f"headroom {choice.headroom:.0%}, optimize {choice.optimize}: "
        f"micro_batch_size {choice.micro_batch_size}"
        + (f", gradient_sync {choice.gradient_sync}" if choice.gradient_sync else ""),
        f"why: {choice.reason}",
    ]
    if choice.rank_memory:
        lines.append(format_rank_memory(choice.rank_memory, choice.memory_budget_bytes))
    if plan is not None:
        lines.append(str(plan))
    return "\n".join(lines)
