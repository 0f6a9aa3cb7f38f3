"""Token cross-entropy and sequence classification as ``(loss_sum, num_items)``.

The one home of what `bigbatch.integrations.huggingface` computes from a model's logits:
items are the tokens (or rows) whose label is not ``ignore_index``, so the window's sum over its
items is the loss of the whole batch, whatever the split (docs/design.md, invariant 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from bigbatch.core.loss import IGNORE_INDEX

ProblemType = Literal["regression", "single_label_classification", "multi_label_classification"]
PROBLEM_TYPES: tuple[ProblemType, ...] = (
    "regression",
    "single_label_classification",
    "multi_label_classification",
)


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the scored tokens, and how many tokens are scored.

    With ``shift`` (a causal LM, as `transformers` does) position t is scored against label
    t + 1, so the first label of every row is never a target; without it (masked LM, token
    classification, labels already shifted) position t meets label t. Over the full batch the
    loss is

        L = (1 / |S|) * sum_{(r, t) in S} -log softmax(logits[r, t])[y[r, t]],

    S the positions whose (shifted) label y is not ``ignore_index``. Packed rows need a label of
    ``ignore_index`` at the first token of every packed sequence but the row's first, so that no
    position is scored against the next sequence. Half-precision logits are upcast to float32.

    Args:
        logits: [rows, positions, vocabulary] (any leading shape matching ``labels``).
        labels: [rows, positions] integer token ids, ``ignore_index`` where no loss is carried.
        ignore_index: the label of tokens that carry no loss.
        shift: score position t against label t + 1 (causal LM).

    Returns:
        (loss_sum, num_items): a 0-dim float tensor and a 0-dim integer tensor.

    Raises:
        ValueError: ``labels`` does not match the leading shape of ``logits``.

    Example:
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: log(4) each
        >>> loss_sum, num_items = token_cross_entropy(logits, torch.tensor([[1, 2, -100]]))
        >>> round(float(loss_sum / num_items), 4), int(num_items)  # one scored token: 2
        (1.3863, 1)
    """
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} must match logits of shape "
            f"{tuple(logits.shape)} without its last (vocabulary) dimension"
        )
    if shift:
        # Pad by one ignored label and drop the first, as transformers does: position t meets
        # label t + 1, and the logits need no sliced copy.
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss_sum = F.cross_entropy(
        _upcast(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss_sum, (labels != ignore_index).sum()


def sequence_classification(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    problem_type: ProblemType | None = None,
    num_labels: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence classification or regression loss summed over its items, and their number.

    ``problem_type`` None infers it as `transformers` does: regression for one label,
    single-label classification for integer labels, multi-label otherwise. Items and the
    full-batch loss:

    - single-label: the rows whose label is not ``ignore_index``,
      L = (1 / |R|) * sum_{r in R} -log softmax(logits[r])[y[r]];
    - regression: the rows for one output, every entry for several,
      L = (1 / n) * sum (logits - y)^2 over those n entries;
    - multi-label: every label entry, L = (1 / n) * sum BCE-with-logits(logits, y).

    Args:
        logits: [rows, num_labels].
        labels: [rows] class ids (single-label), or [rows, num_labels] floats.
        problem_type: see above; None infers it.
        num_labels: the classifier's outputs; None: the last dimension of ``logits``.
        ignore_index: the label of rows that carry no loss (single-label only).

    Raises:
        ValueError: an unknown ``problem_type``, or ``labels`` with another number of rows.
    """
    logits = _upcast(logits)
    if labels.shape[:1] != logits.shape[:1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} must have as many rows as logits of shape "
            f"{tuple(logits.shape)}"
        )
    num_labels = logits.shape[-1] if num_labels is None else int(num_labels)
    if problem_type is None:
        integer = not labels.is_floating_point() and not labels.is_complex()
        problem_type = (
            "regression"
            if num_labels == 1
            else "single_label_classification"
            if integer
            else "multi_label_classification"
        )
    if problem_type == "single_label_classification":
        flat = labels.reshape(-1)
        loss_sum = F.cross_entropy(
            logits.reshape(-1, num_labels), flat, ignore_index=ignore_index, reduction="sum"
        )
        return loss_sum, (flat != ignore_index).sum()
    if problem_type == "regression":
        predictions = logits.reshape(labels.shape[0], -1)
        targets = labels.reshape(labels.shape[0], -1).to(predictions.dtype)
        loss_sum = F.mse_loss(predictions, targets, reduction="sum")
    elif problem_type == "multi_label_classification":
        loss_sum = F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="sum"
        )
    else:
        raise ValueError(
            f"problem_type must be one of {', '.join(PROBLEM_TYPES)} or None, got {problem_type!r}"
        )
    return loss_sum, torch.tensor(labels.numel(), device=logits.device)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32: a cross-entropy over a vocabulary loses digits in bf16."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
