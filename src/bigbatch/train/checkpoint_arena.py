"""Shared memory that carries a checkpoint's tensors from the training process to its writer.

At a step boundary the training thread copies every tensor of the training state and of the
weights into one block of shared memory (`Arena.stage`: one ``copy_`` a tensor, into places kept
from the previous save while the shapes stay the same) and hands on the state's structure with a
`Leaf` where each tensor was. The writer process maps the same block and puts a tensor back in
each place (`fill`), every one over its own bytes, so ``torch.save`` and safetensors write exactly
what a copy in the training process would have held. Linux only (``memfd_create``); the block
lives as long as a process holds it, so nothing is left behind when either process dies.
"""

from __future__ import annotations

import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.train.checkpoint_files import copy_weights_only

ALIGNMENT = 64
"""Every tensor starts at a multiple of this many bytes (any dtype's alignment, a cache line)."""
GROWTH = 1.25
"""A block made larger than needed by this factor, so that a state that grows a little (a new
participant's tensors) does not make a new block at every save."""


class Leaf:
    """Where a tensor was in a staged state: its index in `Staged.slots`. (A class of its own
    that pickles as its index: a dataclass would take twice as long, at every step boundary.)"""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[type[Leaf], tuple[int]]:
        return Leaf, (self.index,)


Slot = tuple[int, str, tuple[int, ...], int]
"""One tensor's bytes in the block: (offset, dtype name such as ``float32``, shape, size in
bytes); a plain tuple, which pickles ten times faster than a dataclass."""


@dataclass(frozen=True)
class BlockReference:
    """How another process opens a block: the owner's pid, the file descriptor there, the size,
    and a name that changes whenever the owner makes a new block (fd numbers are reused)."""

    name: str
    pid: int
    fd: int
    size: int


@dataclass(frozen=True)
class Staged:
    """A state copied into a block: its structure with a `Leaf` for each tensor, the weights
    likewise (name -> Leaf), the slots, and the block. Small: it is pickled to the writer."""

    training_state: Any
    model_state: dict[str, Any]
    slots: tuple[Slot, ...]
    block: BlockReference


class Arena:
    """The shared block of one checkpointer, reused from one save to the next.

    `stage` overwrites the block: the writer must be done with the previous save first (the
    checkpointer keeps at most one save in flight).
    """

    def __init__(self) -> None:
        self._block: BlockReference | None = None
        self._memory: mmap.mmap | None = None
        self._layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...] | None = None
        self._slots: tuple[Slot, ...] = ()
        self._places: list[torch.Tensor] = []

    def stage(self, training_state: Any, model_state: dict[str, Any]) -> Staged:
        """Copy every tensor of both states into the block; their structure with `Leaf`s.

        Raises:
            TypeError: the training state holds what ``torch.load(weights_only=True)`` cannot
                read back, or the model state a value that is not a tensor (naming the place).
        """
        tensors: list[torch.Tensor] = []

        def place(tensor: torch.Tensor) -> Any:
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or not _plain(tensor):
                return tensor.detach().to("cpu", copy=True)  # rare: pickled to the writer
            tensors.append(tensor)
            return Leaf(len(tensors) - 1)

        state = copy_weights_only(training_state, "training_state", place)
        weights = {}
        for name, tensor in model_state.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"model_state[{name!r}] is a {type(tensor).__name__}; only tensors are "
                    "allowed (put other values into training_state)"
                )
            weights[name] = place(tensor)
        layout = tuple((tensor.dtype, tuple(tensor.shape)) for tensor in tensors)
        if layout != self._layout:
            self._arrange(layout)
        with torch.no_grad():
            for destination, tensor in zip(self._places, tensors, strict=True):
                destination.copy_(tensor)
        assert self._block is not None
        return Staged(state, weights, self._slots, self._block)

    def _arrange(self, layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...]) -> None:
        """A slot for each tensor of ``layout``, in a block large enough (a new one if needed)."""
        slots: list[Slot] = []
        end = 0
        for dtype, shape in layout:
            nbytes = _numel(shape) * dtype.itemsize
            slots.append((end, str(dtype).removeprefix("torch."), shape, nbytes))
            end += -(-nbytes // ALIGNMENT) * ALIGNMENT
        if self._block is None or end > self._block.size:
            self._places = []  # views of the old block go before it does
            self._new_block(max(int(end * GROWTH), mmap.PAGESIZE))
        assert self._memory is not None
        whole = torch.frombuffer(self._memory, dtype=torch.uint8)
        self._places = [
            whole[offset : offset + nbytes].view(dtype).view(shape)
            for (offset, _, _, nbytes), (dtype, shape) in zip(slots, layout, strict=True)
        ]
        self._layout, self._slots = layout, tuple(slots)

    def _new_block(self, size: int) -> None:
        fd = os.memfd_create("bigbatch-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self._memory = mmap.mmap(fd, size)
        weakref.finalize(self._memory, os.close, fd)  # the fd lives as long as the mapping
        self._block = BlockReference(secrets.token_hex(8), os.getpid(), fd, size)


def available() -> bool:
    """Whether this platform can share a block with another process (Linux)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def open_block(block: BlockReference) -> mmap.mmap:
    """Map another process's block (it must still be alive and hold the fd)."""
    fd = os.open(f"/proc/{block.pid}/fd/{block.fd}", os.O_RDWR)
    try:
        return mmap.mmap(fd, block.size)
    finally:
        os.close(fd)


def fill(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each `Leaf` replaced by its tensor (dicts, lists and tuples rebuilt)."""
    if isinstance(value, Leaf):
        return tensors[value.index]
    if isinstance(value, dict):
        return type(value)((key, fill(item, tensors)) for key, item in value.items())
    if isinstance(value, list | tuple):
        items = [fill(item, tensors) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def tensors_of(staged: Staged, memory: mmap.mmap) -> list[torch.Tensor]:
    """A tensor for each slot over ``memory`` (the mapped block), each over its own bytes (not a
    view of the block: ``torch.save`` writes a tensor's whole storage)."""
    tensors = []
    for offset, dtype_name, shape, nbytes in staged.slots:
        dtype = getattr(torch, dtype_name)
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        raw = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset)
        tensors.append(raw.view(dtype).view(shape))
    return tensors


def _plain(tensor: torch.Tensor) -> bool:
    return tensor.layout is torch.strided and not tensor.is_quantized


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
