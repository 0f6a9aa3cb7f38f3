"""`bigbatch bench`'s quick measurements against what they must show, by counting."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from bigbatch.tools import bench
from tests.distributed_helpers import FreedLate

pytestmark = pytest.mark.slow  # measurements: seconds each, two processes for DDP


def test_activation_memory_falls_as_micro_over_global():
    rows = bench.measure_memory(64, (1, 8, 32, 64))
    for row in rows:
        assert row.full_batch_fraction == pytest.approx(row.micro_batch_size / 64, abs=0.01)
    assert [row.gradient_accumulation_steps for row in rows] == [64, 8, 2, 1]
    assert "| 8 x 8 |" in bench.format_memory(rows, 64)


@pytest.mark.timeout(300)
def test_ddp_counts_one_all_reduce_per_step_against_k():
    rows = bench.measure_ddp((1, 3), steps=1, width=32)
    counts = {
        (row.gradient_accumulation_steps, row.method): row.all_reduces_per_step for row in rows
    }
    assert counts == {
        (1, "sync every micro-batch"): 1,
        (1, "bigbatch"): 1,
        (3, "sync every micro-batch"): 3,
        (3, "bigbatch"): 1,
    }
    assert "gradient all-reduces per step" in bench.format_ddp(rows)


def _ddp_worker_with_late_callbacks(rank: int, *args: Any) -> None:
    """bench's DDP worker; gloo's thread frees the callback of rank 1's last comm hook call late.

    With accumulation 1 and one timed step, the hook runs 4 times: a warm-up and a timed step for
    each of the two loops. Only the last callback is late: an earlier one would hold up the barrier
    before the next step."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    allreduce_hook, calls = default_hooks.allreduce_hook, [0]

    def late(state, bucket):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] < 4:
            return allreduce_hook(state, bucket)
        if rank == 0:  # rank 1's all-reduce waits for this one: its callback runs on gloo's thread
            time.sleep(0.2)
        keep = FreedLate() if rank == 1 else None
        return allreduce_hook(state, bucket).then(lambda future, keep=keep: future.value())

    default_hooks.allreduce_hook = late  # in this spawned process only
    bench._ddp_worker(rank, *args)


@pytest.mark.timeout(300)
def test_ddp_workers_exit_cleanly_when_gloo_frees_hook_callbacks_late(tmp_path):
    # A worker that exits while a gloo thread still holds a callback aborts (SIGABRT, "terminate
    # called without an active exception"): under load, 1 smoke run in 3 before the fix.
    rendezvous, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "rows.pt")
    mp.spawn(_ddp_worker_with_late_callbacks, args=(rendezvous, (1,), 1, 32, out), nprocs=2)
    rows = torch.load(out, weights_only=True)
    assert [row["all_reduces_per_step"] for row in rows] == [1, 1]  # so 4 calls: 2 loops x 2 steps
