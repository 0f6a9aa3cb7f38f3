"""Nested batch helpers: count rows, split and join batches along the first dimension.

A batch is a tensor, or a tuple / list / dict of batches (nested), whose tensors share their first
dimension. Non-tensor leaves (strings, ints) are carried along unchanged when splitting, and must be
equal when joining. These helpers let the engine re-split a window and the data layer cut a global
batch without knowing what a sample looks like.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Batch = Any
"""A tensor or a (nested) tuple, list or dict of tensors sharing their first dimension."""


def _tensors(batch: Batch, path: str = "batch") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a batch with its path in it, such as ``batch['inputs'][0]``."""
    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, Mapping):
        return [t for key, value in batch.items() for t in _tensors(value, f"{path}[{key!r}]")]
    if isinstance(batch, (tuple, list)):
        return [t for index, value in enumerate(batch) for t in _tensors(value, f"{path}[{index}]")]
    return []


def num_rows(batch: Batch) -> int:
    """Number of samples in a batch: the shared leading dimension of its tensors.

    Raises:
        TypeError: the batch holds no tensor, or a tensor is zero-dimensional (named by its
            path: a count such as TRL's ``num_items_in_batch`` is refused, never passed on,
            since a loss divided by it would not be divided by the window's items).
        ValueError: the tensors disagree on their leading dimension.
    """
    tensors = _tensors(batch)
    if not tensors:
        raise TypeError(
            "a micro-batch must be a tensor or a tuple/list/dict of tensors, "
            f"got {type(batch).__name__}"
        )
    sizes = set()
    for path, tensor in tensors:
        if tensor.dim() == 0:
            raise TypeError(
                "a micro-batch tensor must have a leading (sample) dimension, got a scalar at "
                f"{path}: drop it: bigbatch counts the window's items itself (a value per "
                "sample needs one row per sample)"
            )
        sizes.add(tensor.shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"the tensors of a micro-batch disagree on their leading dimension: {sorted(sizes)}"
        )
    return sizes.pop()


def map_tensors(batch: Batch, function: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Apply a function to every tensor of a batch, keeping the structure and other leaves."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(value, function) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(value, function) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(value, function) for value in batch)
    return batch


def narrow(batch: Batch, start: int, length: int) -> Batch:
    """Rows [start, start + length) of a batch, as views."""
    return map_tensors(batch, lambda tensor: tensor.narrow(0, start, length))


def split(batch: Batch, sizes: Sequence[int]) -> list[Batch]:
    """Cut a batch into consecutive pieces of the given row counts (which must add up)."""
    rows = num_rows(batch)
    if sum(sizes) != rows or any(size < 0 for size in sizes):
        raise ValueError(f"cannot split a batch of {rows} rows into pieces of {list(sizes)}")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(narrow(batch, start, size))
        start += size
    return pieces


def chunk(batch: Batch, max_rows: int) -> list[Batch]:
    """Cut a batch into pieces of at most max_rows rows, sizes differing by at most one."""
    rows = num_rows(batch)
    if rows == 0:
        return [batch]
    count = -(-rows // max_rows)
    base, extra = divmod(rows, count)
    return split(batch, [base + (index < extra) for index in range(count)])


def join(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches of the same structure along the first dimension."""
    if not batches:
        raise ValueError("cannot join an empty list of batches")
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches), dim=0)
    if isinstance(first, Mapping):
        return type(first)({key: join([b[key] for b in batches]) for key in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(join([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(join([b[i] for b in batches]) for i in range(len(first)))
    if any(b != first for b in batches[1:]):
        raise ValueError(f"cannot join differing non-tensor values: {[b for b in batches]!r}")
    return first


def to_device(batch: Batch, device: torch.device | str, non_blocking: bool = False) -> Batch:
    """Move every tensor of a batch to a device, keeping the structure."""
    return map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=non_blocking))
