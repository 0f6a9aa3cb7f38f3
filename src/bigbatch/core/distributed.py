"""Process-group set-up from torchrun's environment, rank helpers and small count reductions.

Everything here degrades to the single-process answer when torch.distributed is not initialised,
so the same code runs under `python` and under `torchrun`.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import time
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

logger = logging.getLogger(__name__)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the one process that writes files and prints."""
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started this process."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def local_device() -> torch.device:
    """The device this process should use: its local GPU under torchrun, else GPU 0, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup_process_group(timeout_s: float = 600.0, backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, once.

    Uses ``backend`` when given (``"gloo"``: CPU tensors only, even where there are GPUs), else
    NCCL when CUDA is available and gloo otherwise. Returns True when a process group is active
    afterwards (False for a plain single process).
    """
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("process group %s: rank %d of %d", backend, get_rank(), get_world_size())
    if is_main_process() and _restarts_share_a_store():
        logger.warning(
            "torchrun may restart the workers (--max-restarts %s) and they share its rendezvous "
            "store across restarts: a restarted worker can read an address the last workers "
            "left there and fail to connect, spending a restart; launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store every round)",
            os.environ["TORCHELASTIC_MAX_RESTARTS"],
        )
    return True


def _restarts_share_a_store() -> bool:
    """True under a torchrun that restarts workers over a store shared across its rounds."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return shared and restarts.isdigit() and int(restarts) > 0


def barrier() -> None:
    """Wait until every rank gets here (nothing without a process group)."""
    if is_initialized():
        dist.barrier()


def teardown_process_group(wait_for_all: bool = False) -> None:
    """Destroy the default process group if there is one.

    Args:
        wait_for_all: first wait until every rank got here (a barrier). A rank that destroys
            its group and exits while another still writes its files can be aborted by gloo's
            threads; give it on paths every rank takes alike (a finished or an agreed stop),
            never after an error, where the others may be waiting in another collective.
    """
    if is_initialized():
        if wait_for_all:
            dist.barrier()
            # gloo's threads free each finished collective after it completes, and may need the
            # GIL for it; a process that begins to exit meanwhile aborts ("terminate called
            # without an active exception"). A short sleep releases the GIL for them.
            time.sleep(0.05)
        # A DistributedDataParallel model left in a reference cycle is freed here, while the
        # default group still holds the process group: freed after, its reducer would destroy
        # the group holding the GIL, joining a gloo thread that waits for the GIL (a hang).
        gc.collect()
        dist.destroy_process_group()


def is_ddp(model: torch.nn.Module) -> bool:
    """True for a model wrapped in DistributedDataParallel."""
    return isinstance(model, DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks, in place, and return it.

    NCCL only reduces tensors on the GPU, so the tensor is moved there and back when needed.
    """
    if not is_initialized():
        return values
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        on_device = values.to(local_device())
        dist.all_reduce(on_device)
        values.copy_(on_device)
    else:
        dist.all_reduce(values)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a small tensor over all ranks, in place, and return it."""
    if not is_initialized():
        return values
    if dist.get_backend() == "nccl" and values.device.type != "cuda":
        on_device = values.to(local_device())
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
        values.copy_(on_device)
    else:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def rank_0_value(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled), so that every rank runs what rank 0 chose."""
    if not is_initialized():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]  # type: ignore[no-any-return]


def agree_on_largest(values: list[float]) -> list[float]:
    """Each value's maximum over all ranks (float64), so that every rank decides alike."""
    if not is_initialized() or not values:
        return values
    return all_reduce_max(torch.tensor(values, dtype=torch.float64)).tolist()  # type: ignore[no-any-return]
