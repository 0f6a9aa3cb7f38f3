"""Run a function in N CPU processes over gloo, as torchrun would, and collect what each returns."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that waits longer than this for the other one (a deadlock, a crashed peer) raises instead
# of waiting for gloo's 30-minute default; the test's own timeout (300 s) is longer.
GLOO_TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, function: Callable[..., Any], args: tuple, out_dir: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick and lose to another process between tests.
    rendezvous = f"file://{os.path.join(out_dir, 'rendezvous')}"
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT
    )
    try:
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every collective done, the Python callbacks of comm hooks too: a gloo thread still
        # freeing one when the interpreter shuts down aborts the process (SIGABRT, "terminate
        # called without an active exception").
        dist.barrier()
    finally:
        gc.collect()  # DDP models in cycles freed while the default group holds the group
        dist.destroy_process_group()


def run_processes(function: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Spawn world_size processes running function(rank, world_size, *args); return results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _worker,
            args=(world_size, free_port(), function, args, out_dir),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]


class FreedLate:
    """For a comm hook's callback to hold: freed on gloo's thread, it takes the GIL back every 10 ms
    for 3 s (less once a newer one exists). A rank that exits without waiting for that thread shuts
    its interpreter down meanwhile, and the thread then aborts the process."""

    created = 0

    def __init__(self) -> None:
        FreedLate.created += 1
        self.number = FreedLate.created

    def __del__(self) -> None:
        deadline = time.monotonic() + 3
        while self.number == FreedLate.created and time.monotonic() < deadline:
            time.sleep(0.01)  # releases the GIL, and takes it back
