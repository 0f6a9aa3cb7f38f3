"""Settings for the whole test session.

One torch thread per process unless OMP_NUM_THREADS says otherwise: `make test` runs 2 xdist
workers on 2 cores, and the processes the tests start (gloo ranks, CLI and benchmark runs) inherit
the variable, so nothing oversubscribes the cores. No test depends on the thread count.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
