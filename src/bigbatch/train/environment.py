"""What a run needs of the machine: its device, seeded generators, and the memory it used.

`resolve_device` turns the config's `device` into this rank's device, `apply_threads` sets torch's
CPU threads (`bigbatch.train.threads`), `seed_everything` seeds python's, numpy's and torch's
generators, and `peak_memory_bytes` reads the run's peak memory (the CUDA allocator's, or the
process's resident peak elsewhere).
"""

from __future__ import annotations

import os
import random
import resource
from typing import TYPE_CHECKING

import numpy as np
import torch

from bigbatch.core import distributed
from bigbatch.train.threads import resolve_threads
from bigbatch.units import UsageError

if TYPE_CHECKING:
    pass

WORKERS_PER_CPU = 4
"""num_workers above this many per CPU of the machine is refused (each worker is a process)."""


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU, else the process's peak resident memory (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def check_num_workers(num_workers: int) -> None:
    """Refuse more DataLoader workers than this machine can run (each one is a process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = WORKERS_PER_CPU * max(1, cpus or 1)
    if num_workers > limit:
        raise UsageError(
            f"num_workers {num_workers} is more worker processes than this machine runs: it "
            f"has {cpus} CPUs; use at most {limit} ({WORKERS_PER_CPU} per CPU), usually fewer"
        )


def resolve_device(name: str) -> torch.device:
    """The config's device: auto picks this rank's GPU when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: 'cuda' was asked for but no CUDA device is available; use auto")
    return torch.device("cpu") if name == "cpu" else distributed.local_device()


def apply_threads(threads: int | str) -> int:
    """Set torch's intra-op threads from the config's ``threads`` (see `resolve_threads`); returns
    the number set. Passive waiting is the command line's, before torch loads."""
    count = resolve_threads(threads)
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return count


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe_device(device: torch.device) -> str:
    """The device as a report states it: ``cuda:0 (NVIDIA H100 ...)`` or ``cpu (8 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
