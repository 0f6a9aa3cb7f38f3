"""Checkpoints written in the background: the state copied at the step boundary, the files later.

`save_in_background` keeps every guarantee of `bigbatch.train.checkpoint.save` (docs/design.md,
invariant 5): at the step boundary the ranks copy the training state and the weights into CPU
memory (what training changes next cannot reach the copy) and rank 0 creates the temporary
directory; then a thread writes the files, hashes them into ``meta.json``, fsyncs and renames the
directory into place, and prunes older checkpoints only after that (`finish_in_background`).
Shards are written by `torch.distributed.checkpoint.save` in that thread on every rank, over a
gloo group of their own; plain weights by the writer process of `bigbatch.train.checkpoint_writer`
where one runs (rank 0's thread elsewhere), which finishes them the same way. The writing runs no
collective of the run's process group: its outcome is agreed on by every rank later, at a step
boundary (`PendingSave.settle`), so a full disk is the same one line on every rank then.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from bigbatch.core import distributed
from bigbatch.train import checkpoint_files as files
from bigbatch.train.checkpoint import begin_checkpoint, finish_checkpoint, prepare_temporary
from bigbatch.train.checkpoint_agreement import agree, with_storage_cause
from bigbatch.train.checkpoint_weights import cpu_copy
from bigbatch.train.rundir import storage_errors

logger = logging.getLogger(__name__)


class Task(Protocol):
    """A write under way (a thread's future, or a job of the writer process)."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...  # waits; raises the write's failure


class PendingSave:
    """A checkpoint whose files are being written in the background, on this rank.

    Attributes:
        path: the checkpoint's directory once it is complete.
        error: why this rank's part failed (None: not failed, or not known yet).
    """

    def __init__(self, path: Path, task: Task) -> None:
        self.path = path
        self.error: BaseException | None = None
        self._task = task
        self._known = False

    @property
    def done(self) -> bool:
        """This rank's part is over (written or failed)."""
        return self._task.done()

    def wait_here(self) -> BaseException | None:
        """Wait for this rank's part, with no collective (for a run ending on an error); its
        failure, if any (logged)."""
        if not self._known:
            try:
                self._task.result()
            except BaseException as error:  # noqa: BLE001 - kept for the step boundary
                self.error = error
                logger.warning("checkpoint %s failed in the background: %s", self.path, error)
            self._known = True
        return self.error

    def settle(self, *, block: bool) -> bool:
        """Whether the save is over on every rank; call on every rank at the same step boundary.

        One small all-reduce (whether any rank is still writing), and once none is, the
        agreement on the outcome: a failure anywhere raises on every rank, a storage error as
        the same one line (`StorageError`). ``block`` first waits for this rank's part.
        """
        if block:
            self.wait_here()
        if distributed.is_initialized() and distributed.get_world_size() > 1:
            writing = torch.tensor([0 if self.done else 1], dtype=torch.int64)
            if int(distributed.all_reduce_max(writing).item()):
                return False
        elif not self.done:
            return False
        agree(self.wait_here(), None)
        return True


def finish_in_background(
    directory: Path,
    tmp: Path,
    final: Path,
    step: int,
    training_state: dict[str, Any],
    finish_weights: Callable[[], None],
    *,
    main: bool = True,
    sharded: bool = False,
    keep: int | None = 3,
) -> None:
    """What a background save does once its copy is made: the weights (``finish_weights``), then
    on rank 0 the training state, meta.json and the rename, and the pruning only after; the
    temporary directory is removed when anything fails."""
    try:
        finish_weights()
        if main:
            finish_checkpoint(tmp, final, step, training_state, sharded)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main and keep is not None:
        files.prune(directory, keep, final)


def save_in_background(
    directory: Path,
    step: int,
    training_state: Callable[[], dict[str, Any]],
    stage_weights: Callable[[], Any],
    write_staged: Callable[[Path, Any], Callable[[], None]],
    *,
    sharded: bool = False,
    keep: int | None = 3,
    writer: ThreadPoolExecutor | None = None,
) -> PendingSave:
    """Copy the checkpoint of ``step`` now and write it in the background; every rank.

    Args:
        directory: where the ``step-*`` directories live (created if missing).
        step: optimizer steps completed.
        training_state: builds the training state, on rank 0 only (copied at once).
        stage_weights: a CPU copy of the weights (and optimizer), on every rank.
        write_staged: ``write_staged(tmp, staged)`` starts writing the copy into the temporary
            directory and returns the call that finishes it (run in the background thread).
        sharded: recorded in ``meta.json``.
        keep: how many checkpoints to keep (the newest by step); None keeps all.
        writer: the one thread that writes this caller's saves, one at a time (None: a thread
            for this save alone).

    Returns:
        The save under way; `PendingSave.settle` tells every rank its outcome.

    Raises:
        StorageError: on every rank, one line, when the copy or the temporary directory fails on
            any rank (what fails later is raised by `PendingSave.settle`).
    """
    directory, final, phase = begin_checkpoint(directory, step, keep)
    main = distributed.is_main_process()
    state: dict[str, Any] = {}  # rank 0's copy
    staged: list[Any] = []  # this rank's copy of the weights

    def prepare() -> str:
        state.update(cpu_copy(training_state(), "training_state"))  # checked as it is copied
        return prepare_temporary(directory, final, state, checked=True)

    tmp = directory / phase.on_main(prepare)
    try:
        phase.everywhere(lambda: staged.append(stage_weights()))
        finish_weights: list[Callable[[], None]] = []
        phase.everywhere(lambda: finish_weights.append(write_staged(tmp, staged.pop())))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def write() -> None:
        with storage_errors(phase.action, phase.hint):
            with_storage_cause(
                lambda: finish_in_background(
                    directory,
                    tmp,
                    final,
                    step,
                    state,
                    finish_weights[0],
                    main=main,
                    sharded=sharded,
                    keep=keep,
                )
            )
        if main:
            logger.info("saved checkpoint %s in the background%s", final, _sharded(sharded))

    if writer is not None:
        return PendingSave(final, writer.submit(write))
    alone = ThreadPoolExecutor(1, thread_name_prefix="bigbatch-checkpoint")
    pending = PendingSave(final, alone.submit(write))
    alone.shutdown(wait=False)  # its thread ends once this write is over
    return pending


def _sharded(sharded: bool) -> str:
    return " (sharded)" if sharded else ""
