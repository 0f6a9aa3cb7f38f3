"""The validated run configuration: one pydantic model tree, the schema of every run.

Every field has a description (the single source for docs/configuration.md) and the values it
allows (for one-line error messages); unknown keys are errors, "auto" means let bigbatch choose.
Reading YAML, `--set` overrides and HF / DeepSpeed aliases live in `bigbatch.train.configfile`.
"""

from __future__ import annotations

import signal
from typing import Any, Literal

from pydantic import field_validator, model_validator

from bigbatch.choices import (
    ACTIVATION_CHECKPOINTING,
    ACTIVATION_CHECKPOINTING_ALLOWED,
    BATCHNORM_POLICIES,
    DEFAULT_OPTIMIZE,
    GRADIENT_SYNCS,
    OPTIMIZE_GOALS,
    PARALLELISMS,
    PRECISIONS,
    TRACKERS,
    BatchNormPolicy,
    GradientSync,
    Optimize,
    Parallelism,
    Precision,
    TrackerName,
    describe,
    one_of,
)
from bigbatch.train.fields import (
    POSITIVE,
    Auto,
    CheckpointingPolicy,
    GradientNorm,
    Int,
    LRScaling,
    NonNegativeRate,
    PositiveRate,
    StrictModel,
    config_field,
    parse_bytes,
)

__all__ = ["Auto", "Config", "LRScaling", "parse_bytes"]

# Signals that cannot be caught, or that mean a crash rather than a request to stop.
_UNSTOPPABLE = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGCHLD"}


class Config(StrictModel):
    """One training run. Fields left out come from the recipe's defaults, then from here."""

    recipe: str = config_field(
        "digits",
        "a recipe name (digits, digits-bn, tinylm) or 'module:function' returning a Recipe.",
        "a recipe name or 'module:function'",
    )
    recipe_options: dict[str, Any] = config_field(
        {}, "options passed to the recipe's build function.", "a mapping"
    )
    global_batch_size: Int | None = config_field(
        None,
        "items of one optimizer step over every rank; unset: the recipe's.",
        POSITIVE,
    )
    micro_batch_size: Int | Auto | None = config_field(
        None,
        "items per forward/backward on one rank; auto: chosen by probing memory, see optimize; "
        "unset: the recipe's, else derived from gradient_accumulation_steps, else the rank's "
        "whole share.",
        f'{POSITIVE} or "auto"',
    )
    gradient_accumulation_steps: Int | Auto = config_field(
        "auto",
        "micro-batches per rank per step; auto: derived from the global and micro-batch sizes.",
        f'{POSITIVE} or "auto"',
    )
    memory_budget: Int | str = config_field(
        "auto",
        'device memory a micro-batch may use, in bytes or as "20GiB" / "512MiB"; auto: what the '
        "device has free.",
        'a positive byte count, a size such as "20GiB", or "auto"',
    )
    optimize: Optimize = config_field(
        DEFAULT_OPTIMIZE,
        f"what micro_batch_size auto chooses: {describe(OPTIMIZE_GOALS)}.",
        one_of(OPTIMIZE_GOALS),
    )
    max_steps: Int | None = config_field(
        None, "optimizer steps to train (exclusive with epochs).", POSITIVE
    )
    epochs: Int | None = config_field(
        None, "passes over the training set (exclusive with max_steps).", POSITIVE
    )
    lr: PositiveRate = config_field(
        1e-3, "base learning rate at lr_scaling.base_batch_size.", "a number > 0, at most 1e6"
    )
    weight_decay: NonNegativeRate = config_field(
        0.0, "weight decay of the optimizer.", "a number >= 0, at most 1e6"
    )
    lr_scaling: LRScaling = config_field(
        LRScaling(), "how the learning rate follows the global batch.", "a mapping"
    )
    warmup_steps: Int = config_field(
        0, "optimizer steps of linear warm-up from 0.", "an integer >= 0"
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = config_field(
        "constant",
        "decay after warm-up, to 0 at the run's last step.",
        '"constant", "cosine" or "linear"',
    )
    precision: Precision = config_field("fp32", f"{describe(PRECISIONS)}.", one_of(PRECISIONS))
    max_grad_norm: GradientNorm | None = config_field(
        None,
        "clip the total gradient norm per step; unset: no clipping.",
        "a number > 0, at most 3.4e38 (float32's largest), or null",
    )
    seed: Int = config_field(
        0, "seed of the model, the data order and every RNG.", "an integer >= 0"
    )
    eval_every: Int = config_field(
        0, "evaluate every N steps (and always at the end); 0: at the end only.", "an integer >= 0"
    )
    checkpoint_every: Int = config_field(
        100,
        "checkpoint every N steps (and always at the end); 0: at the end only.",
        "an integer >= 0",
    )
    keep_checkpoints: Int = config_field(3, "how many recent checkpoints to keep.", POSITIVE)
    on_nonfinite: Literal["skip", "stop"] = config_field(
        "skip",
        "a non-finite loss or gradient: skip the step (counted, logged), or stop the run after "
        "max_nonfinite_in_row such steps in a row.",
        '"skip" or "stop"',
    )
    max_nonfinite_in_row: Int = config_field(
        3, "with on_nonfinite stop: non-finite steps in a row that stop the run.", POSITIVE
    )
    batch_size_schedule: list[tuple[Int, Int]] | Literal["adaptive"] | None = config_field(
        None,
        "[[step, global_batch_size], ...]: the global batch from each step on (0-based); the "
        "first stage is global_batch_size unless one starts at step 0. adaptive: the global "
        "batch follows the measured critical batch size within min_global_batch_size and "
        "max_global_batch_size (needs noise_scale and epochs; see docs/training.md).",
        'a list of [step >= 0, global_batch_size >= 1] pairs, or "adaptive"',
    )
    min_global_batch_size: Int | None = config_field(
        None,
        "batch_size_schedule adaptive: the smallest global batch; unset: global_batch_size.",
        POSITIVE,
    )
    max_global_batch_size: Int | None = config_field(
        None,
        "batch_size_schedule adaptive: the largest global batch (required there).",
        POSITIVE,
    )
    adapt_every: Int = config_field(
        50, "batch_size_schedule adaptive: steps between decisions on the global batch.", POSITIVE
    )
    drop_last: bool = config_field(
        False, "drop the short last global batch of each epoch.", "a boolean"
    )
    num_workers: Int = config_field(0, "DataLoader worker processes.", "an integer >= 0")
    device: Literal["auto", "cpu", "cuda"] = config_field(
        "auto", "auto: this rank's GPU when there is one, else the CPU.", '"auto", "cpu" or "cuda"'
    )
    parallelism: Parallelism = config_field(
        "ddp",
        f"how more than one process trains: {describe(PARALLELISMS)}; one process runs the "
        "model unsharded either way (see docs/sharded.md).",
        one_of(PARALLELISMS),
    )
    gradient_sync: GradientSync = config_field(
        "auto",
        f"when ranks reduce the gradient: {describe(GRADIENT_SYNCS)}.",
        one_of(GRADIENT_SYNCS),
    )
    activation_checkpointing: CheckpointingPolicy = config_field(
        "none",
        "recompute activations in backward instead of keeping them, unit by unit (the blocks "
        f"parallelism fsdp shards): {describe(ACTIVATION_CHECKPOINTING)}; see docs/memory.md.",
        ACTIVATION_CHECKPOINTING_ALLOWED,
    )
    batchnorm: BatchNormPolicy = config_field(
        "keep",
        "what to do with BatchNorm layers (they break split equivalence): "
        f"{describe(BATCHNORM_POLICIES)}; see docs/batchnorm.md.",
        one_of(BATCHNORM_POLICIES),
    )
    trackers: list[TrackerName] = config_field(
        ["tensorboard"],
        "where the per-step figures go besides metrics.jsonl (always written), all offline in "
        f"the run directory: {describe(TRACKERS)}.",
        f"a list of {one_of(TRACKERS)}",
    )
    noise_scale: bool = config_field(
        False,
        "estimate the gradient noise scale (critical batch size) every step; unset: on with "
        "batch_size_schedule adaptive or lr_scaling.rule adascale.",
        "a boolean",
    )
    noise_smoothing_steps: Int = config_field(
        200, "noise_scale: the moving-average window of the estimate, in steps.", POSITIVE
    )
    stop_signals: list[str] = config_field(
        ["SIGTERM", "SIGINT"],
        "signals that stop the run at the end of the current step, after a checkpoint of it, "
        "with exit code 128 + the signal's number (a second SIGINT aborts at once); add SIGUSR1 "
        "for SLURM's --signal; [] leaves every signal's default action.",
        'a list of signal names such as "SIGTERM", "SIGINT", "SIGUSR1"',
    )
    # Global batches in tokens (docs/tokens.md): checked together in _token_fields.
    global_batch_tokens: Int | None = config_field(
        None,
        "input tokens of one optimizer step over every rank, instead of global_batch_size: each "
        "global batch is the next samples of the epoch order until their tokens reach it. "
        "batch_size_schedule stages and lr_scaling.base_batch_size then count tokens too.",
        POSITIVE,
    )
    micro_batch_tokens: Int | Auto | None = config_field(
        None,
        "with global_batch_tokens: padded tokens (rows x longest row) per forward/backward on "
        "one rank; auto: the most that fit memory_budget; unset: a rank's share in one "
        "micro-batch.",
        f'{POSITIVE} or "auto"',
    )
    packing: bool = config_field(
        False,
        "with global_batch_tokens: several sequences share a row, positions and attention kept "
        "within each (the recipe needs collate_packed).",
        "a boolean",
    )
    min_global_batch_tokens: Int | None = config_field(
        None,
        "batch_size_schedule adaptive in tokens: the smallest global batch; unset: "
        "global_batch_tokens.",
        POSITIVE,
    )
    max_global_batch_tokens: Int | None = config_field(
        None,
        "batch_size_schedule adaptive in tokens: the largest global batch (required there).",
        POSITIVE,
    )

    @field_validator("global_batch_tokens", "min_global_batch_tokens", "max_global_batch_tokens")
    @classmethod
    def _positive_tokens(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("not positive")
        return value

    @field_validator("micro_batch_tokens")
    @classmethod
    def _positive_tokens_or_auto(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError("not positive")
        return value

    @field_validator(
        "global_batch_size",
        "max_steps",
        "epochs",
        "keep_checkpoints",
        "max_nonfinite_in_row",
        "min_global_batch_size",
        "max_global_batch_size",
        "adapt_every",
        "noise_smoothing_steps",
    )
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("not positive")
        return value

    @field_validator("micro_batch_size", "gradient_accumulation_steps")
    @classmethod
    def _positive_or_auto(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError("not positive")
        return value

    @field_validator("warmup_steps", "seed", "eval_every", "checkpoint_every", "num_workers")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("negative")
        return value

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int | str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("not a size")
        return parse_bytes(value)

    @field_validator("batch_size_schedule")
    @classmethod
    def _stages(
        cls, value: list[tuple[int, int]] | str | None
    ) -> list[tuple[int, int]] | str | None:
        if not isinstance(value, list):
            return value  # None or "adaptive"
        steps = [step for step, _ in value]
        if not value or any(s < 0 for s in steps) or any(g <= 0 for _, g in value):
            raise ValueError("bad stage")
        if steps != sorted(set(steps)):
            raise ValueError("steps not increasing")
        return value

    @field_validator("stop_signals")
    @classmethod
    def _catchable_signals(cls, value: list[str]) -> list[str]:
        known = {item.name for item in signal.Signals}
        if any(name not in known or name in _UNSTOPPABLE for name in value):
            raise ValueError("not a signal that asks a run to stop")
        return list(dict.fromkeys(value))

    @model_validator(mode="before")
    @classmethod
    def _noise_scale_on_demand(cls, data: Any) -> Any:
        """Adaptive batches and adascale read the noise scale: unset noise_scale turns on."""
        if not isinstance(data, dict) or "noise_scale" in data:
            return data
        scaling = data.get("lr_scaling")
        rule = scaling.get("rule") if isinstance(scaling, dict) else getattr(scaling, "rule", None)
        if data.get("batch_size_schedule") == "adaptive" or rule == "adascale":
            return {**data, "noise_scale": True}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> Config:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(
                f"max_steps: set max_steps or epochs, not both (got max_steps={self.max_steps}, "
                f"epochs={self.epochs})"
            )
        if self.lr_scaling.rule == "adascale" and not self.noise_scale:
            raise ValueError(
                "lr_scaling.rule: adascale computes its gain from the measured gradient noise: "
                "set noise_scale true (got noise_scale false)"
            )
        if self.batch_size_schedule == "adaptive":
            self._check_adaptive()
        return self

    @model_validator(mode="after")
    def _token_fields(self) -> Config:
        """A run counts its global batch in samples or in tokens; each field names its unit."""
        tokens = self.global_batch_tokens
        if tokens is None:
            given = [
                name
                for name in (
                    "micro_batch_tokens",
                    "min_global_batch_tokens",
                    "max_global_batch_tokens",
                )
                if getattr(self, name) is not None
            ] + (["packing"] if self.packing else [])
            if given:
                raise ValueError(
                    f"{given[0]}: only applies to global batches in tokens: set "
                    "global_batch_tokens (instead of global_batch_size), or leave it out"
                )
            return self
        samples = {
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "min_global_batch_size": self.min_global_batch_size,
            "max_global_batch_size": self.max_global_batch_size,
        }
        for name, value in samples.items():
            if value is not None:
                raise ValueError(
                    f"{name}: a run counts its global batch in samples or in tokens, not both: "
                    f"got {name}={value} and global_batch_tokens={tokens}; keep one "
                    f"({name.replace('size', 'tokens')} in a token run)"
                )
        if isinstance(self.gradient_accumulation_steps, int):
            raise ValueError(
                f"gradient_accumulation_steps: with global_batch_tokens each step's micro-steps "
                f"follow its samples' lengths and micro_batch_tokens; got "
                f"{self.gradient_accumulation_steps}, leave it auto"
            )
        return self

    def _check_adaptive(self) -> None:
        """The adaptive schedule's bounds and needs, each error naming its field."""
        if not self.noise_scale:
            raise ValueError(
                "batch_size_schedule: adaptive follows the measured critical batch size: set "
                "noise_scale true (got noise_scale false)"
            )
        if self.max_steps is not None:
            raise ValueError(
                f"batch_size_schedule: adaptive counts progress in samples, so the run's length "
                f"must be in epochs: set epochs instead of max_steps (got max_steps="
                f"{self.max_steps})"
            )
        if self.global_batch_tokens is not None:
            self._check_adaptive_tokens()
            return
        if self.max_global_batch_size is None:
            raise ValueError(
                "max_global_batch_size: batch_size_schedule adaptive needs the largest global "
                "batch it may use; set max_global_batch_size"
            )
        low = self.min_global_batch_size
        if low is not None and low > self.max_global_batch_size:
            raise ValueError(
                f"min_global_batch_size: {low} is above max_global_batch_size "
                f"{self.max_global_batch_size}; make min <= max"
            )
        start = self.global_batch_size
        if start is not None and not (low or start) <= start <= self.max_global_batch_size:
            raise ValueError(
                f"global_batch_size: the adaptive schedule starts at {start}, outside "
                f"[min_global_batch_size {low or start}, max_global_batch_size "
                f"{self.max_global_batch_size}]; start within the bounds"
            )

    def _check_adaptive_tokens(self) -> None:
        """The adaptive schedule's bounds in tokens."""
        high, low = self.max_global_batch_tokens, self.min_global_batch_tokens
        if high is None:
            raise ValueError(
                "max_global_batch_tokens: batch_size_schedule adaptive needs the largest global "
                "batch it may use; set max_global_batch_tokens"
            )
        start = self.global_batch_tokens
        assert start is not None
        if not (low or start) <= start <= high:
            raise ValueError(
                f"global_batch_tokens: the adaptive schedule starts at {start}, outside "
                f"[min_global_batch_tokens {low or start}, max_global_batch_tokens {high}]; "
                "start within the bounds"
            )
