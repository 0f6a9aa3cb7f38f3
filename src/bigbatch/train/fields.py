"""The parts every model of the run configuration is built from.

`config_field` gives a field its description (the single source for docs/configuration.md) and the
values it allows (for one-line error messages); `StrictModel` forbids unknown keys and counts beyond
2**63 - 1; `Int` and `Float` refuse a boolean (YAML's true is no number); `parse_bytes` reads a
memory size; `CheckpointingPolicy` an activation checkpointing policy; `LRScaling` is the
learning-rate scaling section.
The schema itself, `Config`, lives in `bigbatch.train.config`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bigbatch.choices import (
    LR_SCALING_RULES,
    LrScalingRule,
    describe,
    one_of,
    parse_activation_checkpointing,
)
from bigbatch.units import MAX_COUNT, parse_memory_size

Auto = Literal["auto"]

POSITIVE = "a positive integer"

MAX_RATE = 1e6
"""The largest lr and weight_decay: far above any that trains, and small enough that the
optimizer's float32 arithmetic holds it after lr scaling and Adam's bias correction."""
FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a max_grad_norm above it can never clip a float32 gradient."""


def _not_a_boolean(value: Any) -> Any:
    """Pydantic reads true as 1 for a number; a config never means that."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
"""An integer field: an int (or a whole float or a numeric string, as pydantic reads them), never a
boolean."""
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
"""A number field: an int, a float or a numeric string such as "1e-3", never a boolean."""


def _within(low: float, high: float, *, low_allowed: bool) -> Callable[[float], float]:
    """A check that a number lies in [low, high] (or (low, high]); nan never does."""

    def check(value: float) -> float:
        if not (low <= value if low_allowed else low < value) or not value <= high:
            raise ValueError("out of range")
        return value

    return check


PositiveRate = Annotated[Float, AfterValidator(_within(0, MAX_RATE, low_allowed=False))]
"""lr: in (0, 1e6]."""
NonNegativeRate = Annotated[Float, AfterValidator(_within(0, MAX_RATE, low_allowed=True))]
"""weight_decay: in [0, 1e6]."""
GradientNorm = Annotated[Float, AfterValidator(_within(0, FLOAT32_MAX, low_allowed=False))]
"""max_grad_norm: in (0, float32's largest]."""


def _checkpointing_policy(value: Any) -> str:
    """activation_checkpointing in its one spelling (a policy name: YAML's 2 is no policy)."""
    if not isinstance(value, str):
        raise ValueError("not a policy name")
    return parse_activation_checkpointing(value)


CheckpointingPolicy = Annotated[str, BeforeValidator(_checkpointing_policy)]
"""activation_checkpointing: "none", "full", "every_<k>" (k >= 2), "offload" or "auto"."""


def config_field(default: Any, description: str, allowed: str) -> Any:
    """A field with its description (for docs) and the allowed values (for error messages)."""
    return Field(default, description=description, json_schema_extra={"allowed": allowed})


def parse_bytes(value: int | str) -> int | Auto:
    """`"20GiB"`, `"512MiB"`, `"1.5GB"`, `123` or `"auto"` as a byte count (or "auto").

    It lives with the schema, not with the loading code, because the memory_budget validator
    calls it: the schema imports nothing from `bigbatch.train.configfile`.

    Example:
        >>> parse_bytes("512MiB"), parse_bytes("2GB"), parse_bytes("auto")
        (536870912, 2000000000, 'auto')
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_memory_size(value)


def _too_large(value: Any) -> bool:
    """An integer anywhere in the value beyond what bigbatch takes (2**63 - 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) > MAX_COUNT
    if isinstance(value, list | tuple):
        return any(_too_large(item) for item in value)
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*")
    @classmethod
    def _at_most_max_count(cls, value: Any) -> Any:
        """No count, step or seed beyond 2**63 - 1: torch, numpy and the file formats take int64."""
        if _too_large(value):
            raise PydanticCustomError("too_large", "is above 2**63 - 1, the largest bigbatch takes")
        return value


class LRScaling(StrictModel):
    """How the learning rate follows the global batch: lr = lr x rule(global / base_batch_size)."""

    rule: LrScalingRule = config_field(
        "linear",
        f"{describe(LR_SCALING_RULES)}. AdaScale's gain is (tr S + G2) / (tr S / s + G2) at "
        "scale s = global / base_batch_size, G2 the squared gradient norm; it needs noise_scale.",
        one_of(LR_SCALING_RULES),
    )
    base_batch_size: Int | Auto = config_field(
        "auto",
        "the global batch at which `lr` applies; auto: the run's first global batch, so a "
        "batch-size schedule scales the lr from there.",
        f'{POSITIVE} or "auto"',
    )

    @field_validator("base_batch_size")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value <= 0:
            raise ValueError("not positive")
        return value
