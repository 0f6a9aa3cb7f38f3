"""The search for the largest micro-batch that fits, on a synthetic memory model (a formula).

Real probes measure a model; here ``measure`` returns the formula's bytes, so that the size the
search returns can be compared with the formula's own answer: the largest n whose memory fits.
"""

from __future__ import annotations

import pytest

from bigbatch.tools.memory import MemoryProbe, ProbeRow, fit_rows
from bigbatch.tools.search import geometric, largest_measured

FIXED, PER_ROW, WORKSPACE_PER_ROW, WORKSPACE_ROWS = 10_000, 100, 10, 8


def synthetic_bytes(rows: int) -> int:
    """Memory of a micro-batch: a fixed part, activations per row, and a workspace that stops
    growing at WORKSPACE_ROWS rows (steeper over the first probes than beyond them)."""
    return FIXED + PER_ROW * rows + WORKSPACE_PER_ROW * min(rows, WORKSPACE_ROWS)


class SyntheticMeasure:
    """A probe of the formula; counts the sizes measured."""

    def __init__(self) -> None:
        self.measured: list[int] = []

    def __call__(self, sizes: list[int], repeat: int = 1) -> MemoryProbe:
        self.measured += sizes
        rows = [ProbeRow(n, synthetic_bytes(n), 1.0) for n in sorted(sizes)]
        intercept, slope, error = fit_rows(rows, FIXED)
        return MemoryProbe(rows, intercept, slope, error, "cpu", model_bytes=FIXED)


def reference_largest(limit: float, max_size: int) -> int:
    """Independent of the search: the largest size whose formula memory is within the limit."""
    return max(n for n in range(1, max_size + 1) if synthetic_bytes(n) <= limit)


def test_the_first_fit_16_refits_up_to_17_where_the_measurements_leave_room() -> None:
    limit = synthetic_bytes(17) + 20  # 17 fits, 18 does not (100 bytes more)
    measure = SyntheticMeasure()
    first = measure(geometric(1, 8))
    # the line through 1, 2, 4, 8 (slope 110) stops at 16 of the formula's 17
    assert first.largest_fitting(limit, 1000) == 16
    _, chosen = largest_measured(first, limit, 1000, measure)
    assert chosen == reference_largest(limit, 1000) == 17
    assert 18 not in measure.measured  # the secant through 16 and 8 said 17, no more


@pytest.mark.parametrize("extra_rows", [1, 5, 40, 300])
def test_the_search_ends_at_the_largest_size_the_formula_fits(extra_rows: int) -> None:
    limit = synthetic_bytes(16 + extra_rows) + 30
    measure = SyntheticMeasure()
    _, chosen = largest_measured(measure(geometric(1, 8)), limit, 1000, measure)
    assert chosen == reference_largest(limit, 1000)
    assert synthetic_bytes(chosen) <= limit  # measured, not predicted


def test_the_search_never_passes_the_rank_share() -> None:
    measure = SyntheticMeasure()
    _, chosen = largest_measured(measure(geometric(1, 8)), synthetic_bytes(500), 20, measure)
    assert chosen == 20 and max(measure.measured) == 20
