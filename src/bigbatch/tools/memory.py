"""Memory and throughput probe per micro-batch size: what one forward + backward costs.

`probe` runs one forward + backward per micro-batch size and measures its memory (the allocator's
peak on CUDA; on other devices an accounting of the tensors saved for backward plus parameters,
gradients and optimizer state) and its samples/s, then fits memory(n) = a + b * n. Off CUDA it
also measures the optimizer step's own temporaries (`bigbatch.tools.step_memory`, once per
optimizer setup through a shared `StepBytesCache`): the step runs after the backward freed the
activations, so its peak is a floor under every micro-batch's.
It leaves the model, its gradients, the optimizer and every RNG as it found them. Choosing a
micro-batch from the measurements is `bigbatch.tools.choice`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import saved_tensors_hooks

from bigbatch.core import batches, distributed, sharding
from bigbatch.core.engine import LossFn
from bigbatch.tools.step_memory import StepBytesCache

logger = logging.getLogger(__name__)

Batch = Any


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
        model_bytes: parameters, buffers, gradients and optimizer state as counted (this rank's
            shards of a sharded model).
        oom_micro_batch_size: the smallest size that raised out-of-memory, None if none did.
        sharded: the probed model was sharded with FSDP2 (every rank probed its shards in
            lockstep; parameters all-gathered for a forward are not counted as activations).
        step_bytes: bytes one optimizer step allocates beyond the state
            (`bigbatch.tools.step_memory.optimizer_step_bytes`); 0 on CUDA (not measured) or
            without an optimizer.
    """

    rows: list[ProbeRow]
    fixed_bytes: float
    bytes_per_sample: float
    fit_relative_error: float
    device_type: str
    method: str = "saved-tensor accounting"
    model_bytes: int = 0
    oom_micro_batch_size: int | None = None
    sharded: bool = False
    step_bytes: int = 0

    @property
    def step_peak_bytes(self) -> int:
        """Peak of the optimizer step: the model's bytes and the step's temporaries."""
        return self.model_bytes + self.step_bytes

    def predict(self, micro_batch_size: int) -> float:
        """Predicted peak in bytes of a micro-step at this micro-batch size: the fitted
        forward + backward, at least the optimizer step's peak."""
        line = self.fixed_bytes + self.bytes_per_sample * micro_batch_size
        return max(line, float(self.step_peak_bytes))

    def peak(self, micro_batch_size: int) -> float:
        """The peak of a step at this micro-batch size: its measured forward + backward where
        this size was probed (else predicted), at least the optimizer step's peak."""
        measured = {r.micro_batch_size: r.memory_bytes for r in self.rows}
        if micro_batch_size not in measured:
            return self.predict(micro_batch_size)
        return float(max(measured[micro_batch_size], self.step_peak_bytes))

    def largest_fitting(self, limit_bytes: float, max_micro_batch_size: int) -> int:
        """The largest size whose predicted memory is at most limit_bytes (0 if none)."""
        cap = max_micro_batch_size
        if self.step_peak_bytes > limit_bytes:
            return 0
        if self.oom_micro_batch_size is not None:
            cap = min(cap, self.oom_micro_batch_size - 1)
        if self.bytes_per_sample <= 0:
            return cap if self.fixed_bytes <= limit_bytes else 0
        return max(
            0, min(cap, math.floor((limit_bytes - self.fixed_bytes) / self.bytes_per_sample))
        )


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, storage bytes); tensors sharing a storage share the key.

    A sharded (DTensor) tensor counts as this rank's shard: what the rank holds."""
    tensor = sharding.local(tensor)
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (e.g. subclasses)
        return -id(tensor), tensor.numel() * tensor.element_size()


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
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
    total, unknown = 0, []  # bytes as this rank holds them: a DTensor's local shard
    for group in optimizer.param_groups:
        buffers = next(
            (f(group) for kind, f in _STATE_BUFFERS if isinstance(optimizer, kind)), None
        )
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state:
                total += tensor_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
            elif buffers is None:
                unknown.append((group, parameter))
            else:
                total += buffers * sharding.local(parameter).numel() * parameter.element_size()
    return total + _stepped_state_bytes(optimizer, unknown)


def _stepped_state_bytes(optimizer: torch.optim.Optimizer, unknown: list[Any]) -> int:
    """State bytes of an optimizer type not in the table: step a fresh copy over clones."""
    if not unknown:
        return 0
    groups = []
    for group, parameter in unknown:
        clone = sharding.local(parameter).detach().clone().requires_grad_(True)
        clone.grad = torch.zeros_like(clone)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [clone]})
    try:
        copy = type(optimizer)(groups, **optimizer.defaults)
        copy.step()
    except Exception as error:  # an exotic constructor or a closure-only step: count nothing
        logger.warning("cannot count %s state (%s): counted as 0", type(optimizer).__name__, error)
        return 0
    return sum(
        tensor_bytes([v for v in state.values() if isinstance(v, torch.Tensor)])
        for state in copy.state.values()
    )


def model_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Parameters, buffers, gradients (one per trainable parameter) and optimizer state, as this
    rank holds them (a sharded model's shards)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return (
        tensor_bytes(list(module.parameters()) + list(module.buffers()))
        + tensor_bytes(trainable)
        + optimizer_state_bytes(optimizer)
    )


@contextlib.contextmanager
def preserved_state(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
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


def forward_backward(
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
    sharded = sharding.is_fsdp(module)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        if key not in exclude and not (sharded and key in _gathered_parameters(module)):
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


def _gathered_parameters(module: torch.nn.Module) -> set[int]:
    """Storages of the parameters FSDP2 holds all-gathered now (plain tensors, not DTensors).

    Autograd saves views of them for backward; they are the shard units' parameters in flight,
    counted by `bigbatch.tools.rank_memory`, not activations of the micro-batch."""
    return {
        _storage_key(parameter)[0]
        for parameter in module.parameters()
        if not sharding.is_sharded_tensor(parameter)
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device so a timing covers the work (a no-op on CPU)."""
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
        synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    batch = batches.to_device(make_batch(size), device)
    rows = batches.num_rows(batch)
    if rows != size:
        raise ValueError(f"make_batch({size}) returned a batch of {rows} rows, expected {size}")
    saved = forward_backward(module, loss_fn, batch, count=True, **run)  # type: ignore[arg-type]
    if cuda:
        synchronize(device)
        # Gradients and activations appear in the peak; parameters and optimizer state were
        # already there (or not yet stepped), so they are added as counted.
        memory = model_bytes - tensor_bytes([p for p in module.parameters() if p.requires_grad])
        memory += torch.cuda.max_memory_allocated(device) - baseline
    else:
        memory = model_bytes + saved
    times = []
    for _ in range(repetitions):
        synchronize(device)
        start = time.perf_counter()
        forward_backward(module, loss_fn, batch, count=False, **run)  # type: ignore[arg-type]
        synchronize(device)
        times.append(time.perf_counter() - start)
    best = max(min(times), 1e-9)
    return ProbeRow(size, int(memory), size / best, saved, best)


def fit_rows(rows: list[ProbeRow], model_bytes: int) -> tuple[float, float, float]:
    """Least squares a + b * n over the rows; (a, b, largest relative error). One row: the
    model's own bytes are the intercept."""
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
    step_bytes_cache: StepBytesCache | None = None,
) -> MemoryProbe:
    """Measure memory and samples/s of one forward + backward per micro-batch size.

    Args:
        model: the module (a DistributedDataParallel wrapper is unwrapped: no collective runs).
        loss_fn: ``loss_fn(model, micro_batch)`` as for `bigbatch.Accumulator.step`.
        make_batch: ``make_batch(n)`` returns a micro-batch of n samples.
        sizes: micro-batch sizes to measure; on CUDA, sizes from the first out-of-memory on are
            dropped.
        optimizer: its state is counted (without stepping it), and off CUDA the temporaries of
            one step of a copy of it; None: no optimizer state.
        device: where to run; default the device of the model's first parameter.
        repetitions: timed passes per size (the best counts), after one counted pass.
        autocast_dtype: run forward under torch.autocast with this dtype (bf16 / fp16 runs).
        step_bytes_cache: where the optimizer step's temporaries are measured, once per
            optimizer setup (pass one to every probe of a choice); None: measured here.

    The model's parameters, buffers and gradients, the optimizer and the torch, numpy and
    python RNG states are left as they were.
    """
    checked = sorted({_check_size("each of sizes", size) for size in sizes})
    if not checked:
        raise ValueError("sizes must hold at least one micro_batch_size, got an empty sequence")
    if isinstance(repetitions, bool) or not isinstance(repetitions, int) or repetitions < 1:
        raise ValueError(f"repetitions must be a positive integer, got {repetitions!r}")
    module = distributed.unwrap(model)
    device = device_of(module, device)
    model_bytes = model_state_bytes(module, optimizer)
    cache = step_bytes_cache if step_bytes_cache is not None else StepBytesCache()
    step_bytes = 0 if device.type == "cuda" else cache.get(optimizer)
    rows: list[ProbeRow] = []
    oom: int | None = None
    with preserved_state(module, device):
        for size in checked:
            try:
                rows.append(_measure(
                    module, loss_fn, make_batch, size, device=device, model_bytes=model_bytes,
                    repetitions=repetitions, autocast_dtype=autocast_dtype,
                ))  # fmt: skip
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
    intercept, slope, error = fit_rows(rows, model_bytes)
    method = "allocator peak" if device.type == "cuda" else "saved-tensor accounting"
    sharded = sharding.is_fsdp(module)
    return MemoryProbe(
        rows, intercept, slope, error, device.type, method, model_bytes, oom, sharded, step_bytes
    )


def device_of(module: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The given device, else the device of the module's first parameter, else the CPU."""
    if device is not None:
        return torch.device(device)
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def merge_probes(first: MemoryProbe, second: MemoryProbe) -> MemoryProbe:
    """One probe from two, refitted over all rows (the second's row wins on a repeated size)."""
    by_size = {row.micro_batch_size: row for row in first.rows + second.rows}
    rows = [by_size[size] for size in sorted(by_size)]
    intercept, slope, error = fit_rows(rows, first.model_bytes)
    ooms = [s for s in (first.oom_micro_batch_size, second.oom_micro_batch_size) if s is not None]
    return replace(
        first,
        rows=rows,
        fixed_bytes=intercept,
        bytes_per_sample=slope,
        fit_relative_error=error,
        oom_micro_batch_size=min(ooms, default=None),
    )
