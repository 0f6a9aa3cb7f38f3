"""Planning, the base layer: how a global batch splits, in samples or in tokens. No torch.

`samples` holds `Plan` / `plan()` (global <-> micro x world x accumulation, uneven splits),
`tokens` the token plan (`plan_tokens`, `TokenBudget`, the length checks) and `unit` the batch
unit interface (`BatchUnit`: `SampleUnit`, `TokenUnit`) that data and train use for both.
The sample plan loads now and needs no numpy (`bigbatch plan` starts fast); the token names
load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bigbatch.planning.samples import (
    MAX_WORLD_SIZE,
    Plan,
    Rows,
    check_count,
    count_steps_in_stages,
    plan,
    spread,
    stage_at,
)

# Name -> the module that defines it, loaded on first use (numpy).
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("TokenPlan", "TokenBudget", "plan_tokens", "check_lengths", "check_tokens"),
        "bigbatch.planning.tokens",
    ),
    "sample_lengths": "bigbatch.planning.tokens",
    **dict.fromkeys(
        ("BatchUnit", "SampleUnit", "TokenUnit", "EpochOrder", "Split", "locate"),
        "bigbatch.planning.unit",
    ),
    "global_batch_sizes": "bigbatch.planning.unit",
}

__all__ = [
    "MAX_WORLD_SIZE",
    "BatchUnit",
    "EpochOrder",
    "Plan",
    "Rows",
    "SampleUnit",
    "Split",
    "TokenBudget",
    "TokenPlan",
    "TokenUnit",
    "check_count",
    "check_lengths",
    "check_tokens",
    "count_steps_in_stages",
    "global_batch_sizes",
    "locate",
    "plan",
    "plan_tokens",
    "sample_lengths",
    "spread",
    "stage_at",
]

if TYPE_CHECKING:
    from bigbatch.planning.tokens import (
        TokenBudget,
        TokenPlan,
        check_lengths,
        check_tokens,
        plan_tokens,
        sample_lengths,
    )
    from bigbatch.planning.unit import (
        BatchUnit,
        EpochOrder,
        SampleUnit,
        Split,
        TokenUnit,
        global_batch_sizes,
        locate,
    )


def __getattr__(name: str) -> Any:
    """Load a token or unit name's module on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bigbatch.planning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
