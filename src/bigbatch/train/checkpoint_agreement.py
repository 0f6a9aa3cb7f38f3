"""How the ranks agree on the outcome of each phase of a checkpoint's save or load.

Every rank reaches every agreement (one small collective), so none waits in a collective for a
rank that gave up, and a failure on one rank is the same error on every rank: a storage error
(full disk, read-only directory) as one line (docs/design.md, invariants 5 and 6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import safetensors
import torch.distributed as dist

from bigbatch.core import distributed
from bigbatch.train.rundir import StorageError, storage_errors
from bigbatch.units import UsageError


class Phases:
    """Runs each phase of a save on rank 0 or on every rank, then lets every rank learn whether
    it failed anywhere: every rank reaches every agreement, so none waits in a collective for a
    rank that gave up (a rank that dies or hangs is bounded by the process group's timeout, and
    torchrun ends the others when one exits). A storage error becomes the same line everywhere.
    """

    def __init__(self, action: str, hint: str) -> None:
        self.action, self.hint = action, hint

    def on_main(self, work: Callable[[], Any]) -> Any:
        """``work`` on rank 0; its result on every rank."""
        return self._run(work, distributed.is_main_process())

    def everywhere(self, work: Callable[[], Any]) -> Any:
        """``work`` on every rank; rank 0's result on every rank."""
        return self._run(work, True)

    def _run(self, work: Callable[[], Any], here: bool) -> Any:
        result, error = None, None
        if here:
            try:
                with storage_errors(self.action, self.hint):
                    result = with_storage_cause(work)
            except BaseException as caught:  # noqa: BLE001 - every rank must hear of it
                error = caught
        return agree(error, result)


def with_storage_cause(work: Callable[[], Any]) -> Any:
    """``work()``; DCP's CheckpointException (every rank's failures, with tracebacks) becomes
    the I/O error underneath, which `storage_errors` turns into one line."""
    try:
        return work()
    except BaseException as error:
        failures = dcp_failures(error)
        for rank, cause in sorted(failures.items()):
            if isinstance(cause, OSError | safetensors.SafetensorError):
                if isinstance(cause, OSError):
                    cause.strerror = f"{cause.strerror or cause} (rank {rank})"
                raise cause from None
        raise


def dcp_failures(error: BaseException) -> dict[int, BaseException]:
    """The per-rank exceptions inside a (possibly nested) DCP CheckpointException, else {}."""
    if type(error).__name__ != "CheckpointException":  # cheap test before importing DCP
        return {}
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(error, CheckpointException):
        return {}
    found: dict[int, BaseException] = {}
    for rank, (cause, _) in error.failures.items():
        found.update(dcp_failures(cause) or {rank: cause})
    return found


def agree(error: BaseException | None, result: Any) -> Any:
    """Every rank's outcome to every rank: raise if any failed, else return rank 0's result."""
    message = None
    if isinstance(error, StorageError):
        message = str(error)
    elif error is not None:  # the first line only: DCP's exceptions hold every rank's traceback
        message = one_line(error)
    mine = (message, isinstance(error, StorageError), result)
    outcomes = [mine]
    if distributed.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(outcomes, mine)
    storage = [message for message, is_storage, _ in outcomes if is_storage]
    if storage and not isinstance(error, StorageError):
        # A rank that could not write explains the others' failures (DCP's, on every rank).
        raise StorageError(storage[0]) from error
    if error is not None:
        raise error
    failed = [(rank, outcome[0]) for rank, outcome in enumerate(outcomes) if outcome[0] is not None]
    if failed:
        rank, message = failed[0]
        raise UsageError(f"rank {rank} could not save the checkpoint: {message}")
    return outcomes[0][2]


def agree_on_candidate(error: BaseException | None, reason: str | None = None) -> str | None:
    """Every rank's outcome with one checkpoint (call on every rank): None when it is good on
    every rank, else why it is damaged (the first failing rank's ``reason``, by default its
    error in one line, the rank named when others succeeded). A `UsageError` on any rank (another
    run's checkpoint) is raised on every rank."""
    mine = None
    if error is not None:
        usage = isinstance(error, UsageError)
        mine = (usage, str(error) if usage else reason or one_line(error))
    outcomes = on_every_rank(mine)
    usages = [outcome[1] for outcome in outcomes if outcome is not None and outcome[0]]
    if usages:
        raise error if isinstance(error, UsageError) else UsageError(usages[0])
    failed = [(rank, outcome[1]) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return None
    rank, reason = failed[0]
    return reason if len(failed) == len(outcomes) else f"{reason} (rank {rank})"


def one_line(error: BaseException) -> str:
    """``Type: the first line of the message`` (at most 300 characters of it)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def on_every_rank(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank (a collective when distributed over several ranks)."""
    if not (distributed.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_rank_0(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result on every rank."""
    if not (distributed.is_initialized() and dist.get_world_size() > 1):
        return work()
    return distributed.rank_0_value(work() if distributed.is_main_process() else None)
