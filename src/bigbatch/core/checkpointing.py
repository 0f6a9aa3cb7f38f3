"""Activation checkpointing of a model's units: keep their inputs, recompute them in backward.

`apply_activation_checkpointing(model, policy, units)` checkpoints none, all or every k-th of the
units (by default the blocks `parallelism: fsdp` shards, `sharding.default_shard_units`) with
PyTorch's own non-reentrant `torch.utils.checkpoint`, or with a Hugging Face model's own
`activation_checkpointing_enable` / `gradient_checkpointing_enable`. A recompute gives the same
numbers as the forward it replays (RNG and autocast state restored by torch), so the gradient and
the applied update do not change (docs/design.md, invariant 1). What a recompute must not repeat
is a forward's side effect: BatchNorm's running statistics are put back after it, and
`is_recomputing` tells the window BatchNorm policy's hooks to record nothing.

A unit keeps its parameter names (its ``forward`` is replaced on the instance, no wrapper module),
so checkpoints and optimizers see the same model; FSDP2's `fully_shard` and DDP may come before or
after, and a second call replaces the first's policy (how the memory probe tries candidates).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from bigbatch.choices import checkpoint_interval, parse_activation_checkpointing
from bigbatch.core import distributed, sharding
from bigbatch.units import UsageError

__all__ = [
    "CheckpointingSummary",
    "apply_activation_checkpointing",
    "checkpointed_units",
    "is_recomputing",
    "remove_activation_checkpointing",
    "summarize_checkpointing",
]

_RECOMPUTING = "_bigbatch_recomputing"
"""Set on a BatchNorm layer while its unit's forward is recomputed in backward."""


def apply_activation_checkpointing(
    model: torch.nn.Module,
    policy: str | int,
    units: list[torch.nn.Module] | None = None,
) -> list[torch.nn.Module]:
    """Checkpoint the model's units as the policy says; the units now checkpointed, in order.

    Args:
        model: the model (a DDP wrapper is unwrapped; FSDP2 may be applied before or after).
        policy: ``"none"``, ``"full"`` (every unit), ``"every_<k>"`` (the first unit and every
            k-th after it: units 1, k+1, 2k+1, ...), ``"offload"`` (no recompute: every unit's
            saved activations kept in host memory, `torch.autograd.graph.save_on_cpu`) or an int
            k (1: full).
        units: the modules to checkpoint, each a submodule of the model; None: the blocks
            `parallelism: fsdp` shards (`bigbatch.core.sharding.default_shard_units`), or for a
            Hugging Face model with ``activation_checkpointing_enable`` (or
            ``gradient_checkpointing_enable``) its own layers, through that method.

    A second call replaces the policy of the first ("none" removes it). Apply it after changing
    the model's layers (BatchNorm policies), and before the model runs.

    Raises:
        UsageError: a policy that is not one of these (``"auto"`` included: that is the memory
            probe's choice), or a unit that is not in the model.

    Example:
        >>> blocks = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(4, 4),
        ...     torch.nn.Tanh()) for _ in range(4)))
        >>> [name for name, unit in blocks.named_children()
        ...  if unit in apply_activation_checkpointing(blocks, "every_2")]
        ['0', '2']
    """
    module = distributed.unwrap(model)
    canonical = parse_activation_checkpointing(policy)
    offload = canonical == "offload"
    interval = 1 if offload else checkpoint_interval(canonical)  # "auto" refused here
    remove_activation_checkpointing(module)
    if interval == 0:
        return []
    if units is None and not offload and _hugging_face_enable(module) is not None:
        return _hugging_face_checkpointing(module, interval)
    candidates = sharding.default_shard_units(module) if units is None else list(units)
    inside = {id(m) for m in module.modules()}
    if any(id(unit) not in inside for unit in candidates):
        raise UsageError("activation_checkpointing: a unit given is not a submodule of the model")
    chosen = candidates[::interval]
    for unit in chosen:
        unit.forward = _CheckpointedForward(unit, offload=offload)  # type: ignore[method-assign]
    return chosen


def remove_activation_checkpointing(model: torch.nn.Module) -> None:
    """Undo `apply_activation_checkpointing`: every unit runs its own forward again."""
    module = distributed.unwrap(model)
    for unit in module.modules():
        wrapped = unit.__dict__.get("forward")
        if isinstance(wrapped, _CheckpointedForward):
            if wrapped.inner is None:
                del unit.forward
            else:
                unit.forward = wrapped.inner  # type: ignore[method-assign]
    disable = getattr(module, "activation_checkpointing_disable", None) or getattr(
        module, "gradient_checkpointing_disable", None
    )
    if disable is not None and _hugging_face_checkpointing_on(module):
        disable()


def checkpointed_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward is checkpointed now (by bigbatch or by Hugging Face), in order."""
    module = distributed.unwrap(model)
    return [m for m in module.modules() if m is not module and _is_checkpointed(m)]


def is_recomputing(layer: torch.nn.Module) -> bool:
    """True while the forward of this BatchNorm layer's unit is recomputed in backward.

    Hooks that record what a forward sees (the window BatchNorm policy) skip these calls: the
    original forward was recorded already.
    """
    return bool(getattr(layer, _RECOMPUTING, False))


@dataclass(frozen=True)
class CheckpointingSummary:
    """What checkpointing a model runs with, for the run's printout and report.

    Attributes:
        policy: the policy applied (``"none"``, ``"full"``, ``"every_<k>"``, ``"offload"``), or
            ``"as given"`` for checkpointing the model came with.
        units: the names of the checkpointed units, in order.
        num_candidates: how many units the policy chose from.
        reason: why this policy (``activation_checkpointing: auto``), or "".
    """

    policy: str
    units: tuple[str, ...]
    num_candidates: int
    reason: str = ""

    def describe(self) -> str:
        """One line, e.g. ``every_2: 4 of 8 units (blocks.0, blocks.2, blocks.4, blocks.6)``."""
        if self.policy == "none":
            text = f"none ({self.num_candidates} units run without checkpointing)"
        else:
            names = ", ".join(self.units[:6]) + (", ..." if len(self.units) > 6 else "")
            text = f"{self.policy}: {len(self.units)} of {self.num_candidates} units ({names})"
        return f"{text}; {self.reason}" if self.reason else text


def summarize_checkpointing(
    model: torch.nn.Module,
    policy: str | int,
    checkpointed: list[torch.nn.Module],
    units: list[torch.nn.Module] | None = None,
    reason: str = "",
) -> CheckpointingSummary:
    """The summary of an `apply_activation_checkpointing(model, policy, units)` that returned
    ``checkpointed``."""
    module = distributed.unwrap(model)
    names = {id(m): name or "(the model)" for name, m in module.named_modules()}
    if units is None and checkpointed and _hugging_face_enable(module) is not None:
        candidates = [m for m in module.modules() if _is_hugging_face_layer(m)]
    else:
        candidates = sharding.default_shard_units(module) if units is None else units
    return CheckpointingSummary(
        parse_activation_checkpointing(policy),
        tuple(names.get(id(unit), type(unit).__name__) for unit in checkpointed),
        len(candidates),
        reason,
    )


class _CheckpointedForward:
    """A checkpointed unit's ``forward``: its own forward under `torch.utils.checkpoint`.

    It calls the forward of the unit's class (or the one the instance had), not ``__call__``, so
    the unit's module hooks (FSDP2's all-gather, DDP's) stay outside and do not run again in the
    recompute. Without autograd recording (evaluation, ``torch.no_grad``) it just runs the forward.
    """

    def __init__(self, unit: torch.nn.Module, *, offload: bool) -> None:
        self.unit = unit
        self.inner: Callable[..., Any] | None = unit.__dict__.get("forward")
        self.offload = offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        unit = self.unit
        forward = self.inner or functools.partial(type(unit).forward, unit)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if self.offload:
            # Pinned host memory for a unit on the GPU: the copies back in backward overlap.
            first = next(unit.parameters(), None)
            pin = first is not None and first.device.type == "cuda"
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return forward(*args, **kwargs)
        return checkpoint(
            forward,
            *args,
            use_reentrant=False,
            context_fn=functools.partial(_contexts, unit),
            **kwargs,
        )


def _contexts(region: torch.nn.Module) -> tuple[Any, Any]:
    """torch.utils.checkpoint's (forward, recompute) contexts: nothing, and `_recomputing`."""
    return contextlib.nullcontext(), _recomputing(region)


@contextlib.contextmanager
def _recomputing(region: torch.nn.Module) -> Iterator[None]:
    """Around a recompute: its BatchNorm layers' running statistics are put back after it, so the
    micro-step updates them once, as without checkpointing, and `is_recomputing` holds meanwhile.

    (Turning track_running_stats off instead would save other tensors than the forward did, which
    torch.utils.checkpoint refuses.)
    """
    layers = [m for m in region.modules() if isinstance(m, _BatchNorm) and m.training]
    saved = [[buffer.detach().clone() for buffer in _running_buffers(layer)] for layer in layers]
    for layer in layers:
        setattr(layer, _RECOMPUTING, True)
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, before in zip(layers, saved):
                for buffer, value in zip(_running_buffers(layer), before):
                    buffer.copy_(value)
                setattr(layer, _RECOMPUTING, False)


def _running_buffers(layer: _BatchNorm) -> list[torch.Tensor]:
    """A BatchNorm layer's running statistics and its count of updates (those it has)."""
    buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    return [buffer for buffer in buffers if buffer is not None]


def _hugging_face_enable(module: torch.nn.Module) -> Callable[..., Any] | None:
    """A Hugging Face model's own method to turn checkpointing on, where it supports it."""
    if not getattr(module, "supports_gradient_checkpointing", False):
        return None
    enable = getattr(module, "activation_checkpointing_enable", None)
    return enable if callable(enable) else getattr(module, "gradient_checkpointing_enable", None)


def _hugging_face_checkpointing(module: torch.nn.Module, interval: int) -> list[torch.nn.Module]:
    """Checkpointing through the model's own method, with torch's non-reentrant checkpoint and
    the BatchNorm recompute context; every k-th layer where the method takes ``every_n_layers``."""
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(_contexts, module)}
    enable: Any = getattr(module, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=interval)
    elif interval == 1:
        enable = module.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs=kwargs)
    else:  # an older transformers checkpoints all layers or none: bigbatch's own, on its units
        return apply_activation_checkpointing(
            module, interval, [m for m in module.modules() if _is_hugging_face_layer(m)]
        )
    return checkpointed_units(module)


def _hugging_face_checkpointing_on(module: torch.nn.Module) -> bool:
    """A Hugging Face model's own checkpointing is on (the newer name first: the older warns)."""
    if hasattr(type(module), "is_activation_checkpointing"):
        return bool(module.is_activation_checkpointing)
    return bool(getattr(module, "is_gradient_checkpointing", False))


def _is_hugging_face_layer(module: torch.nn.Module) -> bool:
    """A Hugging Face layer that can be checkpointed on its own (a GradientCheckpointingLayer)."""
    layers = sys.modules.get("transformers.modeling_layers")
    base = getattr(layers, "GradientCheckpointingLayer", None)
    return base is not None and isinstance(module, base)


def _is_checkpointed(module: torch.nn.Module) -> bool:
    if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
        return True
    return _is_hugging_face_layer(module) and getattr(module, "gradient_checkpointing", False)
