"""The parts every model of the run configuration is built from.

`config_field` gives a field its description (the single source for docs/configuration.md) and the
values it allows (for one-line error messages); `StrictModel` forbids unknown keys and counts beyond
2**63 - 1; `parse_bytes` reads a memory size; `LRScaling` is the learning-rate scaling section.
The schema itself, `Config`, lives in `bigbatch.train.config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bigbatch.choices import LR_SCALING_RULES, LrScalingRule, describe, one_of
from bigbatch.units import MAX_COUNT, parse_memory_size

Auto = Literal["auto"]

POSITIVE = "a positive integer"


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
    base_batch_size: int | Auto = config_field(
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
