"""How many CPU threads torch runs, and how they wait: what keeps a busy CPU from collapsing.

torch's intra-op threads start as one per CPU of the machine, and OpenMP's threads spin while
they wait for work. On a CPU that other processes share (other ranks, other jobs) a spinning
thread takes a core from the thread that has the work, and every parallel region waits for a
thread that is not running: steps many times slower. `threads: auto` gives each process its share
of the CPUs it may use (over the processes on this machine) less one, kept for what runs beside
the kernels (Python between them, data loading, the background checkpoint writer, other jobs),
and `wait_passively` makes OpenMP's threads sleep while they wait. No torch here: the command
line calls `wait_passively` before torch loads.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

PASSIVE_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""GNU OpenMP (torch's Linux wheels) reads OMP_WAIT_POLICY, Intel's OpenMP KMP_BLOCKTIME (ms of
spinning before a thread sleeps); both only once, when torch loads the OpenMP runtime."""


def wait_passively(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set OpenMP's waiting to passive in ``environ`` (default ``os.environ``) where the user has
    set neither variable; returns what was set. Takes effect only before torch is imported."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in PASSIVE_WAITING):
        return {}
    environ.update(PASSIVE_WAITING)
    return dict(PASSIVE_WAITING)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, e.g. a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """The processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_threads(threads: int | str) -> int:
    """The config's ``threads``: a number as given; auto: ``OMP_NUM_THREADS`` where it is set to
    a positive number (the user's choice, or torchrun's 1), else usable CPUs // local processes
    less one (at least 1): on 2 CPUs one thread ran digits 1.3x faster than two on a quiet
    machine and 2.5x faster beside a busy one (docs/performance.md, section 6)."""
    if threads != "auto":
        return int(threads)
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, usable_cpus() // local_processes() - 1)
