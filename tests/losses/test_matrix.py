"""Every loss of bigbatch.losses, split every way, equals its float64 full-batch reference.

The matrix: each loss (every kind and normalisation, packed rows where packing applies) x uneven
splits (a 1-row micro-batch, empty micro-batches, a rank with no rows) x 1 and 2 processes
(gloo, all 2-process configurations in one launch) x float64 parameters and bf16 parameters with
fp32 accumulation. float64: the applied gradient within 1e-10 (relative) of the full-batch
gradient written in `cases`; bf16: its error against that float64 gradient (of the same bf16
weights) within 1.15x of one bf16 full-batch step's error, the step that backpropagates the
whole batch's loss sum and divides by its items once (the arithmetic of the accumulation, unsplit:
what the split itself costs). A bf16 step that divides before its backward (a plain mean) rounds
once less: against it the ratio reaches 1.6 where the item count is not a power of two, with one
micro-batch as with eight (docs/losses.md, precision).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed_helpers import run_processes
from tests.losses.cases import (
    CASES,
    Config,
    bigbatch_gradient,
    case_named,
    configurations,
    full_batch_gradient,
    full_batch_sum_gradient,
    relative_error,
    two_process_gradients,
)

FLOAT64_TOLERANCE = 1e-10
BF16_FACTOR = 1.15
ONE_PROCESS = configurations(1)
TWO_PROCESSES = configurations(2)


def check(config: Config, gradient: list[torch.Tensor]) -> float:
    """Assert one configuration; return its relative error."""
    case = case_named(config.case)
    expected = full_batch_gradient(case, config.dtype, torch.float64)
    error = relative_error(gradient, expected)
    if config.dtype == torch.float64:
        assert error <= FLOAT64_TOLERANCE, (config, error)
    else:
        one_bf16_step = relative_error(full_batch_sum_gradient(case, config.dtype), expected)
        assert error <= BF16_FACTOR * one_bf16_step, (config, error, one_bf16_step)
    return error


def test_the_matrix_holds_at_least_300_configurations():
    count = len(ONE_PROCESS) + len(TWO_PROCESSES)
    print(f"{len(CASES)} losses x splits x 2 dtypes: {len(ONE_PROCESS)} one-process + "
          f"{len(TWO_PROCESSES)} two-process = {count} configurations")  # fmt: skip
    assert count >= 300
    splits = {config.sizes for config in TWO_PROCESSES}
    assert any(any(0 in sizes for sizes in split) for split in splits)  # an empty micro-batch
    assert any(sum(sizes) == 0 for split in splits for sizes in split)  # a rank with no rows
    assert any(1 in sizes for config in ONE_PROCESS for sizes in config.sizes)  # a 1-row one


@pytest.mark.parametrize("case", [case.name for case in CASES])
def test_one_process(case):
    for config in ONE_PROCESS:
        if config.case == case:
            check(config, bigbatch_gradient(config))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes():
    per_rank = run_processes(two_process_gradients, 2, TWO_PROCESSES)
    for config, on_rank0, on_rank1 in zip(TWO_PROCESSES, *per_rank, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(on_rank0, on_rank1, strict=True)), config
        check(config, on_rank0)
