"""The process that writes plain checkpoints in the background.

A background save in a thread of the training process competes with training for one
interpreter lock: pickling ``state.pt`` and converting the weights for safetensors is Python, and
so is the dispatch of a small model's kernels, so the two take turns and the save costs its whole
CPU time even with a core idle (docs/performance.md, section 10). Here the training thread only
copies the tensors into shared memory (`bigbatch.train.checkpoint_arena`) and sends the
structure; a writer process, started once per run and kept, writes the files, fsyncs, hashes,
renames into place and prunes, exactly as the thread did (`checkpoint_async`), with its
own interpreter on another core. Its outcome comes back by job number and is agreed on by every
rank at a later step boundary, as before.

Each checkpointer starts its own writer (`Checkpointer.start_writer`) and ends it with the run.
The writer runs in a session of its own (a Ctrl-C or a launcher's signal reaches the training
process, which decides), ends when the training process closes the channel or dies, and abandons a
job whose training process is gone. Until it is ready (its import, about 2 s), and where one
cannot start, a thread of the training process writes the jobs from the same shared block: a
short run never waits for the writer.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from socket import socketpair
from typing import Any

import torch

from bigbatch.train.checkpoint import begin_checkpoint, prepare_temporary
from bigbatch.train.checkpoint_arena import Arena, Staged, fill, open_block, tensors_of
from bigbatch.train.checkpoint_async import PendingSave, finish_in_background
from bigbatch.train.checkpoint_weights import MODEL_FILE, write_safetensors
from bigbatch.train.rundir import storage_errors

logger = logging.getLogger(__name__)

_BOOTSTRAP = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
    "from bigbatch.train.checkpoint_writer import serve; "
    "serve(int(sys.argv[2]), json.loads(sys.argv[3]))"
)
_READY = -1  # the job number of the writer's first message: imports done
_KEPT_BLOCKS = 2  # mappings the writer keeps open (one a checkpointer; tests make several)


@dataclass(frozen=True)
class Job:
    """One checkpoint for the writer: the staged state and where its files go."""

    staged: Staged
    directory: str
    temporary: str
    final: str
    step: int
    keep: int | None
    parent: int  # the training process: a job whose parent is gone is abandoned


class WriterGone(OSError):
    """The writer process ended before it told how a job went."""


class WriterProcess:
    """The parent's end of one writer process: submit jobs, learn their outcomes.

    Args:
        preload: modules the writer imports before its first job (tests inject faults so).
    """

    def __init__(self, preload: Sequence[str] = ()) -> None:
        parent_end, child_end = socketpair()
        with child_end:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, json.dumps(sys.path), str(child_end.fileno())]
                + [json.dumps(list(preload))],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        self._channel = Connection(parent_end.detach())
        self._numbers = itertools.count(1)
        self._unanswered: set[int] = set()
        self._outcomes: dict[int, BaseException | None] = {}
        self.ready = False  # it has imported what it needs
        self.gone = False

    @property
    def pid(self) -> int:
        """The writer's process id."""
        return self._process.pid

    @property
    def exit_code(self) -> int | None:
        """How it ended (None: running; negative: the signal that killed it)."""
        return self._process.poll()

    def submit(self, job: Job) -> int:
        """Send ``job``; its number, for `done` and `result`."""
        number = next(self._numbers)
        self._unanswered.add(number)
        try:
            self._channel.send_bytes(pickle.dumps((number, job)))
        except OSError:
            self._ended()
        return number

    def done(self, number: int) -> bool:
        """Whether job ``number``'s outcome is known (without waiting)."""
        return self._collect(number, block=False)

    def result(self, number: int) -> None:
        """Wait for job ``number``; raise its failure (`WriterGone` if the writer ended)."""
        self._collect(number, block=True)
        error = self._outcomes.pop(number)
        if error is not None:
            raise error

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for it to have imported what it needs; whether it has."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect(_READY, block=False)
            if self.ready or self.gone or time.monotonic() >= deadline:
                return self.ready
            time.sleep(0.01)

    def close(self) -> None:
        """End the writer once the jobs sent are done (their outcomes are kept). Told in so
        many words: a process forked from this one (a DataLoader worker) may hold this end of
        the channel open, so the writer would not see it close."""
        for number in list(self._unanswered):
            self._collect(number, block=True)
        self._collect(_READY, block=False)
        if not self.ready:  # still importing, never given a job: no need to wait for it
            self._process.kill()
        with contextlib.suppress(OSError):  # it may have ended already
            self._channel.send_bytes(pickle.dumps(None))
        self._channel.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._ended()

    def _collect(self, number: int, *, block: bool) -> bool:
        while number not in self._outcomes:
            if self.gone:  # every job sent has its outcome (`_ended`); `_READY` has none
                return False
            if self._channel.poll(0.2 if block else 0):
                try:
                    answered, error = pickle.loads(self._channel.recv_bytes())
                except (EOFError, OSError):
                    self._ended()
                    continue
                if answered == _READY:
                    self.ready = True
                else:
                    self._unanswered.discard(answered)
                    self._outcomes[answered] = error
            elif self._process.poll() is not None:
                self._ended()
            elif not block:
                return False
        return True

    def _ended(self) -> None:
        self.gone = True
        try:  # its end of the channel closed as it died: it is about to be reaped
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"was killed by signal {-code}" if code and code < 0 else f"exited ({code})"
        for number in self._unanswered:
            self._outcomes[number] = WriterGone(
                f"the checkpoint writer process (pid {self.pid}) {how} before it finished"
            )
        self._unanswered.clear()


class _WriterTask:
    """A job's outcome as `PendingSave` reads it."""

    def __init__(self, writer: WriterProcess, number: int, job: Job, phase: Any) -> None:
        self._writer, self._number, self._job, self._phase = writer, number, job, phase
        self._over = False  # its outcome was taken (the writer forgets it then)

    def done(self) -> bool:
        return self._over or self._writer.done(self._number)

    def result(self) -> None:
        self._over = True
        with storage_errors(self._phase.action, self._phase.hint):
            self._writer.result(self._number)
        logger.info("saved checkpoint %s in the background", self._job.final)


def _write_here(job: Job, phase: Any) -> None:
    """A job written by this process (a thread of it), as the writer would have."""
    with storage_errors(phase.action, phase.hint):
        write_job(job, {})
    logger.info("saved checkpoint %s in the background (by a thread)", job.final)


class _Nothing:
    """The task of a rank with nothing to write (plain weights are rank 0's)."""

    def done(self) -> bool:
        return True

    def result(self) -> None:
        return None


def save_in_writer_process(
    directory: Path,
    step: int,
    training_state: Callable[[], dict[str, Any]],
    model_state: Callable[[], dict[str, torch.Tensor]],
    *,
    keep: int | None,
    arena: Arena,
    writer: Callable[[], WriterProcess | None],
    thread: Callable[[], ThreadPoolExecutor],
) -> PendingSave:
    """Stage the checkpoint of ``step`` into ``arena`` now and let ``writer()`` write it; every
    rank (rank 0 stages and writes, the others only agree). Where no writer process is ready
    (``writer()`` is None: it is starting, or none can run), a thread of ``thread()`` writes
    the job from the same block instead. Returns the save under way.

    Raises:
        StorageError: on every rank, one line, when the temporary directory cannot be made.
        TypeError: the training state would not load with ``weights_only=True`` (on rank 0).
    """
    directory, final, phase = begin_checkpoint(directory, step, keep)
    jobs: list[Job] = []

    def prepare() -> str:
        staged = arena.stage(training_state(), model_state())
        name = prepare_temporary(directory, final, {}, checked=True)
        where = (str(directory), str(directory / name), str(final))
        jobs.append(Job(staged, *where, step, keep, os.getpid()))
        return name

    phase.on_main(prepare)
    if not jobs:
        return PendingSave(final, _Nothing())
    process = writer()
    if process is None:
        return PendingSave(final, thread().submit(_write_here, jobs[0], phase))
    return PendingSave(final, _WriterTask(process, process.submit(jobs[0]), jobs[0], phase))


def write_job(job: Job, blocks: dict[str, mmap.mmap]) -> None:
    """Write one job's checkpoint from its block (mapped once, kept in ``blocks``)."""
    reference = job.staged.block
    memory = blocks.get(reference.name)
    if memory is None:
        memory = blocks[reference.name] = open_block(reference)
        for name in list(blocks)[:-_KEPT_BLOCKS]:  # the oldest first
            del blocks[name]
    tensors = tensors_of(job.staged, memory)
    weights = fill(job.staged.model_state, tensors)
    temporary = Path(job.temporary)

    def write_weights() -> None:
        _check_parent(job)
        write_safetensors(temporary / MODEL_FILE, weights)
        _check_parent(job)  # the last moment before the rename

    finish_in_background(
        Path(job.directory),
        temporary,
        Path(job.final),
        job.step,
        fill(job.staged.training_state, tensors),
        write_weights,
        keep=job.keep,
    )


class _ParentGone(Exception):
    """The training process ended: its checkpoint is abandoned."""


def _check_parent(job: Job) -> None:
    if os.getppid() != job.parent and job.parent != os.getpid():
        raise _ParentGone(f"the training process {job.parent} is gone")


def serve(channel: int, preload: list[str]) -> None:
    """The writer process: jobs in, outcomes out, until the channel closes or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides
    torch.set_num_threads(1)
    for name in preload:
        importlib.import_module(name)
    connection = Connection(channel)
    parent = os.getppid()
    blocks: dict[str, mmap.mmap] = {}  # in the order first used
    try:
        connection.send_bytes(pickle.dumps((_READY, None)))
    except OSError:
        return  # the training process was done with it before it was ready
    while True:
        try:
            if not connection.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            message = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            return
        if message is None:  # the training process is done with it
            return
        number, job = message
        error = None
        try:
            write_job(job, blocks)
        except BaseException as caught:  # noqa: BLE001 - told to the training process
            error = _portable(caught)
        try:
            connection.send_bytes(pickle.dumps((number, error)))
        except OSError:
            return


def _portable(error: BaseException) -> BaseException:
    """``error`` as the training process can unpickle it (else a RuntimeError naming it)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    return error
