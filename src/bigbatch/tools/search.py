"""The search over micro-batch rows: the largest that fits, per sync mode, or the fastest plan.

Every size it returns was measured (`bigbatch.tools.memory.probe`); predictions only say which
size to measure next. `largest_per_mode` finds the largest rows that fit under each sync mode
compared, `choose_sync` picks the mode, `fastest` times the plans that fit (optimize
throughput). The unit (samples or tokens) is the caller's: here a micro-batch is rows.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from bigbatch.core import batches
from bigbatch.core.engine import LossFn
from bigbatch.tools import memory
from bigbatch.tools.memory import Batch, MemoryProbe, merge_probes, probe
from bigbatch.tools.projection import Agree, Projection, agreed
from bigbatch.tools.step_memory import StepBytesCache
from bigbatch.units import format_bytes

logger = logging.getLogger(__name__)

FIRST_SIZES = 4  # probe 1, 2, 4, 8 first: cheap, and enough for a straight line
_CONFIRM_TRIES = 3
_GROW_TRIES = 3  # sizes measured above the largest that fits, while the secant says more fits
_ROUNDS = 3  # interleaved timing rounds per stage (throughput), on top of the probe's own
MARGIN = 0.03  # a smaller plan must be this much faster than a larger one to be chosen

Measure = Callable[..., MemoryProbe]
"""``measure(sizes, repeat=...)``: a probe of these sizes, agreed over ranks."""
TimeSizes = Callable[[list[int]], dict[int, float]]
"""``time_sizes(sizes)``: the best forward + backward seconds of each size."""
Unseen = Callable[[int], int]
"""``unseen(rows)``: bytes a probe's accounting misses at this many rows (a checkpointed unit's
recompute, `bigbatch.tools.joint`), added to its measurement."""


def geometric(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop, and stop itself."""
    count = max(0, math.ceil(math.log2(stop / start)))  # exact for powers of two
    return [start * 2**i for i in range(count)] + [stop]


def probe_more(
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


def largest_measured(
    result: MemoryProbe,
    limit: float,
    max_size: int,
    measure: Callable[[list[int]], MemoryProbe],
) -> tuple[MemoryProbe, int]:
    """The largest size predicted to fit, measured: backs off while the measurement is over,
    then grows while the measurements around it say more fits (`_grown`)."""
    chosen = max(1, result.largest_fitting(limit, max_size))
    for _ in range(_CONFIRM_TRIES):
        if chosen not in {row.micro_batch_size for row in result.rows}:
            result = probe_more(result, [chosen], measure)
        row = {row.micro_batch_size: row for row in result.rows}.get(chosen)
        if row is not None and row.memory_bytes <= limit:
            break
        fits = max(r.micro_batch_size for r in result.rows if r.memory_bytes <= limit)
        bisect = chosen - 1 if row is not None else (fits + chosen) // 2  # None: out of memory
        chosen = max(fits, min(bisect, result.largest_fitting(limit, max_size)))
    for _ in range(_GROW_TRIES):
        grown = _grown(result, limit, max_size)
        if grown is None:
            break
        result = probe_more(result, [grown], measure)
    fitting = [r.micro_batch_size for r in result.rows if r.memory_bytes <= limit]
    return result, max(fitting)


def _grown(result: MemoryProbe, limit: float, max_size: int) -> int | None:
    """A larger size to measure than the largest measured one that fits, or None.

    The least-squares line over every row is pulled by the small sizes, so where memory is not
    a straight line (a workspace that stops growing, the allocator's rounding) it can stop short
    (issue 25: 16 where 17 fits). The next size follows the secant through the largest fitting
    measurement and its nearest measured neighbour (the smallest over the limit, else the next
    smaller), below any size measured over the limit or out of memory. A straight line gives
    the size already measured, so a probe that fits the fit measures nothing more.
    """
    rows = {r.micro_batch_size: r.memory_bytes for r in result.rows}
    low = max(size for size, used in rows.items() if used <= limit)
    over = [size for size, used in rows.items() if used > limit]
    oom = result.oom_micro_batch_size
    ceiling = min([max_size + 1, *over, *([oom] if oom is not None else [])]) - 1
    smaller = [size for size in rows if size < low]
    if low >= ceiling or not (over or smaller):
        return None
    other = min(over) if over else max(smaller)
    slope = (rows[other] - rows[low]) / (other - low)
    grown = ceiling if slope <= 0 else low + math.floor((limit - rows[low]) / slope)
    if oom is not None and ceiling == oom - 1:  # nothing measured up there: halve the gap
        grown = min(grown, (low + ceiling + 1) // 2)
    grown = min(grown, ceiling)
    return grown if grown > low and grown not in rows else None


def largest_per_mode(
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
        if result.peak(result.rows[0].micro_batch_size) + offsets[key] > limit:
            continue
        result, fits[key] = largest_measured(result, limit - offsets[key], max_size, measure)
    return result, fits


def choose_sync(
    fits: Mapping[str | None, int], share: int, projection: Projection
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


def _timed(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
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
    data = {size: batches.to_device(make_rows(size), device) for size in sizes}
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


def measurers(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_rows: Callable[[int], Batch],
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    repetitions: int,
    autocast_dtype: torch.dtype | None,
    agree: Agree | None,
    unseen: Unseen | None = None,
    step_bytes_cache: StepBytesCache | None = None,
) -> tuple[Measure, TimeSizes]:
    """``measure(sizes, repeat)``: a probe of these sizes, plus ``unseen(rows)`` bytes per row
    where given; ``time_sizes(sizes)``: their best forward + backward seconds; both agreed over
    ranks when ``agree`` is given. Every probe measures the optimizer step through one cache
    (``step_bytes_cache``, a new one if None): once."""
    cache = step_bytes_cache if step_bytes_cache is not None else StepBytesCache()

    def measure(sizes: list[int], repeat: int = repetitions) -> MemoryProbe:
        result = probe(
            module, loss_fn, make_rows, sizes, optimizer=optimizer, device=device,
            repetitions=repeat, autocast_dtype=autocast_dtype, step_bytes_cache=cache,
        )  # fmt: skip
        return agreed(result if unseen is None else with_unseen(result, unseen), agree)

    def time_sizes(sizes: list[int]) -> dict[int, float]:
        best = _timed(
            module, loss_fn, make_rows, sizes, device=device, autocast_dtype=autocast_dtype
        )
        return best if agree is None else dict(zip(best, agree(list(best.values()))))

    return measure, time_sizes


def with_unseen(result: MemoryProbe, unseen: Unseen) -> MemoryProbe:
    """The probe with ``unseen(rows)`` bytes added to each row's memory, refitted."""
    rows = [
        replace(row, memory_bytes=row.memory_bytes + unseen(row.micro_batch_size))
        for row in result.rows
    ]
    intercept, slope, error = memory.fit_rows(rows, result.model_bytes)
    return replace(
        result, rows=rows, fixed_bytes=intercept, bytes_per_sample=slope, fit_relative_error=error
    )


def fastest(
    result: MemoryProbe,
    largest: int,
    share: int,
    limit: float,
    measure: Measure,
    time_sizes: TimeSizes,
) -> tuple[MemoryProbe, int, str]:
    """The plan with the best step throughput among powers of two and the plans around the choice.

    A step of the rank's `share` samples at plan size m runs ceil(share / m) micro-batches: its
    time is ceil(share / m) x the best forward + backward time of m, so per-micro-batch overheads
    count. The largest plan within `MARGIN` of the fastest wins: more timing noise than that.
    """
    seconds, fits = {r.micro_batch_size: r.seconds for r in result.rows}, set[int]()

    def timed(sizes: list[int]) -> None:  # probe memory of new sizes, then time the fitting
        nonlocal result
        if new := [s for s in sizes if s not in seconds]:
            result = probe_more(result, new, lambda sizes: measure(sizes, 1))
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
        best = min(step_s(s) for s in plans)
        return max(s for s in plans if step_s(s) <= (1 + MARGIN) * best), plans, best

    timed(sorted({plan_size(s) for s in geometric(1, largest)}))
    best = choose()[0]  # then time it again with the plans around it, interleaved
    timed(sorted({plan_size(max(1, min(largest, round(best * f)))) for f in (0.71, 1, 1.41)}))
    chosen, plans, best_s = choose()
    rows = [replace(r, seconds=seconds[r.micro_batch_size]) for r in result.rows]
    rows = [replace(r, samples_per_s=r.micro_batch_size / max(r.seconds, 1e-9)) for r in rows]
    result = replace(result, rows=rows)
    reason = (
        f"best step throughput {share / step_s(chosen):.1f} samples/s, "
        f"{math.ceil(share / chosen)} micro-batches x {seconds[chosen] * 1e3:.3g} ms for the "
        f"rank's {share} samples: the largest of {len(plans)} plans timed within {MARGIN:.0%} "
        f"of the fastest ({share / best_s:.1f} samples/s; largest that fits: {largest})"
    )
    return result, chosen, reason
