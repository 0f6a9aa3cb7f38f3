"""Global batches in tokens: which samples each step takes, whatever the split.

A sample's tokens are its input tokens: what the model reads of it (the dataset's `lengths`, or
the recipe's `sample_length`). Global batch t is the next samples of the seeded epoch order until
their tokens reach `global_batch_tokens`, decided from the lengths alone, so it is the same for any
world size or micro-batch (docs/design.md, invariant 3); how one global batch splits over ranks
and micro-batches is `bigbatch.data.token_plan`. The loss still averages over the items that
carry loss. No torch is needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bigbatch.data.sampler import GlobalBatchSampler
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


class TokenBatchSampler(GlobalBatchSampler):
    """The indices of each global batch in tokens: the next samples until the budget is reached.

    The epoch order is `GlobalBatchSampler`'s (seeded with (seed, epoch)); a global batch of
    budget B is the shortest run of the next samples whose tokens reach B (budget <= tokens <
    budget + its last sample), or the rest of the epoch (the short last global batch, dropped
    with drop_last when its tokens stay below B). The position is that of `GlobalBatchSampler`:
    (epoch, samples of the epoch used), so a resume is exact.

    Example:
        >>> sampler = TokenBatchSampler([3, 5, 2, 4], seed=0)
        >>> sampler.lengths[sampler.permutation(0)].tolist()
        [2, 3, 5, 4]
        >>> [sampler.lengths[sampler.next_global_batch_tokens(6)].tolist() for _ in range(2)]
        [[2, 3, 5], [4]]
    """

    def __init__(
        self, lengths: Sequence[int] | np.ndarray, *, seed: int, drop_last: bool = False
    ) -> None:
        self.lengths = check_lengths(lengths)
        super().__init__(len(self.lengths), seed=seed, drop_last=drop_last)
        self.num_tokens = int(self.lengths.sum())
        self._cumulative: tuple[int, np.ndarray] | None = None

    def cumulative(self, epoch: int) -> np.ndarray:
        """Tokens of the first i + 1 samples of the epoch's order, for every i."""
        if self._cumulative is None or self._cumulative[0] != epoch:
            self._cumulative = (epoch, np.cumsum(self.lengths[self.permutation(epoch)]))
        return self._cumulative[1]

    def locate(self, global_batch_tokens: int) -> tuple[int, int, int]:
        """(epoch, start, stop) of the next global batch of this budget; the state is unchanged."""
        budget = check_tokens("global_batch_tokens", global_batch_tokens)
        assert budget is not None
        if self.drop_last and budget > self.num_tokens:
            raise UsageError(
                f"global_batch_tokens {budget} is more than the dataset's {self.num_tokens} "
                "tokens with drop_last: every batch would be dropped; use drop_last false or a "
                "smaller global_batch_tokens"
            )
        epoch, start = self.epoch, self.position
        cumulative = self.cumulative(epoch)
        before = int(cumulative[start - 1]) if start else 0
        left = int(cumulative[-1]) - before
        if start == self.num_samples or (self.drop_last and left < budget):
            epoch, start, before = epoch + 1, 0, 0
            cumulative = self.cumulative(epoch)
        last = int(np.searchsorted(cumulative, before + budget, side="left"))
        return epoch, start, min(last + 1, self.num_samples)

    def advance_tokens(self, global_batch_tokens: int) -> tuple[int, int, int]:
        """Move past the next global batch of this budget: (epoch, start, stop)."""
        epoch, start, stop = self.locate(global_batch_tokens)
        self.epoch, self.position = epoch, stop
        return epoch, start, stop

    def next_epoch_tokens(self, global_batch_tokens: int) -> int:
        """The epoch the next global batch of this budget would come from (state unchanged)."""
        return self.locate(global_batch_tokens)[0]

    def next_global_batch_tokens(self, global_batch_tokens: int) -> np.ndarray:
        """The dataset indices of the next global batch of this budget."""
        epoch, start, stop = self.advance_tokens(global_batch_tokens)
        return self.permutation(epoch)[start:stop]


def count_token_steps(
    lengths: Sequence[int] | np.ndarray,
    epochs: int,
    global_batch_tokens_at: Callable[[int], int],
    *,
    seed: int,
    drop_last: bool = False,
) -> int:
    """How many optimizer steps `epochs` passes take under a (possibly changing) token budget.

    Unlike a run in samples, the count depends on the seed: how the epoch's samples fall into
    budgets follows their order.
    """
    sizes = token_batch_sizes(
        lengths, global_batch_tokens_at, epochs=epochs, seed=seed, drop_last=drop_last
    )
    return len(sizes)


def token_batch_sizes(
    lengths: Sequence[int] | np.ndarray,
    global_batch_tokens_at: Callable[[int], int],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> list[tuple[int, int]]:
    """(samples, tokens) of each global batch of a run of `epochs` passes or `steps` steps."""
    sampler = TokenBatchSampler(lengths, seed=seed, drop_last=drop_last)
    sizes: list[tuple[int, int]] = []
    while steps is None or len(sizes) < steps:
        budget = global_batch_tokens_at(len(sizes))
        if epochs is not None and sampler.next_epoch_tokens(budget) >= epochs:
            break
        epoch, start, stop = sampler.advance_tokens(budget)
        cumulative = sampler.cumulative(epoch)
        tokens = int(cumulative[stop - 1]) - (int(cumulative[start - 1]) if start else 0)
        sizes.append((stop - start, tokens))
    return sizes
