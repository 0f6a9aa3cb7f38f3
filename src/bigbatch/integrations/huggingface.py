"""Hugging Face models in the exact step: losses as (loss_sum, num_items), Trainer batch arguments.

A `transformers` model's ``.loss`` is a *mean* over the micro-batch's loss tokens; accumulated as
is, a micro-batch with 10 answer tokens weighs as much as one with 300. `causal_lm_loss`,
`masked_lm_loss` and `sequence_classification_loss` compute the loss from the model's logits
instead, exactly as the model would for the whole batch, and return its sum with the number of
items that carry it, so `Accumulator.step` normalises once by the global count. They work with
any model whose output has ``logits`` (nothing of `transformers` is imported here).
`training_arguments` turns a plan into the HF Trainer's per-device batch and accumulation steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from bigbatch.core.loss import IGNORE_INDEX
from bigbatch.losses import sequence_classification, token_cross_entropy
from bigbatch.planning import plan

__all__ = [
    "causal_lm_loss",
    "masked_lm_loss",
    "sequence_classification_loss",
    "training_arguments",
]


def causal_lm_loss(
    model: torch.nn.Module, batch: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of a causal LM: (sum over scored tokens, number of scored tokens).

    As in `transformers`, ``labels`` are the input ids with ``ignore_index`` on tokens that carry
    no loss, and position t is scored against label t + 1: the count is that of the *shifted*
    labels (the first label of every row is never a target). A ``shift_labels`` entry, as
    padding-free collators make, is used as given. The logits are upcast to float32 (float64
    stays float64) before the cross-entropy.

    Args:
        model: any model returning an output with ``logits`` (or a tuple whose first item is the
            logits) of shape [rows, positions, vocabulary].
        batch: the model's keyword inputs plus ``labels``; ``labels`` is not passed to the model,
            so the model computes no loss of its own.
        ignore_index: the label of tokens that carry no loss.

    Example (docs/integrations.md has it whole, and a test runs it)::

        accumulator.step(window, causal_lm_loss)
    """
    logits, labels = _logits_and_labels(model, batch, extra=("shift_labels",))
    if labels.shape[0] == 0:
        return _no_items(logits)
    if "shift_labels" in batch:
        shifted = batch["shift_labels"].to(logits.device)
        return token_cross_entropy(logits, shifted, ignore_index, shift=False)
    return token_cross_entropy(logits, labels, ignore_index, shift=True)


def masked_lm_loss(
    model: torch.nn.Module, batch: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM loss: (sum over the masked tokens' losses, number of masked tokens).

    ``labels`` hold the original token at masked positions and ``ignore_index`` elsewhere (what
    `DataCollatorForLanguageModeling` makes); nothing is shifted.
    """
    logits, labels = _logits_and_labels(model, batch)
    if labels.shape[0] == 0:
        return _no_items(logits)
    return token_cross_entropy(logits, labels, ignore_index, shift=False)


def sequence_classification_loss(
    model: torch.nn.Module, batch: Mapping[str, Any], *, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence classification or regression loss as (loss_sum, num_items), as transformers would.

    The problem type is the model config's ``problem_type``, else inferred as transformers does:
    regression for one label, single-label classification for integer labels, multi-label
    otherwise. Items: the rows whose label is not ``ignore_index`` (single-label, cross-entropy),
    the rows (one-output regression), or every label entry (multi-output regression and
    multi-label, whose transformers loss is a mean over every entry).
    """
    logits, labels = _logits_and_labels(model, batch)
    if labels.shape[0] == 0:
        return _no_items(logits)
    config = getattr(_unwrap(model), "config", None)
    return sequence_classification(
        logits,
        labels,
        problem_type=getattr(config, "problem_type", None),
        num_labels=getattr(config, "num_labels", None),
        ignore_index=ignore_index,
    )


class HasMicroBatchSize(Protocol):
    """What `bigbatch.tools.autobatch.choose_micro_batch_size` returns for a memory budget."""

    @property
    def micro_batch_size(self) -> int: ...


def training_arguments(
    global_batch_size: int,
    world_size: int = 1,
    *,
    micro_batch_size: int | HasMicroBatchSize,
) -> dict[str, int]:
    """The HF Trainer's ``per_device_train_batch_size`` and ``gradient_accumulation_steps``.

    The global batch is planned by `bigbatch.planning.plan` with micro-batches of at most
    micro_batch_size (an int, or the choice `bigbatch.tools.autobatch.choose_micro_batch_size`
    made for a memory budget); the plan may choose smaller even micro-batches (240 over 8 ranks
    with at most 12 runs as 10 x 8 x 3). The HF Trainer runs only even splits (global =
    per-device batch x world_size x accumulation steps); an uneven plan is refused with the
    nearest even choices.
    The Trainer is token-exact only for models that accept loss kwargs (``num_items_in_batch``).

    Raises:
        ValueError: the plan is uneven (the message gives the nearest even choices), or the
            numbers do not fit together (see `bigbatch.planning.plan`).

    Example:
        >>> training_arguments(256, world_size=8, micro_batch_size=16)
        {'per_device_train_batch_size': 16, 'gradient_accumulation_steps': 2}
        >>> training_arguments(240, world_size=8, micro_batch_size=12)
        {'per_device_train_batch_size': 10, 'gradient_accumulation_steps': 3}
    """
    micro = (
        micro_batch_size if isinstance(micro_batch_size, int) else micro_batch_size.micro_batch_size
    )
    the_plan = plan(global_batch_size, world_size, micro_batch_size=micro)
    if not the_plan.is_even:
        raise ValueError(_uneven_message(global_batch_size, world_size, micro, the_plan.sizes))
    return {
        "per_device_train_batch_size": the_plan.micro_batch_size,
        "gradient_accumulation_steps": the_plan.gradient_accumulation_steps,
    }


def _uneven_message(
    global_batch_size: int, world_size: int, micro: int, sizes: tuple[tuple[int, ...], ...]
) -> str:
    steps = len(sizes[0])
    smallest, largest = min(map(min, sizes)), max(map(max, sizes))
    per_step = world_size * micro
    nearest = sorted({max(1, global_batch_size // per_step) * per_step, steps * per_step})
    share, remainder = divmod(global_batch_size, world_size)
    divisors = [size for size in range(micro, 0, -1) if not remainder and share % size == 0]
    smaller = (
        f"per_device_train_batch_size={divisors[0]} with gradient_accumulation_steps="
        f"{share // divisors[0]}, "
        if divisors
        else ""
    )
    return (
        f"the HF Trainer needs global_batch_size = per_device_train_batch_size x world_size x "
        f"gradient_accumulation_steps, and global_batch_size {global_batch_size} over world_size "
        f"{world_size} with micro-batches of at most {micro} has no such split: "
        f"{global_batch_size} / ({world_size} x {micro}) = {global_batch_size / per_step:.3g}; "
        f"bigbatch's plan runs {steps} micro-steps per rank of {smallest} to {largest} items. "
        f"Use {smaller}global_batch_size {' or '.join(map(str, nearest))}, or train "
        "with bigbatch.Accumulator, which runs the uneven plan exactly"
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / compile wrappers, where its ``config`` lives."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _logits_and_labels(
    model: torch.nn.Module, batch: Mapping[str, Any], extra: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model on the batch without its labels; return (logits, labels on their device)."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"the micro-batch must be a mapping of the model's inputs with 'labels' (as the "
            f"transformers data collators make), got {keys}"
        )
    inputs = {key: value for key, value in batch.items() if key not in ("labels", *extra)}
    labels = batch["labels"]
    if labels.shape[0] == 0:
        # An empty micro-batch runs only so that this rank joins DDP's gradient sync, and many
        # transformers models cannot run on zero rows: run one stand-in row, weighed by zero.
        inputs = {key: _stand_in_row(key, value) for key, value in inputs.items()}
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    labels = labels.to(logits.device)
    if labels.shape[0] == 0:
        return logits, labels
    if logits.shape[: labels.dim()] != labels.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(logits.shape)}"
        )
    return logits, labels


def _stand_in_row(key: str, value: Any) -> Any:
    """One finite row shaped like an empty input: zeros (ids 0), an attention mask of ones."""
    if not isinstance(value, torch.Tensor):
        return value
    row = torch.zeros((1, *value.shape[1:]), dtype=value.dtype, device=value.device)
    return row + 1 if key == "attention_mask" else row


def _no_items(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero loss that still reaches every parameter the logits depend on, and no items."""
    return _upcast(logits).sum() * 0.0, torch.zeros((), dtype=torch.long, device=logits.device)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32: a cross-entropy over a vocabulary loses digits in bf16."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
