"""The config's rules across fields: which unit a run counts its global batch in, and what the
adaptive schedule needs. Each error names its field (pydantic turns the ValueError into one line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bigbatch.train.config import Config


def check_batch_unit(config: Config) -> None:
    """A run counts its global batch in samples or in tokens; each field names its unit."""
    tokens = config.global_batch_tokens
    if tokens is None:
        given = [
            name
            for name in (
                "micro_batch_tokens",
                "min_global_batch_tokens",
                "max_global_batch_tokens",
            )
            if getattr(config, name) is not None
        ] + (["packing"] if config.packing else [])
        if given:
            raise ValueError(
                f"{given[0]}: only applies to global batches in tokens: set "
                "global_batch_tokens (instead of global_batch_size), or leave it out"
            )
        return
    samples = {
        "global_batch_size": config.global_batch_size,
        "micro_batch_size": config.micro_batch_size,
        "min_global_batch_size": config.min_global_batch_size,
        "max_global_batch_size": config.max_global_batch_size,
    }
    for name, value in samples.items():
        if value is not None:
            raise ValueError(
                f"{name}: a run counts its global batch in samples or in tokens, not both: "
                f"got {name}={value} and global_batch_tokens={tokens}; keep one "
                f"({name.replace('size', 'tokens')} in a token run)"
            )
    if isinstance(config.gradient_accumulation_steps, int):
        raise ValueError(
            f"gradient_accumulation_steps: with global_batch_tokens each step's micro-steps "
            f"follow its samples' lengths and micro_batch_tokens; got "
            f"{config.gradient_accumulation_steps}, leave it auto"
        )


def check_adaptive(config: Config) -> None:
    """The adaptive schedule's bounds and needs, each error naming its field."""
    if not config.noise_scale:
        raise ValueError(
            "batch_size_schedule: adaptive follows the measured critical batch size: set "
            "noise_scale true (got noise_scale false)"
        )
    if config.max_steps is not None:
        raise ValueError(
            f"batch_size_schedule: adaptive counts progress in samples, so the run's length "
            f"must be in epochs: set epochs instead of max_steps (got max_steps="
            f"{config.max_steps})"
        )
    if config.global_batch_tokens is not None:
        check_adaptive_tokens(config)
        return
    if config.max_global_batch_size is None:
        raise ValueError(
            "max_global_batch_size: batch_size_schedule adaptive needs the largest global "
            "batch it may use; set max_global_batch_size"
        )
    low = config.min_global_batch_size
    if low is not None and low > config.max_global_batch_size:
        raise ValueError(
            f"min_global_batch_size: {low} is above max_global_batch_size "
            f"{config.max_global_batch_size}; make min <= max"
        )
    start = config.global_batch_size
    if start is not None and not (low or start) <= start <= config.max_global_batch_size:
        raise ValueError(
            f"global_batch_size: the adaptive schedule starts at {start}, outside "
            f"[min_global_batch_size {low or start}, max_global_batch_size "
            f"{config.max_global_batch_size}]; start within the bounds"
        )


def check_adaptive_tokens(config: Config) -> None:
    """The adaptive schedule's bounds in tokens."""
    high, low = config.max_global_batch_tokens, config.min_global_batch_tokens
    if high is None:
        raise ValueError(
            "max_global_batch_tokens: batch_size_schedule adaptive needs the largest global "
            "batch it may use; set max_global_batch_tokens"
        )
    start = config.global_batch_tokens
    assert start is not None
    if not (low or start) <= start <= high:
        raise ValueError(
            f"global_batch_tokens: the adaptive schedule starts at {start}, outside "
            f"[min_global_batch_tokens {low or start}, max_global_batch_tokens {high}]; "
            "start within the bounds"
        )
