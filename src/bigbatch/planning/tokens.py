"""How one global batch in tokens splits: ranks balanced by tokens, micro-batches by padded size.

`plan_tokens` gives every rank, from the global batch's sample lengths alone (so every rank
computes the same plan), a window of micro-batches whose padded size (rows x longest row) fits
`micro_batch_tokens`, samples of similar lengths together, several a row when packed; every rank
runs the same number of micro-steps (empty ones at the end where needed), which keeps the step's
one gradient sync in lockstep. `TokenBudget` is what holds for every step of a run; the length
checks (`check_lengths`, `sample_lengths`) read what a sample's tokens are. No torch.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigbatch.planning.samples import Rows
from bigbatch.units import UsageError


def check_lengths(lengths: Sequence[int] | np.ndarray, name: str = "lengths") -> np.ndarray:
    """Sample lengths as an int64 array; every length must be a positive integer."""
    array = np.asarray(lengths)
    if array.ndim != 1 or array.size == 0:
        raise UsageError(
            f"{name} must be a non-empty list of token counts, got shape {array.shape}"
        )
    integral = array.dtype.kind in "iu" or (
        array.dtype.kind == "f" and bool(np.all(np.mod(array, 1) == 0))
    )
    if not integral:
        raise TypeError(f"{name} must hold integers (token counts), got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.min() < 1:
        first = int(np.argmin(array))
        raise UsageError(
            f"{name}[{first}] is {int(array[first])}: every sample needs at least one token"
        )
    return array


def sample_lengths(dataset: Any, sample_length: Callable[[Any], int] | None = None) -> np.ndarray:
    """The input tokens of every sample: the dataset's ``lengths``, else ``sample_length(sample)``.

    ``sample_length`` reads every sample once; a ``lengths`` attribute (one int per sample, in
    index order) avoids that.

    Raises:
        ValueError: neither is given, or they do not fit the dataset.
    """
    given = getattr(dataset, "lengths", None)
    num_samples = len(dataset)
    if given is not None:
        lengths = check_lengths(given, "dataset.lengths")
        if len(lengths) != num_samples:
            raise UsageError(
                f"dataset.lengths has {len(lengths)} entries for {num_samples} samples: it needs "
                "one token count per sample, in index order"
            )
        return lengths
    if sample_length is None:
        raise UsageError(
            "global_batch_tokens needs the input tokens of every sample: give the dataset a "
            "`lengths` attribute (one int per sample) or the recipe a `sample_length(sample)`"
        )
    return check_lengths(
        [int(sample_length(dataset[index])) for index in range(num_samples)], "sample_length"
    )


def check_tokens(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """A positive integer (numpy's too) as an int; None passes when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TokenPlan:
    """One global batch in tokens, split over ranks x micro-steps x rows.

    Attributes:
        lengths: input tokens of each sample of the global batch, in epoch order.
        micro_batches: ``micro_batches[rank][micro_step]`` is a micro-batch: its rows, each the
            positions in `lengths` of the samples sharing that row (one sample per row unless
            packed); an empty tuple is an empty micro-batch. Every rank has the same count.
        micro_batch_tokens: the padded tokens a micro-batch may hold (None: no limit).
        packing: rows hold several samples.
        global_batch_tokens: the budget the global batch was taken for (None if not known).
    """

    lengths: tuple[int, ...]
    micro_batches: tuple[tuple[Rows, ...], ...]
    micro_batch_tokens: int | None = None
    packing: bool = False
    global_batch_tokens: int | None = None

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return len(self.micro_batches)

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-steps of every rank's window (the same on every rank)."""
        return len(self.micro_batches[0])

    @property
    def num_samples(self) -> int:
        """Samples of the global batch."""
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Input tokens of the global batch."""
        return sum(self.lengths)

    def row_tokens(self, rows: Rows) -> int:
        """The padded row length of a micro-batch: its longest row (0 when empty)."""
        return max((sum(self.lengths[p] for p in row) for row in rows), default=0)

    def padded_tokens(self, rows: Rows) -> int:
        """Padded tokens of a micro-batch: rows x longest row."""
        return len(rows) * self.row_tokens(rows)

    @property
    def num_padded_tokens(self) -> int:
        """Padded tokens of every micro-batch of every rank."""
        return sum(self.padded_tokens(rows) for rank in self.micro_batches for rows in rank)

    @property
    def padding_fraction(self) -> float:
        """The share of the padded tokens that are padding."""
        padded = self.num_padded_tokens
        return 1.0 - self.num_tokens / padded if padded else 0.0

    def window(self, rank: int) -> tuple[Rows, ...]:
        """One rank's micro-batches as rows of positions in the global batch (the same call as
        `bigbatch.planning.Plan.window`)."""
        return self.micro_batches[rank]

    def rank_positions(self, rank: int) -> list[int]:
        """Positions (in the global batch) of every sample of one rank, micro-batch by row."""
        return [p for rows in self.micro_batches[rank] for row in rows for p in row]

    def rank_tokens(self, rank: int) -> int:
        """Input tokens of one rank's share."""
        return sum(self.lengths[p] for p in self.rank_positions(rank))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description: figures and each rank's micro-batch shapes (rows, length)."""
        return {
            "global_batch_tokens": self.global_batch_tokens,
            "micro_batch_tokens": self.micro_batch_tokens,
            "packing": self.packing,
            "world_size": self.world_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_padded_tokens": self.num_padded_tokens,
            "padding_fraction": self.padding_fraction,
            "micro_batch_shapes": [
                [[len(rows), self.row_tokens(rows)] for rows in rank] for rank in self.micro_batches
            ],
        }

    def __str__(self) -> str:
        budget = "" if self.global_batch_tokens is None else f" (budget {self.global_batch_tokens})"
        limit = "no limit" if self.micro_batch_tokens is None else f"<= {self.micro_batch_tokens}"
        lines = [
            f"global batch {self.num_tokens} tokens{budget}, {self.num_samples} samples = "
            f"{self.world_size} ranks x {self.gradient_accumulation_steps} micro-steps, padded "
            f"tokens per micro-batch {limit}{', packed' if self.packing else ''}; padding "
            f"{self.padding_fraction:.1%}",
            f"{'rank':>6}  {'samples':>7}  {'tokens':>7}  {'padded':>7}  micro-batches "
            "(rows x row length)",
        ]
        for rank, window in enumerate(self.micro_batches):
            padded = sum(self.padded_tokens(rows) for rows in window)
            shapes = " ".join(f"{len(rows)}x{self.row_tokens(rows)}" for rows in window)
            samples = len(self.rank_positions(rank))
            lines.append(
                f"{rank:>6}  {samples:>7}  {self.rank_tokens(rank):>7}  {padded:>7}  {shapes}"
            )
        return "\n".join(lines)


def _balance(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Positions per rank, longest first to the rank with the fewest tokens (ties: lower rank)."""
    order = sorted(range(len(lengths)), key=lambda p: (-lengths[p], p))
    loads = [(0, rank) for rank in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for position in order:
        tokens, rank = heapq.heappop(loads)
        shares[rank].append(position)
        heapq.heappush(loads, (tokens + lengths[position], rank))
    return shares


MICRO_STEP_COST = 1 / 4
"""A micro-step's fixed cost (launches, Python, a small batch's poor use of the device), as a
share of micro_batch_tokens: on a CPU a tinylm micro-step costs about as much as 100-150 padded
tokens (a sixth of 640), and a GPU favours full micro-batches more."""


def _cut(share: list[int], lengths: Sequence[int], budget: int | None) -> list[Rows]:
    """Unpacked: the share (longest first) in runs of similar length, rows x longest <= budget.

    The runs minimise padded tokens + MICRO_STEP_COST x budget per micro-batch (dynamic
    programming over the sorted share): a long sample does not drag short ones into its
    micro-batch when a micro-step of their own costs less than their padding.
    """
    if budget is None or not share:
        return [tuple((p,) for p in share)] if share else []
    length = np.array([lengths[p] for p in share], dtype=np.float64)  # non-increasing
    best = np.zeros(len(share) + 1)
    start_of = np.zeros(len(share) + 1, dtype=np.int64)
    low = 0
    for stop in range(1, len(share) + 1):
        # Starts i with (stop - i) x length[i] <= budget form a range [low, stop - 1].
        while (stop - low) * length[low] > budget:
            low += 1
        starts = np.arange(low, stop)
        costs = best[low:stop] + (stop - starts) * length[low:stop]
        pick = int(np.argmin(costs))  # the first minimum: the fewest micro-batches
        best[stop] = costs[pick] + MICRO_STEP_COST * budget
        start_of[stop] = low + pick
    cuts, stop = [], len(share)
    while stop:
        cuts.append((int(start_of[stop]), stop))
        stop = int(start_of[stop])
    return [tuple((p,) for p in share[i:j]) for i, j in reversed(cuts)]


def _pack(
    share: list[int], lengths: Sequence[int], budget: int | None, row_tokens: int
) -> list[Rows]:
    """Packed: first-fit decreasing into rows of row_tokens, budget // row_tokens rows a batch."""
    rows: list[list[int]] = []
    room: list[int] = []
    for position in share:  # longest first
        length = lengths[position]
        target = next((index for index, free in enumerate(room) if free >= length), None)
        if target is None:
            rows.append([position])
            room.append(row_tokens - length)
        else:
            rows[target].append(position)
            room[target] -= length
    per_batch = len(rows) if budget is None else budget // row_tokens
    return [
        tuple(tuple(row) for row in rows[start : start + per_batch])
        for start in range(0, len(rows), max(1, per_batch))
    ]


def plan_tokens(
    lengths: Sequence[int],
    world_size: int = 1,
    micro_batch_tokens: int | None = None,
    *,
    packing: bool = False,
    row_tokens: int | None = None,
    global_batch_tokens: int | None = None,
) -> TokenPlan:
    """Split a global batch of samples with these lengths over ranks and token micro-batches.

    Ranks get samples longest first, each to the rank with the fewest tokens so far, so their
    token loads differ by at most one sample. Each rank's share, longest first, is cut into
    micro-batches of similar lengths whose rows x longest row fit micro_batch_tokens (None: the
    share in one micro-batch). With packing, samples share rows of row_tokens tokens (default:
    the longest sample) by first-fit decreasing, micro_batch_tokens // row_tokens rows a
    micro-batch. Ranks with fewer micro-batches get empty ones at the end of their window, so
    every rank runs the same number of micro-steps.

    Raises:
        ValueError: a sample is longer than micro_batch_tokens (or than row_tokens).

    Example:
        >>> plan = plan_tokens([6, 4, 2], world_size=2, micro_batch_tokens=6)
        >>> plan.micro_batches  # rank 0 runs an empty micro-step to keep step with rank 1
        ((((0,),), ()), (((1,),), ((2,),)))
    """
    checked = check_lengths(lengths).tolist() if len(lengths) else []
    world = check_tokens("world_size", world_size)
    budget = check_tokens("micro_batch_tokens", micro_batch_tokens, allow_none=True)
    assert world is not None
    longest = max(checked, default=1)
    row = longest if row_tokens is None else check_tokens("row_tokens", row_tokens)
    assert row is not None
    if longest > row:
        raise UsageError(f"a sample of {longest} tokens is longer than row_tokens {row}")
    needed = row if packing else longest
    if budget is not None and needed > budget:
        what = f"a packed row's {row}" if packing else f"the longest sample's {longest}"
        raise UsageError(
            f"micro_batch_tokens {budget} is below {what} tokens: raise micro_batch_tokens to "
            f"at least {needed}, or shorten the longest samples"
        )
    windows = [
        _pack(share, checked, budget, row) if packing else _cut(share, checked, budget)
        for share in _balance(checked, world)
    ]
    steps = max(1, max(len(window) for window in windows))
    micro_batches = tuple(tuple(w) + ((),) * (steps - len(w)) for w in windows)
    return TokenPlan(tuple(checked), micro_batches, budget, packing, global_batch_tokens)


@dataclass(frozen=True)
class TokenBudget:
    """The data-independent side of a token run's plan: budgets, ranks, packing.

    Each step's `TokenPlan` follows from the lengths of its samples; this is what holds for
    every step.

    Attributes:
        global_batch_tokens: input tokens a global batch reaches.
        world_size: number of ranks.
        micro_batch_tokens: padded tokens a micro-batch may hold (None: a rank's whole share).
        packing: rows hold several samples.
        longest: the longest sample of the dataset (None when not known).
    """

    global_batch_tokens: int
    world_size: int = 1
    micro_batch_tokens: int | None = None
    packing: bool = False
    longest: int | None = None

    @property
    def micro_batch_size(self) -> int:
        """Rows a micro-batch holds at the longest sample (what evaluation batches use)."""
        share = math.ceil(self.global_batch_tokens / self.world_size)
        limit = share if self.micro_batch_tokens is None else self.micro_batch_tokens
        return max(1, limit // (self.longest or 1))

    @property
    def min_micro_steps(self) -> int:
        """The fewest micro-steps a full global batch can take: ceil(share / micro_batch_tokens)."""
        if self.micro_batch_tokens is None:
            return 1
        return math.ceil(self.global_batch_tokens / self.world_size / self.micro_batch_tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description."""
        return {
            "global_batch_tokens": self.global_batch_tokens,
            "world_size": self.world_size,
            "micro_batch_tokens": self.micro_batch_tokens,
            "packing": self.packing,
            "longest_sample_tokens": self.longest,
            "min_micro_steps": self.min_micro_steps,
        }

    def __str__(self) -> str:
        share = self.global_batch_tokens / self.world_size
        if self.micro_batch_tokens is None:
            cut = "one micro-batch per rank (micro_batch_tokens unset)"
        else:
            cut = (
                f"micro-batches of at most {self.micro_batch_tokens} padded tokens (rows x "
                f"longest row): at least ceil({share:g} / {self.micro_batch_tokens}) = "
                f"{self.min_micro_steps} micro-steps, more as padding needs"
            )
        longest = "" if self.longest is None else f"; longest sample {self.longest} tokens"
        return (
            f"global batch >= {self.global_batch_tokens} tokens (the next samples until their "
            f"tokens reach it) over {self.world_size} ranks, about {share:g} tokens per rank; "
            f"{cut}{'; packed rows' if self.packing else ''}{longest}. Each step's split follows "
            "its samples' lengths; every rank runs the same number of micro-steps."
        )
