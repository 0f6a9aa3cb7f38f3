"""What an optimizer step holds beyond its state: the transient bytes of one ``optimizer.step``.

The step runs after the window's last backward, once the activations are freed, beside the
parameters, the gradients and the optimizer state. AdamW's single-tensor step (the CPU default)
builds its denominator out of place, two tensors the size of the largest parameter; foreach and
fused implementations allocate for many parameters at once. `optimizer_step_bytes` measures it
by stepping a copy of the optimizer over clones of the parameters under `AllocatedBytes`, so
neither the model nor the optimizer changes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
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
