"""Two CPU processes over gloo: same weights as one process on the whole global batch, one sync."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import bigbatch
from bigbatch.core import replication
from tests import models
from tests.distributed_helpers import FreedLate, run_processes
from tests.reference import full_batch_sgd, relative_error

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GLOBAL_BATCH = 7  # over 2 ranks with micro 2: rank 0 gets [2, 2], rank 1 gets [2, 1]
STEPS = 3


def global_batches():
    tokens, labels = models.token_data(GLOBAL_BATCH * STEPS, seed=11)
    return [
        (
            tokens[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH],
            labels[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH],
        )
        for s in range(STEPS)
    ]


def train_rank(
    rank: int, world_size: int, micro: int, bucket_view: bool, accumulation_dtype: str
) -> dict:
    model = models.token_model()
    calls = {"all_reduce": 0}
    bucket_storages = set()

    def counting_hook(state, bucket):
        calls["all_reduce"] += 1
        bucket_storages.add(bucket.buffer().untyped_storage().data_ptr())
        return default_hooks.allreduce_hook(None, bucket)

    if bucket_view:
        ddp = replication.replicate(model, bucket_cap_mb=1000)
    else:
        ddp = DistributedDataParallel(model, bucket_cap_mb=1000)
    ddp.register_comm_hook(None, counting_hook)
    accumulator = bigbatch.Accumulator(
        ddp, torch.optim.SGD(ddp.parameters(), lr=0.5), accumulation_dtype=accumulation_dtype
    )
    p = bigbatch.plan(GLOBAL_BATCH, world_size, micro_batch_size=micro)
    start = p.rank_offsets()[rank]
    sizes = p.micro_batch_sizes(rank)
    per_step_calls, tokens_seen, grad_storages = [], [], []
    for tokens, labels in global_batches():
        window, offset = [], start
        for size in sizes:
            window.append((tokens[offset : offset + size], labels[offset : offset + size]))
            offset += size
        tokens_seen.append(int(sum((w[1] != models.IGNORE).sum() for w in window)))
        before = calls["all_reduce"]
        result = accumulator.step(window, models.token_loss_fn)
        per_step_calls.append(calls["all_reduce"] - before)
        assert not result.skipped
        grad_storages.append(
            [
                None if p.grad is None else p.grad.untyped_storage().data_ptr()
                for p in model.parameters()
            ]
        )
    return {
        "grad_storages": grad_storages,
        "bucket_storages": bucket_storages,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "calls": per_step_calls,
        "tokens": tokens_seen,
        "sizes": sizes,
    }


def reference_weights():
    return full_batch_sgd(models.token_model(), global_batches(), models.token_item_losses, 0.5)


@pytest.mark.parametrize(
    ("micro", "bucket_view", "accumulation_dtype"),
    [(2, False, "param"), (1, False, "param"), (1, True, "param"), (2, True, "fp32")],
    ids=["2", "1", "1-bucket-view", "2-bucket-view-fp32-buffer"],
)
def test_two_processes_match_one_full_batch_with_one_sync_per_step(
    micro, bucket_view, accumulation_dtype
):
    results = run_processes(train_rank, 2, micro, bucket_view, accumulation_dtype)
    expected = reference_weights()
    # the fp32 buffer sums float64 gradients in float32: float32 rounding
    tolerance = 1e-12 if accumulation_dtype == "param" else 1e-6
    # with the buffer, every backward runs under no_sync and the engine all-reduces the buffer
    calls = [1 if accumulation_dtype == "param" else 0] * STEPS
    for result in results:
        assert relative_error(result["weights"], expected) < tolerance
        assert result["calls"] == calls  # one bucket: one all-reduce per optimizer step
        if not bucket_view:  # the engine sets .grad to None after a step
            assert {g for step in result["grad_storages"] for g in step} == {None}
            continue
        # gradient_as_bucket_view: after every step each .grad is the same view into DDP's
        # bucket (one gradient per rank), never set to None or replaced; DDP rebuilds its
        # buckets once, in the second step's forward
        first, *later = result["grad_storages"][1:]
        assert None not in first and all(storages == first for storages in later)
        if accumulation_dtype == "param":  # the bucket the comm hook all-reduced
            assert set(first) <= result["bucket_storages"]
    # The ranks really held different numbers of loss items.
    assert results[0]["tokens"] != results[1]["tokens"]
    if micro == 1:
        assert results[1]["sizes"][-1] == 0  # rank 1 joined the sync with an empty micro-batch


def test_single_process_on_the_global_batch_matches_reference():
    model = models.token_model()
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.5))
    for tokens, labels in global_batches():
        accumulator.step([(tokens, labels)], models.token_loss_fn)
    expected = reference_weights()
    actual = {n: p.detach().clone() for n, p in copy.deepcopy(model).named_parameters()}
    assert relative_error(actual, expected) < 1e-12


def step_with_late_callbacks(rank: int, world_size: int) -> int:
    ddp = DistributedDataParallel(models.token_model())

    def hook(state, bucket):
        if rank == 0:  # rank 1's all-reduce waits for this one: its callback runs on gloo's thread
            time.sleep(0.2)
        freed_late = FreedLate() if rank == 1 else None
        future = default_hooks.allreduce_hook(None, bucket)
        return future.then(lambda done, keep=freed_late: done.value())

    ddp.register_comm_hook(None, hook)
    tokens, labels = global_batches()[0]
    loss, _ = models.token_loss_fn(ddp, (tokens[rank::world_size], labels[rank::world_size]))
    loss.backward()
    return rank


def test_ranks_exit_cleanly_when_gloo_frees_hook_callbacks_late():
    # run_processes waits for gloo's threads before a rank exits: one still freeing a comm hook's
    # callback when the interpreter shuts down aborts the process (SIGABRT)
    assert run_processes(step_with_late_callbacks, 2) == [0, 1]
