"""What a run needs of the machine: its device, seeded generators, and the memory it used.

`resolve_device` turns the config's `device` into this rank's device, `seed_everything` seeds
python's, numpy's and torch's generators, and `peak_memory_bytes` reads the run's peak memory
(the CUDA allocator's, or the process's resident peak elsewhere).
"""

from __future__ import annotations

import random
import resource

import numpy as np
import torch

from bigbatch.core import distributed


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU, else the process's peak resident memory (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def resolve_device(name: str) -> torch.device:
    """The config's device: auto picks this rank's GPU when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available; use auto")
    return torch.device("cpu") if name == "cpu" else distributed.local_device()


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
