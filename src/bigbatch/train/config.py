"""The validated run configuration: one pydantic model tree, the schema of every run.

Every field has a description (the single source for docs/configuration.md) and the values it
allows (for one-line error messages); unknown keys are errors, "auto" means let bigbatch choose.
Reading YAML, `--set` overrides and HF / DeepSpeed aliases live in `bigbatch.train.configfile`.
"""

from __future__ import annotations

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
from bigbatch.train import config_rules
from bigbatch.train.fields import (
    POSITIVE,
    Auto,
    CheckpointingPolicy,
    GradientNorm,
    Int,
    LRScaling,
    NonNegativeRate,
    PositiveRate,
    StopSignalNames,
    StrictModel,
    Text,
    TimeoutSeconds,
    config_field,
    parse_bytes,
)

__all__ = ["Auto", "Config", "LRScaling", "parse_bytes"]


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
    checkpoint_async: bool = config_field(
        True,
        "write the checkpoints of checkpoint_every in the background (a writer process for "
        "plain weights, a thread for shards).",
        "a boolean",
    )
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
    threads: Int | Auto = config_field(
        "auto",
        "torch's intra-op CPU threads per process; auto: OMP_NUM_THREADS where set, else the "
        "CPUs this process may use over the processes on this machine (LOCAL_WORLD_SIZE), less "
        "one; see docs/performance.md.",
        f'{POSITIVE} or "auto"',
    )
    compile: bool = config_field(
        False,
        "compile the model with torch.compile (batch dimension dynamic: no recompile for an "
        "uneven micro-batch); see docs/performance.md.",
        "a boolean",
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
        "where the per-step figures go besides metrics.jsonl (always written), offline in the "
        f"run directory unless mlflow_tracking_uri names a server: {describe(TRACKERS)}.",
        f"a list of {one_of(TRACKERS)}",
    )
    mlflow_tracking_uri: Text = config_field(
        "auto",
        "where the mlflow tracker logs: a tracking server (http://host:5000) or a database URI; "
        "auto: the MLFLOW_TRACKING_URI environment variable, else sqlite:///<run dir>/mlflow.db.",
        'an MLflow tracking URI such as "http://host:5000", or "auto"',
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
    stop_signals: StopSignalNames = config_field(
        ["SIGTERM", "SIGINT"],
        "signals that stop the run at the end of the current step, after a checkpoint of it, "
        "with exit code 128 + the signal's number (a second SIGINT aborts at once); add SIGUSR1 "
        "for SLURM's --signal; [] leaves every signal's default action.",
        'a list of signal names such as "SIGTERM", "SIGINT", "SIGUSR1"',
    )
    collective_timeout: TimeoutSeconds = config_field(
        600,
        "seconds a rank waits in one collective before it fails: the bound on how long a lost "
        "rank holds the others (then torchrun restarts them); too short fails a checkpoint save "
        "or an evaluation the other ranks wait for (docs/elastic.md).",
        "an integer number of seconds in [1, 604800] (a week)",
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

    @field_validator("micro_batch_size", "gradient_accumulation_steps", "threads")
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
            config_rules.check_adaptive(self)
        return self

    @model_validator(mode="after")
    def _token_fields(self) -> Config:
        """A run counts its global batch in samples or in tokens; each field names its unit."""
        config_rules.check_batch_unit(self)
        return self
