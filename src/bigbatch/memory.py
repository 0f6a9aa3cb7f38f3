"""Memory and throughput probe per micro-batch size, and the choice of micro-batch for a budget.

`probe` runs one forward + backward per micro-batch size and measures its memory (the allocator's
peak on CUDA; on other devices an accounting of the tensors saved for backward plus parameters,
gradients and optimizer state) and its samples/s, then fits memory(n) = a + b * n. It leaves the
model, its gradients, the optimizer and every RNG as it found them. `choose_micro_batch_size` picks
the largest micro-batch under a budget, or the fastest feasible one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.autograd.graph import saved_tensors_hooks

from bigbatch import batches, distributed
from bigbatch.engine import LossFn
from bigbatch.plan import Plan, plan

if TYPE_CHECKING:
    from bigbatch.recipes import Recipe

logger = logging.getLogger(__name__)

Batch = Any
Optimize = Literal["memory", "throughput"]
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_FIRST_SIZES = 4  # probe 1, 2, 4, 8 first: cheap, and enough for a straight line
_CONFIRM_TRIES = 3


def parse_memory_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"20GiB"`` or ``"1.5GB"``.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive).

    Raises:
        TypeError: not an int or a string.
        ValueError: an unknown unit or a size that is not positive.

    Example:
        >>> parse_memory_size("1.5GiB"), parse_memory_size("2GB"), parse_memory_size(123)
        (1610612736, 2000000000, 123)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"memory_budget must be a number of bytes or a string such as '20GiB', got "
            f"{value!r} ({type(value).__name__})"
        )
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget {value!r} is not a memory size: use a number of bytes with an "
                "optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
                "(powers of 1024), e.g. '20GiB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return size


def format_bytes(num_bytes: float) -> str:
    """Three significant digits in powers of 1024: ``3355443`` -> ``"3.20 MiB"``."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 999.5 or unit == "TiB":
            break
        size /= 1024
    decimals = 0 if unit == "B" or abs(size) >= 99.95 else 1 if abs(size) >= 9.995 else 2
    return f"{size:.{decimals}f} {unit}"


@dataclass(frozen=True)
class ProbeRow:
    """One measured micro-batch size.

    Attributes:
        micro_batch_size: samples of the micro-batch.
        memory_bytes: memory of one forward + backward with the model, gradients and optimizer
            state (the allocator's peak on CUDA, the accounting elsewhere).
        samples_per_s: micro_batch_size / best forward + backward time over the repetitions.
        saved_tensor_bytes: bytes of the tensors autograd saved for backward (storages counted
            once; parameters excluded since they are counted with the model).
        seconds: best forward + backward time.
    """

    micro_batch_size: int
    memory_bytes: int
    samples_per_s: float
    saved_tensor_bytes: int = 0
    seconds: float = math.nan


@dataclass(frozen=True)
class MemoryProbe:
    """The measured rows and the fitted line memory(n) = fixed_bytes + bytes_per_sample * n.

    Attributes:
        rows: one row per probed size, ascending.
        fixed_bytes: the fit's intercept: model, gradients and optimizer state.
        bytes_per_sample: the fit's slope: activations per sample.
        fit_relative_error: the largest |fit - measured| / measured over the rows.
        device_type: ``"cuda"``, ``"cpu"``, ...
        method: ``"allocator peak"`` (CUDA) or ``"saved-tensor accounting"``.
        model_bytes: parameters, buffers, gradients and optimizer state as counted.
        oom_micro_batch_size: the smallest size that raised out-of-memory, None if none did.
    """

    rows: list[ProbeRow]
    fixed_bytes: float
    bytes_per_sample: float
    fit_relative_error: float
    device_type: str
    method: str = "saved-tensor accounting"
    model_bytes: int = 0
    oom_micro_batch_size: int | None = None

    def predict(self, micro_batch_size: int) -> float:
        """Predicted memory in bytes of one forward + backward at this micro-batch size."""
        return self.fixed_bytes + self.bytes_per_sample * micro_batch_size

    def largest_fitting(self, limit_bytes: float, max_micro_batch_size: int) -> int:
        """The largest size whose predicted memory is at most limit_bytes (0 if none)."""
        cap = max_micro_batch_size
        if self.oom_micro_batch_size is not None:
            cap = min(cap, self.oom_micro_batch_size - 1)
        if self.bytes_per_sample <= 0:
            return cap if self.fixed_bytes <= limit_bytes else 0
        return max(
            0, min(cap, math.floor((limit_bytes - self.fixed_bytes) / self.bytes_per_sample))
        )


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
    """

    micro_batch_size: int
    probe: MemoryProbe
    memory_budget_bytes: int
    optimize: str
    reason: str
    headroom: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, for the run's log and report."""
        return {
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


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, storage bytes); tensors sharing a storage share the key."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (e.g. subclasses)
        return -id(tensor), tensor.numel() * tensor.element_size()


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind some tensors (tied weights counted once)."""
    return sum(dict(_storage_key(t) for t in tensors).values())


_STATE_BUFFERS: list[tuple[type[torch.optim.Optimizer], Callable[[Mapping[str, Any]], int]]] = [
    (torch.optim.AdamW, lambda group: 2 + bool(group.get("amsgrad"))),
    (torch.optim.Adam, lambda group: 2 + bool(group.get("amsgrad"))),
    (torch.optim.SGD, lambda group: int(bool(group.get("momentum")))),
    (torch.optim.RMSprop, lambda g: 1 + bool(g.get("momentum")) + bool(g.get("centered"))),
    (torch.optim.Adagrad, lambda group: 1),
    (torch.optim.Adamax, lambda group: 2),
    (torch.optim.NAdam, lambda group: 2),
    (torch.optim.RAdam, lambda group: 2),
    (torch.optim.Adadelta, lambda group: 2),
]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state once it has stepped, without stepping it.

    Parameters that already have state are counted as they are; the others from the optimizer's
    type and options (AdamW: two buffers the size of each parameter, SGD with momentum one), or,
    for a type not known here, by stepping a copy over cloned parameters.
    """
    if optimizer is None:
        return 0
    total, unknown = 0, []
    for group in optimizer.param_groups:
        buffers = next(
            (f(group) for kind, f in _STATE_BUFFERS if isinstance(optimizer, kind)), None
        )
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state:
                total += _tensor_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
            elif buffers is None:
                unknown.append((group, parameter))
            else:
                total += buffers * parameter.numel() * parameter.element_size()
    return total + _stepped_state_bytes(optimizer, unknown)


def _stepped_state_bytes(optimizer: torch.optim.Optimizer, unknown: list[Any]) -> int:
    """State bytes of an optimizer type not in the table: step a fresh copy over clones."""
    if not unknown:
        return 0
    groups = []
    for group, parameter in unknown:
        clone = parameter.detach().clone().requires_grad_(True)
        clone.grad = torch.zeros_like(clone)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [clone]})
    try:
        copy = type(optimizer)(groups, **optimizer.defaults)
        copy.step()
    except Exception as error:  # an exotic constructor or a closure-only step: count nothing
        logger.warning("cannot count %s state (%s): counted as 0", type(optimizer).__name__, error)
        return 0
    return sum(
        _tensor_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
        for state in copy.state.values()
    )


def _model_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters, buffers, gradients (one per trainable parameter) and optimizer state."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return (
        _tensor_bytes(list(module.parameters()) + list(module.buffers()))
        + _tensor_bytes(trainable)
        + optimizer_state_bytes(optimizer)
    )


@contextlib.contextmanager
def _preserved_state(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Give back the gradients, buffers (BatchNorm running stats) and RNG states as they were."""
    grads = [(p, p.grad) for p in module.parameters()]
    buffers = [
        (owner, name, buffer, buffer.detach().clone())
        for owner in module.modules()
        for name, buffer in owner._buffers.items()
        if buffer is not None
    ]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [torch.cuda.current_device() if device.index is None else device.index]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for owner, name, buffer, saved in buffers:
                buffer.copy_(saved)
                owner._buffers[name] = buffer
        for parameter, grad in grads:
            parameter.grad = grad
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _forward_backward(
    module: torch.nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    exclude: set[int],
    count: bool,
    autocast_dtype: torch.dtype | None,
    device_type: str,
) -> int:
    """One forward + backward from no gradients; returns the bytes saved for backward if counted."""
    for parameter in module.parameters():
        parameter.grad = None
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        if key not in exclude:
            seen.setdefault(key, nbytes)
        return tensor

    hooks = saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext()
    autocast = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with hooks, autocast:
        output = loss_fn(module, batch)
    loss = output[0] if isinstance(output, (tuple, list)) else output
    loss.backward()
    for parameter in module.parameters():
        parameter.grad = None
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    module: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    size: int,
    *,
    device: torch.device,
    model_bytes: int,
    repetitions: int,
    autocast_dtype: torch.dtype | None,
) -> ProbeRow:
    """Memory (one counted pass) and best time (repetitions uncounted passes) of one size."""
    cuda = device.type == "cuda"
    exclude = {_storage_key(t)[0] for t in list(module.parameters()) + list(module.buffers())}
    run = dict(exclude=exclude, autocast_dtype=autocast_dtype, device_type=device.type)
    if cuda:
        for parameter in module.parameters():
            parameter.grad = None
        _sync(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    batch = batches.to_device(make_batch(size), device)
    rows = batches.num_rows(batch)
    if rows != size:
        raise ValueError(f"make_batch({size}) returned a batch of {rows} rows, expected {size}")
    saved = _forward_backward(module, loss_fn, batch, count=True, **run)  # type: ignore[arg-type]
    if cuda:
        _sync(device)
        # Gradients and activations appear in the peak; parameters and optimizer state were
        # already there (or not yet stepped), so they are added as counted.
        memory = model_bytes - _tensor_bytes([p for p in module.parameters() if p.requires_grad])
        memory += torch.cuda.max_memory_allocated(device) - baseline
    else:
        memory = model_bytes + saved
    times = []
    for _ in range(repetitions):
        _sync(device)
        start = time.perf_counter()
        _forward_backward(module, loss_fn, batch, count=False, **run)  # type: ignore[arg-type]
        _sync(device)
        times.append(time.perf_counter() - start)
    best = max(min(times), 1e-9)
    return ProbeRow(size, int(memory), size / best, saved, best)


def _fit(rows: list[ProbeRow], model_bytes: int) -> tuple[float, float, float]:
    """Least squares a + b * n over the rows; (a, b, largest relative error)."""
    sizes = np.array([row.micro_batch_size for row in rows], dtype=np.float64)
    memory = np.array([row.memory_bytes for row in rows], dtype=np.float64)
    if len(set(sizes.tolist())) >= 2:
        slope, intercept = np.polyfit(sizes, memory, 1)
    else:  # one size: the model's own bytes are the intercept
        intercept = float(model_bytes)
        slope = float((memory[0] - intercept) / sizes[0])
    error = float(np.max(np.abs(intercept + slope * sizes - memory) / np.maximum(memory, 1.0)))
    return float(intercept), float(slope), error


def probe(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    sizes: Sequence[int],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    repetitions: int = 2,
    autocast_dtype: torch.dtype | None = None,
) -> MemoryProbe:
    """Measure memory and samples/s of one forward + backward per micro-batch size.

    Args:
        model: the module (a DistributedDataParallel wrapper is unwrapped: no collective runs).
        loss_fn: ``loss_fn(model, micro_batch)`` as for `bigbatch.Accumulator.step`.
        make_batch: ``make_batch(n)`` returns a micro-batch of n samples.
        sizes: micro-batch sizes to measure; on CUDA, sizes from the first out-of-memory on are
            dropped.
        optimizer: its state is counted (without stepping it); None: no optimizer state.
        device: where to run; default the device of the model's first parameter.
        repetitions: timed passes per size (the best counts), after one counted pass.
        autocast_dtype: run forward under torch.autocast with this dtype (bf16 / fp16 runs).

    The model's parameters, buffers and gradients, the optimizer and the torch, numpy and
    python RNG states are left as they were.
    """
    checked = sorted({_check_size("each of sizes", size) for size in sizes})
    if not checked:
        raise ValueError("sizes must hold at least one micro_batch_size, got an empty sequence")
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(f"repetitions must be a positive integer, got {repetitions!r}")
    module = distributed.unwrap(model)
    device = _device_of(module, device)
    model_bytes = _model_bytes(module, optimizer)
    rows: list[ProbeRow] = []
    oom: int | None = None
    with _preserved_state(module, device):
        for size in checked:
            try:
                rows.append(
                    _measure(
                        module,
                        loss_fn,
                        make_batch,
                        size,
                        device=device,
                        model_bytes=model_bytes,
                        repetitions=repetitions,
                        autocast_dtype=autocast_dtype,
                    )
                )
            except torch.OutOfMemoryError:
                if not rows:
                    raise
                oom = size
            if oom is not None:  # outside the except block, so the traceback's tensors are freed
                for parameter in module.parameters():
                    parameter.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning("memory probe: micro_batch_size %d ran out of memory", size)
                break
    intercept, slope, error = _fit(rows, model_bytes)
    method = "allocator peak" if device.type == "cuda" else "saved-tensor accounting"
    return MemoryProbe(rows, intercept, slope, error, device.type, method, model_bytes, oom)


def _device_of(module: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The given device, else the device of the module's first parameter, else the CPU."""
    if device is not None:
        return torch.device(device)
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _merge(first: MemoryProbe, second: MemoryProbe) -> MemoryProbe:
    """One probe from two, refitted over all rows (the second's row wins on a repeated size)."""
    by_size = {row.micro_batch_size: row for row in first.rows + second.rows}
    rows = [by_size[size] for size in sorted(by_size)]
    intercept, slope, error = _fit(rows, first.model_bytes)
    ooms = [s for s in (first.oom_micro_batch_size, second.oom_micro_batch_size) if s is not None]
    return replace(
        first,
        rows=rows,
        fixed_bytes=intercept,
        bytes_per_sample=slope,
        fit_relative_error=error,
        oom_micro_batch_size=min(ooms, default=None),
    )


def _probe_more(
    result: MemoryProbe, sizes: list[int], measure: Callable[[list[int]], MemoryProbe]
) -> MemoryProbe:
    """Probe more sizes and merge; an out-of-memory at the first of them is recorded too."""
    try:
        return _merge(result, measure(sizes))
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


def _fastest(
    result: MemoryProbe, largest: int, limit: float, measure: Callable[[list[int]], MemoryProbe]
) -> tuple[MemoryProbe, int, str]:
    """Probe powers of two up to the largest fitting size; the best measured samples/s wins."""
    extra = [
        s for s in _geometric(1, largest) if s not in {r.micro_batch_size for r in result.rows}
    ]
    if extra:
        result = _probe_more(result, extra, measure)
    feasible = [r for r in result.rows if r.micro_batch_size <= largest and r.memory_bytes <= limit]
    best = max(feasible, key=lambda r: (r.samples_per_s, r.micro_batch_size))
    reason = (
        f"best measured throughput {best.samples_per_s:.1f} samples/s among the "
        f"{len(feasible)} sizes that fit (largest that fits: {largest})"
    )
    return result, best.micro_batch_size, reason


def _geometric(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... up to stop, and stop itself."""
    sizes, size = [], start
    while size < stop:
        sizes.append(size)
        size *= 2
    return sizes + [stop]


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
        raise ValueError(
            f"memory_budget is required on {device.type}: there is no allocator to ask for free "
            "memory; set memory_budget to what one rank may use, e.g. memory_budget: 8GiB"
        )
    free, _ = torch.cuda.mem_get_info(device)
    # What the model already holds on the device is not free, but the prediction counts it.
    held = [*module.parameters(), *module.buffers()]
    held += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        held += [v for state in optimizer.state.values() for v in state.values()]
    resident = _tensor_bytes([t for t in held if isinstance(t, torch.Tensor) and t.is_cuda])
    budget = int(0.9 * (free + resident))
    logger.info(
        "memory_budget %s = 90%% of (free %s + held by the model %s) on %s",
        format_bytes(budget),
        format_bytes(free),
        format_bytes(resident),
        device,
    )
    return budget


def _too_small(result: MemoryProbe, budget: int, headroom: float) -> str:
    needs = max(result.predict(1), result.rows[0].memory_bytes)
    needed = format_bytes(needs * (1 + headroom))
    return (
        f"memory_budget {format_bytes(budget)} is below the {format_bytes(needs)} that "
        f"micro_batch_size 1 needs (model and optimizer {format_bytes(result.fixed_bytes)} + "
        f"{format_bytes(result.bytes_per_sample)} per sample), {needed} with headroom "
        f"{headroom:.0%}; raise memory_budget to at least {needed}, lower headroom, or use a "
        "smaller model, a lighter optimizer or bf16"
    )


def choose_micro_batch_size(
    model: torch.nn.Module,
    loss_fn: LossFn,
    make_batch: Callable[[int], Batch],
    *,
    max_micro_batch_size: int,
    memory_budget_bytes: int | str | None,
    optimize: Optimize = "memory",
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    repetitions: int = 2,
    autocast_dtype: torch.dtype | None = None,
) -> MicroBatchChoice:
    """Probe a few sizes and choose the micro-batch for a memory budget.

    With ``optimize="memory"`` the largest size whose predicted memory x (1 + headroom) fits the
    budget; it is then measured, and the choice backs off if the measurement does not fit. With
    ``"throughput"`` more sizes up to that one are probed and the fastest measured one wins.
    Never above max_micro_batch_size (the rank's share of the global batch).

    Raises:
        ValueError: no budget on a device without an allocator, or micro_batch_size 1 does not
            fit the budget (the message gives the numbers).
    """
    max_size = _check_size("max_micro_batch_size", max_micro_batch_size)
    if optimize not in ("memory", "throughput"):
        raise ValueError(f"optimize must be 'memory' or 'throughput', got {optimize!r}")
    if not (isinstance(headroom, (int, float)) and 0 <= headroom < 10):
        raise ValueError(f"headroom must be a fraction >= 0 such as 0.1, got {headroom!r}")
    module = distributed.unwrap(model)
    device = _device_of(module, device)
    budget = _resolve_budget(memory_budget_bytes, device, module, optimizer)
    limit = budget / (1 + headroom)

    def measure(sizes: list[int]) -> MemoryProbe:
        return probe(
            module, loss_fn, make_batch, sizes, optimizer=optimizer, device=device,
            repetitions=repetitions, autocast_dtype=autocast_dtype,
        )  # fmt: skip

    result = measure(_geometric(1, min(max_size, 2 ** (_FIRST_SIZES - 1))))
    if result.rows[0].micro_batch_size != 1 or result.rows[0].memory_bytes > limit:
        raise ValueError(_too_small(result, budget, headroom))
    result, chosen = _largest_measured(result, limit, max_size, measure)
    if optimize == "throughput":
        result, chosen, reason = _fastest(result, chosen, limit, measure)
    elif chosen == max_size:
        reason = f"capped by max_micro_batch_size {max_size} (the rank's share of the global batch)"
    else:
        needs = format_bytes(result.predict(chosen + 1) * (1 + headroom))
        reason = f"the largest micro_batch_size that fits; {chosen + 1} would need {needs}"
    row = {r.micro_batch_size: r for r in result.rows}[chosen]
    reason += (
        f"; measured {format_bytes(row.memory_bytes)} x (1 + headroom {headroom:.0%}) = "
        f"{format_bytes(row.memory_bytes * (1 + headroom))} <= memory_budget {format_bytes(budget)}"
    )
    logger.info("micro_batch_size %d: %s", chosen, reason)
    return MicroBatchChoice(chosen, result, budget, optimize, reason, float(headroom))


def _recipe_make_batch(recipe: Recipe) -> Callable[[int], Batch]:
    """Micro-batches of the first n training samples (cycled), collated as the trainer does."""
    dataset = recipe.train_dataset
    length = len(dataset)  # type: ignore[arg-type]
    collate = recipe.collate_fn or torch.utils.data.default_collate

    def make_batch(size: int) -> Batch:
        return collate([dataset[index % length] for index in range(size)])

    return make_batch


def _recipe_optimizer(recipe: Recipe, module: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer, built only to count its state (never stepped)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    lr = float(recipe.defaults.get("lr", 1e-3))
    if recipe.optimizer == "sgd":
        momentum = float(recipe.defaults.get("momentum", 0.9))
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    return torch.optim.AdamW(parameters, lr=lr)


def plan_for_budget(
    recipe_spec: str,
    global_batch_size: int,
    *,
    world_size: int = 1,
    memory_budget: int | str,
    optimize: Optimize = "memory",
    seed: int = 0,
    device: torch.device | str | None = None,
    headroom: float = 0.1,
    recipe_options: Mapping[str, Any] | None = None,
) -> tuple[MicroBatchChoice, Plan]:
    """Build a recipe, choose its micro-batch for the budget and plan the global batch.

    The micro-batch is capped at a rank's share, ceil(global_batch_size / world_size); the device
    defaults to CUDA when available.
    """
    from bigbatch import recipes  # recipes import the engine; keep this module light to import

    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise TypeError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if global_batch_size < 1 or world_size < 1 or world_size > global_batch_size:
        raise ValueError(
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
        _recipe_make_batch(recipe),
        max_micro_batch_size=math.ceil(global_batch_size / world_size),
        memory_budget_bytes=memory_budget,
        optimize=optimize,
        optimizer=_recipe_optimizer(recipe, module),
        device=device,
        headroom=headroom,
    )
    return choice, plan(global_batch_size, world_size, micro_batch_size=choice.micro_batch_size)


def format_choice(choice: MicroBatchChoice, plan: Plan | None = None) -> str:
    """The probe table (size, memory, predicted, samples/s), the choice and why, and the plan."""
    result = choice.probe
    lines = [
        f"memory probe on {result.device_type} ({result.method}):",
        f"{'micro_batch_size':>16}  {'memory':>10}  {'fit':>10}  {'samples/s':>10}",
    ]
    for row in result.rows:
        mark = "  <- chosen" if row.micro_batch_size == choice.micro_batch_size else ""
        lines.append(
            f"{row.micro_batch_size:>16}  {format_bytes(row.memory_bytes):>10}  "
            f"{format_bytes(result.predict(row.micro_batch_size)):>10}  "
            f"{row.samples_per_s:>10.1f}{mark}"
        )
    if result.oom_micro_batch_size is not None:
        lines.append(f"{result.oom_micro_batch_size:>16}  out of memory")
    lines += [
        f"fit: memory(n) = {format_bytes(result.fixed_bytes)} + "
        f"{format_bytes(result.bytes_per_sample)} x n "
        f"(largest relative error {result.fit_relative_error:.2%})",
        f"memory_budget {format_bytes(choice.memory_budget_bytes)}, "
        f"headroom {choice.headroom:.0%}, optimize {choice.optimize}: "
        f"micro_batch_size {choice.micro_batch_size}",
        f"why: {choice.reason}",
    ]
    if plan is not None:
        lines.append(str(plan))
    return "\n".join(lines)
