"""What an optimizer step holds beyond its state: the transient bytes of one ``optimizer.step``.

The step runs after the window's last backward, once the activations are freed, beside the
parameters, the gradients and the optimizer state. AdamW's single-tensor step (the CPU default)
builds its denominator out of place, two tensors the size of the largest parameter; foreach and
fused implementations allocate for many parameters at once. `optimizer_step_bytes` measures it
by stepping a copy of the optimizer over clones of the parameters under `AllocatedBytes`, so
neither the model nor the optimizer changes; `StepBytesCache` measures it once per optimizer setup.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from collections.abc import Hashable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bigbatch.core import sharding

logger = logging.getLogger(__name__)


class AllocatedBytes(TorchDispatchMode):
    """The bytes of the storages ops allocate while it is active, live until freed, and their
    peak.

    An op's output that shares a storage with one of its inputs (a view, an in-place update)
    allocates nothing and is not counted: only new storages are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def _freed(self, key: int, nbytes: int, _: object) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._refs:
                self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key, nbytes))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out


def optimizer_step_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Peak bytes one ``optimizer.step()`` allocates beyond the parameters, gradients and state.

    A copy of the optimizer (its type, groups and options) over clones of this rank's parameters
    (a sharded parameter's local shard), with gradients of ones, steps once untracked (creating
    its state) and once under `AllocatedBytes`. The copy holds the parameters, gradients and state
    a second time while it runs. An optimizer that cannot be copied so counts 0 (logged).
    """
    if optimizer is None:
        return 0
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        clones = []
        for parameter in group["params"]:
            clone = sharding.local(parameter).detach().clone().requires_grad_(True)
            clone.grad = torch.ones_like(clone)
            clones.append(clone)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": clones})
    try:
        accepted = inspect.signature(type(optimizer)).parameters
        options = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        copy = type(optimizer)(groups, **options)
        copy.step()  # the first step creates the state: held, not transient
        tracker = AllocatedBytes()
        with torch.no_grad(), tracker:
            copy.step()
    except Exception as error:  # an exotic constructor or a closure-only step
        logger.warning("cannot measure %s step (%s): counted as 0", type(optimizer).__name__, error)
        return 0
    return tracker.peak


class StepBytesCache:
    """`optimizer_step_bytes`, measured once per optimizer setup and then reused.

    Choosing a micro-batch probes many times (every few sizes, every checkpointing policy) with
    one optimizer, and each measurement copies the parameters and the optimizer state. What it
    measures is a function of the optimizer's type, its options per group and the shapes, dtypes
    and devices of the parameters it steps (`setup_key`): an equal key reuses the measurement.
    """

    def __init__(self) -> None:
        self._measured: dict[Hashable, int] = {}

    def get(self, optimizer: torch.optim.Optimizer | None) -> int:
        """The optimizer step's temporaries in bytes (0 without an optimizer), measured on the
        first call for this optimizer's setup."""
        if optimizer is None:
            return 0
        key = setup_key(optimizer)
        if key not in self._measured:
            self._measured[key] = optimizer_step_bytes(optimizer)
        return self._measured[key]


def setup_key(optimizer: torch.optim.Optimizer) -> Hashable:
    """What `optimizer_step_bytes` depends on: the optimizer's type, its defaults, and per group
    its options and each parameter's local shape, dtype and device (never its values)."""
    groups = tuple(
        (
            _hashable({k: v for k, v in group.items() if k != "params"}),
            tuple(_hashable(parameter) for parameter in group["params"]),
        )
        for group in optimizer.param_groups
    )
    return type(optimizer), _hashable(optimizer.defaults), groups


def _hashable(value: object) -> Hashable:
    """A hashable stand-in for an option: a tensor by its local shape, dtype and device."""
    if isinstance(value, torch.Tensor):
        local = sharding.local(value)
        return "tensor", tuple(local.shape), local.dtype, local.device
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    return value if isinstance(value, Hashable) else repr(value)
