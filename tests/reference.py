"""Independent references for the exactness tests: naive full-batch computations in float64.

Imports nothing from bigbatch on purpose: the code under test must never be its own reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def full_batch_gradients(
    model: torch.nn.Module,
    per_item_losses: Callable[[torch.nn.Module], tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Gradient of (sum of every item's loss) / (number of items) in one forward over everything.

    per_item_losses(model) returns (losses, mask): per-item losses of the whole global batch and a
    0/1 mask of the items that carry loss.
    """
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    losses, mask = per_item_losses(model)
    loss = (losses * mask).sum() / mask.sum()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def sgd_update(
    model: torch.nn.Module, gradients: dict[str, torch.Tensor], lr: float
) -> dict[str, torch.Tensor]:
    """Weights after one plain SGD step with the given gradients."""
    return {name: (p.detach() - lr * gradients[name]) for name, p in model.named_parameters()}


def relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """|actual - expected| / |expected| over all tensors together."""
    difference = sum(float((actual[k] - expected[k]).pow(2).sum()) for k in expected)
    norm = sum(float(expected[k].pow(2).sum()) for k in expected)
    return (difference / norm) ** 0.5


def full_batch_sgd(
    model: torch.nn.Module,
    global_batches: list,
    per_item_losses: Callable[[torch.nn.Module, object], tuple[torch.Tensor, torch.Tensor]],
    lr: float,
) -> dict[str, torch.Tensor]:
    """Weights after plain SGD with one full-batch gradient per global batch, on a copy."""
    model = copy.deepcopy(model)
    for global_batch in global_batches:
        gradients = full_batch_gradients(model, lambda m, b=global_batch: per_item_losses(m, b))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter -= lr * gradients[name]
    return {name: p.detach().clone() for name, p in model.named_parameters()}
