"""The enumerations users choose from, each defined once with what every choice does.

The config schema, the command line, the engine and the docs all read these, so a choice means
the same everywhere and its description is written once. No torch is needed here.
"""

from __future__ import annotations

from typing import Literal, get_args

from bigbatch.units import UsageError, shorten

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, str] = {
    "fp32": "float32 everywhere",
    "bf16": "autocast to bfloat16 in the forward",
    "fp16": "autocast to float16 in the forward, with loss scaling (a GradScaler)",
}

BatchNormPolicy = Literal["keep", "sync", "freeze", "groupnorm", "window"]
BATCHNORM_POLICIES: dict[str, str] = {
    "keep": "leave BatchNorm as it is: it normalises with each micro-batch's statistics",
    "sync": "statistics of the same micro-step over every rank at once (DDP; gloo on CPU too)",
    "freeze": "normalise with the running statistics (eval mode); the affine parameters train",
    "groupnorm": "replace BatchNorm by GroupNorm, which needs no batch statistics at all",
    "window": "running statistics updated once per step from the inputs every BatchNorm saw in "
    "the window's micro-batches",
}
# The policies the engine applies itself; sync and groupnorm change the model's layers first.
ENGINE_BATCHNORM_POLICIES: tuple[str, ...] = ("keep", "freeze", "window")

Optimize = Literal["memory", "throughput"]
OPTIMIZE_GOALS: dict[str, str] = {
    "memory": "the largest micro-batch whose measured memory fits the budget (fewest micro-steps)",
    "throughput": "the fastest plan among micro-batches that fit the budget, timed on the device",
}
DEFAULT_OPTIMIZE: Optimize = "memory"

LrScalingRule = Literal["linear", "sqrt", "none", "adascale"]
LR_SCALING_RULES: dict[str, str] = {
    "linear": "lr x global / base (Goyal et al. 2017, for SGD)",
    "sqrt": "lr x sqrt(global / base) (for adaptive optimizers such as Adam)",
    "none": "the learning rate as given",
    "adascale": "lr x AdaScale's gain from the measured gradient noise (Johnson et al. 2020)",
}

TrackerName = Literal["tensorboard", "mlflow", "wandb"]
TRACKERS: dict[str, str] = {
    "tensorboard": "event files under tensorboard/ (scalars, the config as text and hparams)",
    "mlflow": "an MLflow file store under mlruns/ (pip install 'bigbatch[mlflow]')",
    "wandb": "a Weights & Biases offline run under wandb/ (pip install 'bigbatch[wandb]')",
}

GradientSync = Literal["auto", "every_micro_batch", "step_end"]
GRADIENT_SYNCS: dict[str, str] = {
    "auto": "step_end when the unsharded gradient fits the memory budget (with micro_batch_size "
    "auto: beside a micro-batch that needs no more micro-steps), else every_micro_batch",
    "every_micro_batch": "reduce (FSDP: reduce-scatter) the gradient after every micro-batch's "
    "backward: the least gradient memory, one gradient collective per micro-batch",
    "step_end": "reduce the gradient once, in the window's last backward: one gradient collective "
    "per step, but FSDP holds a full unsharded gradient per rank until then",
}

SYNC_MODES: tuple[GradientSync, ...] = ("every_micro_batch", "step_end")
"""The modes ``gradient_sync: auto`` chooses between."""

Parallelism = Literal["ddp", "fsdp"]
PARALLELISMS: dict[str, str] = {
    "ddp": "every rank holds the whole model, optimizer and gradient (DistributedDataParallel)",
    "fsdp": "parameters, gradients and optimizer state sharded over ranks (FSDP2's fully_shard of "
    "the recipe's shard units, then the root); checkpoints saved sharded and reshardable",
}

AccumulationDtype = Literal["auto", "fp32", "param"]
ACCUMULATION_DTYPES: dict[str, str] = {
    "auto": "fp32 when trained parameters are bf16 or fp16 (not under FSDP), else param",
    "fp32": "add every micro-batch's gradient into a float32 buffer (4 bytes per parameter) and "
    "round it to the parameter dtype once per step",
    "param": "accumulate in .grad, in the parameters' own dtype",
}

ACTIVATION_CHECKPOINTING: dict[str, str] = {
    "none": "keep every activation for backward (no recompute)",
    "full": "checkpoint every unit: keep only its inputs and recompute its forward in backward",
    "every_<k>": "checkpoint the first unit and every k-th after it (k >= 2: units 1, k+1, "
    "2k+1, ...), selective by units",
    "offload": "no recompute: every unit's saved activations wait in host memory for backward "
    "(torch.autograd.graph.save_on_cpu; for CUDA, on a CPU it changes nothing)",
    "auto": "starts at none, the memory probe's to change where it runs (micro_batch_size or "
    "micro_batch_tokens auto); none when the micro setting is given",
}


ACTIVATION_CHECKPOINTING_ALLOWED = (  # for messages and the config docs
    '"none", "full", "every_<k>" with k >= 2 (e.g. "every_2"), "offload" or "auto"'
)


def parse_activation_checkpointing(value: object, field: str = "activation_checkpointing") -> str:
    """The policy in its one spelling: ``"none"``, ``"full"``, ``"every_<k>"`` (k >= 2),
    ``"offload"`` or ``"auto"``; an int k is every k-th unit (1: full).

    Raises:
        UsageError: anything else, in one line naming the field and what is allowed.

    >>> parse_activation_checkpointing("Every_2"), parse_activation_checkpointing(1)
    ('every_2', 'full')
    """
    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return "full" if value == 1 else f"every_{value}"
    if text in ("none", "full", "offload", "auto"):
        return text
    interval = text.removeprefix("every_") if text is not None and text.startswith("every_") else ""
    digits = interval.isascii() and interval.isdecimal() and len(interval) <= 18
    if digits and int(interval) >= 2:
        return f"every_{int(interval)}"
    raise UsageError(f"{field} must be {ACTIVATION_CHECKPOINTING_ALLOWED}, got {shorten(value)}")


def checkpoint_interval(policy: str) -> int:
    """Every how many units a policy recomputes one: 0 for none and offload, 1 for full, k for
    every_k.

    >>> [checkpoint_interval(p) for p in ("none", "full", "every_3", "offload")]
    [0, 1, 3, 0]
    """
    policy = parse_activation_checkpointing(policy)
    if policy == "auto":
        raise UsageError(
            'activation_checkpointing "auto" is a choice for the memory probe to make: apply '
            '"none", "full", "every_<k>" or "offload"'
        )
    if policy in ("none", "offload"):
        return 0
    return 1 if policy == "full" else int(policy.removeprefix("every_"))


for _literal, _table in (
    (Precision, PRECISIONS),
    (GradientSync, GRADIENT_SYNCS),
    (Parallelism, PARALLELISMS),
    (AccumulationDtype, ACCUMULATION_DTYPES),
    (BatchNormPolicy, BATCHNORM_POLICIES),
    (Optimize, OPTIMIZE_GOALS),
    (LrScalingRule, LR_SCALING_RULES),
    (TrackerName, TRACKERS),
):
    assert tuple(_table) == get_args(_literal), "a choice and its description disagree"


def describe(choices: dict[str, str]) -> str:
    """``"a: what a does; b: what b does"``, for help texts and docs.

    >>> describe({"a": "first", "b": "second"})
    'a: first; b: second'
    """
    return "; ".join(f"{name}: {effect}" for name, effect in choices.items())


def one_of(choices: dict[str, str] | tuple[str, ...]) -> str:
    """``'"a", "b" or "c"'``, for error messages.

    >>> one_of(("a", "b", "c"))
    '"a", "b" or "c"'
    """
    quoted = [f'"{name}"' for name in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
