"""Rank divergence: every rank checks that all ranks still hold the same weights.

Under DDP every rank must hold bit-identical parameters after every step. A gradient sync that
was silently skipped (a forward or backward outside the DDP-wrapped model) or a rank that changed
its weights alone breaks that without any error. `DivergenceCheck` makes it loud: after the first
step and every N steps each rank puts its parameter checksum into its own slot of a small vector,
the vector rides along in the step's one SUM all-reduce, and every rank then sees every rank's
checksum exactly and raises `RankDivergenceError` when they differ.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from bigbatch.core import distributed

# Parameter bits are summed as integers: exact and independent of the summation order, so equal
# weights give equal checksums on every rank; reduced modulo 2**52 to travel exactly in float64.
_CHECKSUM_MODULUS = 2**52
VALUES_PER_RANK = 2  # the float64 sum of the parameters (readable) and the exact bit checksum


class RankDivergenceError(RuntimeError):
    """The ranks hold different parameters: they no longer train the same model."""


def parameter_checksums(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """(float64 sum of every parameter value, exact checksum of their bits) as a float64 tensor.

    The bit checksum adds the parameters' bit patterns (as 16- or 32-bit integers) in int64, so it
    changes with any changed bit and does not depend on the order of the summation. No host sync.
    """
    tensors = [p.detach() for p in parameters]
    if not tensors:
        raise ValueError("no parameters to checksum")
    device = tensors[0].device
    value_sum = torch.zeros((), dtype=torch.float64, device=device)
    bit_sum = torch.zeros((), dtype=torch.int64, device=device)
    for tensor in tensors:
        flat = tensor.reshape(-1)
        value_sum += flat.sum(dtype=torch.float64).to(device)
        size = flat.element_size()
        bits_type = torch.int32 if size in (4, 8) else torch.int16 if size == 2 else torch.int8
        bit_sum += flat.view(bits_type).sum(dtype=torch.int64).to(device)
    bits = torch.remainder(bit_sum, _CHECKSUM_MODULUS).to(torch.float64)
    return torch.stack([value_sum, bits])


class DivergenceCheck:
    """Compares a parameter checksum over the ranks after the first step and every N steps.

    Use it inside a step's small SUM all-reduce: append `local(steps_done)` to the reduced vector
    on every rank, then give the reduced slice to `check`. Outside the engine, `compare` runs its
    own small all-reduce. All ranks must call it with the same steps_done.

    Args:
        parameters: the parameters to compare (the model's, identical on every rank under DDP;
            never shards, as under FSDP).
        every_n_steps: compare after step 1 and then after every n-th step.
        world_size: number of ranks; defaults to the process group's.
        rank: this rank; defaults to the process group's.

    Example:
        >>> check = DivergenceCheck(torch.nn.Linear(2, 1).parameters(), every_n_steps=10)
        >>> [steps for steps in range(25) if check.is_due(steps)]
        [1, 10, 20]
        >>> check.compare(steps_done=1)  # one process: nothing to disagree with
    """

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        *,
        every_n_steps: int = 100,
        world_size: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("no parameters to compare over the ranks")
        self.every_n_steps = every_n_steps
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        self.rank = distributed.get_rank() if rank is None else rank
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    @property
    def size(self) -> int:
        """Length of the vector `local` returns when the comparison is due."""
        return VALUES_PER_RANK * self.world_size

    def is_due(self, steps_done: int) -> bool:
        """True after the first step and after every n-th step."""
        return steps_done == 1 or (steps_done > 0 and steps_done % self.every_n_steps == 0)

    def local(self, steps_done: int) -> torch.Tensor:
        """This rank's slot of the vector to SUM over ranks (zeros elsewhere); empty when not due.

        The slot layout makes the sum carry every rank's checksum exactly: each rank writes only
        its own two entries.
        """
        device = self.parameters[0].device
        if not self.is_due(steps_done):
            return torch.zeros(0, dtype=torch.float64, device=device)
        vector = torch.zeros(self.size, dtype=torch.float64, device=device)
        start = VALUES_PER_RANK * self.rank
        vector[start : start + VALUES_PER_RANK] = parameter_checksums(self.parameters)
        return vector

    def check(self, reduced: torch.Tensor, steps_done: int) -> None:
        """Raise `RankDivergenceError` when the summed vector shows differing checksums.

        Args:
            reduced: the all-reduced (summed) output of `local`; an empty tensor is a step
                without a comparison.
            steps_done: the optimizer steps the compared parameters have seen (for the message).
        """
        if reduced.numel() == 0:
            return
        if reduced.numel() != self.size:
            raise ValueError(
                f"expected the summed checksums of {self.world_size} ranks ({self.size} values), "
                f"got {reduced.numel()}"
            )
        rows = reduced.detach().double().view(self.world_size, VALUES_PER_RANK).tolist()
        bits = [row[1] for row in rows]
        if len(set(bits)) == 1:
            return
        majority = max(set(bits), key=bits.count)
        odd = [str(rank) for rank, value in enumerate(bits) if value != majority]
        blame = (
            f"rank(s) {', '.join(odd)} differ from the others"
            if bits.count(majority) * 2 > len(bits)
            else "no majority agrees"
        )
        listing = ", ".join(
            f"rank {rank}: sum {row[0]:.10g}, bits {int(row[1]):#x}"
            for rank, row in enumerate(rows)
        )
        raise RankDivergenceError(
            f"the ranks hold different parameters after step {steps_done}: {listing}; {blame}. "
            "They no longer train the same "
            "model: a gradient sync was skipped (a forward or backward that did not go through "
            "the DistributedDataParallel-wrapped model) or a rank changed its weights alone. "
            "Stop, fix the loop, and resume from the last checkpoint written before the divergence"
        )

    def compare(self, steps_done: int) -> None:
        """Check now with a small all-reduce of its own (a no-op when not due or alone)."""
        if self.world_size == 1 or not self.is_due(steps_done):
            return
        vector = self.local(steps_done)
        distributed.all_reduce_sum(vector)
        self.check(vector, steps_done)


class DivergenceStatistic:
    """The check as one of the engine's window statistics: the checksums ride the step's one
    small all-reduce (`bigbatch.core.window.WindowStatistics`), so checking costs no collective.

    The checksums are taken after the window's backward, before its optimizer step: the
    parameters every rank started the step from.
    """

    host_sums = True

    def __init__(self, check: DivergenceCheck) -> None:
        self.check = check
        self.steps_done = 0

    def begin_window(self) -> None:
        pass

    def begin_micro_step(self) -> None:
        pass

    def end_micro_step(self, num_items: float | torch.Tensor) -> None:
        pass

    def local_statistics(self, backward_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        return self.check.local(self.steps_done)

    def end_window(
        self, reduced: torch.Tensor | None = None, *, num_items: int = 0, grad_norm: float = 0.0
    ) -> None:
        if reduced is not None:
            self.check.check(reduced, self.steps_done)
        self.steps_done += 1

    def abort_window(self) -> None:
        pass

    def remove(self) -> None:
        pass
