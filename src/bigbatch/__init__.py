"""bigbatch: train with the batch you want on the memory you have.

A run is defined by its global batch; bigbatch plans the split into micro-batches, ranks and
accumulation steps, and applies every optimizer step exactly as one big batch would.

The public names load lazily (PEP 562): ``import bigbatch.planning`` needs no torch, and
``from bigbatch import Accumulator`` loads the core only, none of the trainer, the tools or the
command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Loaded now, not lazily: the plan is what `bigbatch plan` and most callers need first (no torch).
from bigbatch.planning import Plan, plan

# Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "Accumulator": "bigbatch.core.engine",
    "LossFn": "bigbatch.core.loss",
    "StepResult": "bigbatch.core.engine",
    "apply_activation_checkpointing": "bigbatch.core.checkpointing",
    "GlobalBatchSampler": "bigbatch.data.sampler",
    "WindowLoader": "bigbatch.data.loader",
    "BatchSizeSchedule": "bigbatch.train.schedules",
    "scale_learning_rate": "bigbatch.train.schedules",
    "Trainer": "bigbatch.train.trainer",
    "fit": "bigbatch.train.trainer",
}
# Public subpackages, loaded on first use: ``bigbatch.losses.dpo_loss``.
_SUBPACKAGES = ("losses",)

__all__ = [
    "Accumulator",
    "BatchSizeSchedule",
    "GlobalBatchSampler",
    "LossFn",
    "Plan",
    "StepResult",
    "Trainer",
    "WindowLoader",
    "apply_activation_checkpointing",
    "fit",
    "losses",
    "plan",
    "scale_learning_rate",
]

if TYPE_CHECKING:
    from bigbatch import losses
    from bigbatch.core.checkpointing import apply_activation_checkpointing
    from bigbatch.core.engine import Accumulator, StepResult
    from bigbatch.core.loss import LossFn
    from bigbatch.data.loader import WindowLoader
    from bigbatch.data.sampler import GlobalBatchSampler
    from bigbatch.train.schedules import BatchSizeSchedule, scale_learning_rate
    from bigbatch.train.trainer import Trainer, fit


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use; ``__version__`` is the installed one."""
    if name == "__version__":
        # One home for the version: pyproject.toml, read from the installed package's metadata
        # (imported here, since importlib.metadata is not light to import).
        from importlib import metadata

        try:
            return metadata.version("bigbatch")
        except metadata.PackageNotFoundError:  # a source tree, never installed
            raise AttributeError("bigbatch is not installed: it has no __version__") from None
    if name in _SUBPACKAGES:
        return importlib.import_module(f"bigbatch.{name}")  # the import sets the attribute
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bigbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES, "__version__"})
