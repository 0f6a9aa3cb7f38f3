"""The random generators of a run, saved and restored so that a resume draws the same numbers.

Each rank captures torch's CPU and CUDA generators, numpy's global one and python's ``random``, in
types that ``torch.load(weights_only=True)`` reads back (docs/design.md, invariant 5); a checkpoint
holds every rank's, and a resume on another number of ranks restores rank 0's.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bigbatch.core import distributed

logger = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from, in ``weights_only``-safe types.

    Covers torch's CPU generator, every CUDA device's generator when CUDA is available, numpy's
    global generator and python's ``random``. Each rank captures its own.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every random generator back to a state from `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    python_state = state["python"]
    internal = tuple(int(value) for value in python_state["internal"].tolist())
    random.setstate((int(python_state["version"]), internal, python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning(
                "CUDA RNG state saved for %d devices, %d visible: restoring the first %d",
                len(cuda_states),
                torch.cuda.device_count(),
                min(len(cuda_states), torch.cuda.device_count()),
            )
        for device, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def gather_rng_states(world_size: int) -> list[Any]:
    """Every rank's RNG states, on every rank (a collective under torch.distributed)."""
    rng = [capture_rng_state()]
    if distributed.is_initialized() and world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    return rng


def restore_rng_states(rng: list[Any], rank: int, world_size: int, saved_world_size: Any) -> None:
    """This rank's RNG states from a checkpoint (rank 0's when the world size changed)."""
    restore_rng_state(rng[rank] if len(rng) == world_size else rng[0])
    if saved_world_size != world_size:
        logger.warning(
            "resume: world_size %s -> %d: same sample order; RNG streams of rank 0 restored",
            saved_world_size,
            world_size,
        )
