"""Nested batches (`bigbatch.core.batches`): a scalar in a micro-batch is refused by its path."""

from __future__ import annotations

import re

import pytest
import torch

from bigbatch.core import batches

ADVICE = "drop it: bigbatch counts the window's items itself"


def generation_batch(rows: int) -> dict[str, torch.Tensor]:
    """The shape of a TRL GRPO generation batch: per-row tensors and a scalar item count."""
    return {
        "prompt_ids": torch.ones(rows, 5, dtype=torch.long),
        "completion_ids": torch.ones(rows, 7, dtype=torch.long),
        "completion_mask": torch.ones(rows, 7),
        "advantages": torch.zeros(rows),
        "num_items_in_batch": torch.tensor(7.0 * rows),
    }


def test_trl_num_items_in_batch_is_refused_by_its_key_with_the_fix() -> None:
    message = re.escape("got a scalar at batch['num_items_in_batch']: " + ADVICE)
    with pytest.raises(TypeError, match=message):
        batches.num_rows(generation_batch(4))
    with pytest.raises(TypeError, match=message):
        batches.split(generation_batch(4), [2, 2])
    with pytest.raises(TypeError, match=message):
        batches.chunk(generation_batch(4), 3)
    without = {k: v for k, v in generation_batch(4).items() if k != "num_items_in_batch"}
    assert batches.num_rows(without) == 4


@pytest.mark.parametrize(
    ("batch", "path"),
    [
        (torch.tensor(1.0), "batch"),
        ((torch.ones(3, 2), torch.tensor(3)), "batch[1]"),
        ({"inputs": [torch.ones(3), {"scale": torch.tensor(0.5)}]}, "batch['inputs'][1]['scale']"),
    ],
    ids=["the whole micro-batch", "a tuple's second", "nested"],
)
def test_a_scalar_anywhere_is_named_by_its_path(batch: object, path: str) -> None:
    with pytest.raises(TypeError, match=re.escape(f"got a scalar at {path}: {ADVICE}")):
        batches.num_rows(batch)
