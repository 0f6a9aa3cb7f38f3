"""Compiling a model for the exact step: torch.compile with the batch dimension dynamic.

A window's micro-batches differ in rows (an uneven last micro-batch, a rank's short share): with
static shapes every new size would compile the forward again. `compile_model` compiles the
model's forward in place and marks dimension 0 of every input tensor dynamic before each call, so
one graph serves every micro-batch of two rows or more. torch specialises sizes 0 and 1 (an empty
micro-batch, a one-row stand-in): each compiles once, the first time it appears. The model stays
the same module (its parameters, hooks, ``state_dict``), so DDP and the engine see no wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

_MARK = "_bigbatch_compiled"


def mark_batch_dynamic(inputs: Any) -> None:
    """Mark dimension 0 of every tensor in ``inputs`` (nested) with at least two rows dynamic."""
    for leaf in tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] >= 2:
            torch._dynamo.mark_dynamic(leaf, 0)


def _before_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mark_batch_dynamic((args, kwargs))


def is_compiled(model: torch.nn.Module) -> bool:
    """True once `compile_model` compiled this model."""
    return bool(getattr(model, _MARK, False))


def compile_model(
    model: torch.nn.Module, *, backend: str | Any = "inductor", **options: Any
) -> torch.nn.Module:
    """Compile ``model``'s forward in place with ``torch.compile``; returns the model.

    Call it before wrapping the model in DistributedDataParallel. The gradient stays exact: the
    compiled forward computes what the eager one does (to rounding, as any kernel choice does).

    Args:
        model: the module to compile (not DDP- or FSDP-wrapped).
        backend: torch.compile's backend (``"inductor"``; ``"aot_eager"`` where no C compiler is).
        options: more keyword arguments of ``torch.compile`` (``mode``, ``fullgraph``, ...).

    Raises:
        ValueError: the model was compiled already.
    """
    if is_compiled(model):
        raise ValueError("the model is compiled already: compile_model it once")
    model.forward = torch.compile(model.forward, backend=backend, dynamic=None, **options)  # type: ignore[method-assign]
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    setattr(model, _MARK, True)
    return model
