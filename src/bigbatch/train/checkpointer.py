"""The checkpointer: the model, the optimizer and every registered Stateful participant, saved and
restored through the one save path of `bigbatch.train.checkpoint`.

Anything with state registers under a name (``checkpointer.register("data", loader)``, as
torchtitan's checkpointer takes Stateful objects); its ``state_dict()`` is stored under that name
in the training state and handed back to its ``load_state_dict`` on resume, so a new participant
never touches save or restore code. Plain or sharded is a `checkpoint_weights` strategy chosen
once; the RNG of every rank is saved and this rank's restored (docs/design.md, invariant 5).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from bigbatch.core import distributed
from bigbatch.train import checkpoint, checkpoint_arena, checkpoint_writer
from bigbatch.train.checkpoint import Checkpoint
from bigbatch.train.checkpoint_agreement import agree_on_candidate, dcp_failures, one_line
from bigbatch.train.checkpoint_async import PendingSave, save_in_background
from bigbatch.train.checkpoint_rng import gather_rng_states, restore_rng_states
from bigbatch.train.checkpoint_weights import weights_format
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

RESERVED = frozenset({"optimizer", "rng", "world_size"})
"""Training-state keys the checkpointer writes itself: no participant or extra may take them."""


@runtime_checkable
class Stateful(Protocol):
    """What takes part in a checkpoint: its state as tensors, numbers, strings, lists and dicts
    (what ``torch.load(weights_only=True)`` reads back), and the way back from it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Saves and restores a run's checkpoints: model, optimizer, participants and RNG.

    Args:
        directory: where the ``step-*`` checkpoint directories go (``run_dir/checkpoints``).
        model: the module whose weights are saved (unwrapped from DDP; FSDP2-sharded when sharded).
        optimizer: over the model's parameters.
        sharded: write through `torch.distributed.checkpoint` (each rank its shard) instead of
            safetensors from rank 0; a checkpoint is read back in the format it was written in.
        keep: how many checkpoints to keep (the newest); None keeps all.
        collective_timeout_s: how long a background upload of shards waits for a rank in its
            own process group (the run's ``collective_timeout``; torch's default is 30 min).

    World size and rank come from torch.distributed. `save` and `restore` are called on every
    rank. `save` writes the checkpoint before it returns; `save_in_background` copies it and
    writes it in the background (plain weights: rank 0's copy in shared memory, written by the
    writer process, `bigbatch.train.checkpoint_writer`; shards: each rank's copy, written by a
    thread, `bigbatch.train.checkpoint_async`), its outcome told by `poll` at a later step
    boundary, `wait`, or the next save.

    Example:
        >>> import tempfile
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> class Counter:
        ...     def __init__(self) -> None:
        ...         self.count = 0
        ...     def state_dict(self) -> dict[str, Any]:
        ...         return {"count": self.count}
        ...     def load_state_dict(self, state: dict[str, Any]) -> None:
        ...         self.count = int(state["count"])
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     saving = Checkpointer(Path(directory), model=model, optimizer=optimizer)
        ...     saving.register("counter", counter := Counter())
        ...     counter.count = 7
        ...     path = saving.save(3)
        ...     restoring = Checkpointer(Path(directory), model=model, optimizer=optimizer)
        ...     restoring.register("counter", again := Counter())
        ...     found = checkpoint.load_latest_checkpoint(Path(directory))
        ...     restoring.restore(found)
        ...     (path.name, again.count)
        ('step-00000003', 7)
    """

    def __init__(
        self,
        directory: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sharded: bool = False,
        keep: int | None = 3,
        collective_timeout_s: float = 600.0,
    ) -> None:
        self.directory = Path(directory)
        self.model, self.optimizer = model, optimizer
        self.weights = weights_format(sharded, collective_timeout_s)
        self.keep = keep
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self._participants: dict[str, Stateful] = {}
        self._pending: PendingSave | None = None  # the save writing in the background
        self._thread_pool: ThreadPoolExecutor | None = None  # its thread, started with the first
        self._arena: checkpoint_arena.Arena | None = None  # for the writer process (plain)
        self._process: checkpoint_writer.WriterProcess | None = None  # that process (rank 0)
        self._writer_failed = False  # one could not start: warned once

    @property
    def participants(self) -> Mapping[str, Stateful]:
        """The registered participants by name, in registration (and restore) order."""
        return dict(self._participants)

    def register(self, name: str, participant: Stateful) -> None:
        """Take part in every checkpoint under ``name``; restored in registration order.

        Raises:
            TypeError: it has no state_dict / load_state_dict.
            ValueError: the name is empty, reserved, or taken.
        """
        if not isinstance(participant, Stateful):
            raise TypeError(
                f"checkpoint participant {name!r} is a {type(participant).__name__} without "
                "state_dict() and load_state_dict(state): give it both (or wrap it)"
            )
        if not isinstance(name, str) or not name or name in RESERVED:
            raise ValueError(
                f"checkpoint participant name {name!r}: give a non-empty name other than "
                f"{', '.join(sorted(RESERVED))}"
            )
        if name in self._participants:
            raise ValueError(f"checkpoint participant {name!r} is registered already")
        self._participants[name] = participant

    def save(self, step: int, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the checkpoint of ``step`` (call on every rank); returns its directory.

        Args:
            step: optimizer steps completed.
            extra: more values for the training state (config, plan, total_steps, ...), under
                names no participant takes.

        Waits for a save still writing in the background first.

        Raises:
            StorageError: one line on every rank when any rank could not write (this save, or
                the one that was writing in the background).
        """
        self.wait()
        rng = gather_rng_states(self.world_size)  # a collective: every rank's generators
        return checkpoint.save(
            self.directory,
            step,
            lambda: self._training_state(extra or {}, rng),  # on rank 0, which writes it
            lambda tmp: self.weights.write(tmp, self.model, self.optimizer),
            sharded=self.weights.sharded,
            keep=self.keep,
        )

    def save_in_background(self, step: int, extra: Mapping[str, Any] | None = None) -> Path:
        """Copy the checkpoint of ``step`` now and write it in the background (call on every
        rank); returns the directory it will have once complete.

        At most one save is in flight: this one first waits for the previous one. Its outcome
        is learned at a later step boundary (`poll`), or by `wait` or the next save.

        Raises:
            StorageError: one line on every rank when the previous save failed, or this one
                could not start (copying, the temporary directory).
        """
        self.wait()
        rng = gather_rng_states(self.world_size)  # a collective: every rank's generators
        state = lambda: self._training_state(extra or {}, rng)  # noqa: E731 - rank 0, copied at once
        if self._plain_in_writer_process():
            self._arena = self._arena or checkpoint_arena.Arena()
            self._pending = checkpoint_writer.save_in_writer_process(
                self.directory,
                step,
                state,
                self.model.state_dict,
                keep=self.keep,
                arena=self._arena,
                writer=self._writer_process,
                thread=self._thread,
            )
            return self._pending.path
        self._pending = save_in_background(
            self.directory,
            step,
            state,
            lambda: self.weights.stage(self.model, self.optimizer),
            self.weights.write_staged,
            sharded=self.weights.sharded,
            keep=self.keep,
            writer=self._thread(),
        )
        return self._pending.path

    writer_preload: tuple[str, ...] = ()
    """Modules the writer process imports before its first job (the tests inject faults so)."""

    def start_writer(self) -> None:
        """Start the writer process of `save_in_background` now, where one will write (plain
        weights, rank 0), so that its start (torch's import, about 2 s on another core) is over
        by the first save instead of delaying the second."""
        if self._plain_in_writer_process() and distributed.is_main_process():
            self._writer_process()

    @property
    def writer_process(self) -> checkpoint_writer.WriterProcess | None:
        """The writer process started for this checkpointer (None: none yet, or not rank 0)."""
        return self._process

    def _writer_process(self) -> checkpoint_writer.WriterProcess | None:
        """Rank 0's writer, started at the first call and again after one that ended, once it
        is ready for a job; None while it starts (a save then goes to a thread rather than wait
        for it) and once one could not start (a thread writes from then on, with a warning)."""
        process = self._process
        if process is not None and process.gone:
            if not process.ready:
                if not self._writer_failed:
                    logger.warning(
                        "the checkpoint writer process could not start (exit %s): background "
                        "checkpoints are written by a thread of the training process",
                        process.exit_code,
                    )
                self._writer_failed = True
                return None
            process = None
        if process is None:
            process = self._process = checkpoint_writer.WriterProcess(self.writer_preload)
        return process if process.wait_ready(timeout=0) else None

    def _plain_in_writer_process(self) -> bool:
        return not self.weights.sharded and checkpoint_arena.available()

    def _thread(self) -> ThreadPoolExecutor:
        """The one thread that writes this checkpointer's background saves where no writer
        process does (sharded weights: DCP's writes need each rank's thread)."""
        if self._thread_pool is None:
            self._thread_pool = ThreadPoolExecutor(1, thread_name_prefix="bigbatch-checkpoint")
        return self._thread_pool

    def poll(self) -> Path | None:
        """At a step boundary (every rank): the checkpoint the background save completed since
        the last call, or None (none pending, or still writing). A small all-reduce while a
        save is pending, none otherwise.

        Raises:
            StorageError: one line on every rank when the background save failed on any rank.
        """
        return self._settle(block=False)

    def wait(self) -> Path | None:
        """Wait for the background save, if any, on every rank; its checkpoint, or None.

        Raises:
            StorageError: one line on every rank when it failed on any rank.
        """
        return self._settle(block=True)

    def _settle(self, *, block: bool) -> Path | None:
        pending = self._pending
        if pending is None:
            return None
        try:
            if not pending.settle(block=block):
                return None
        except BaseException:
            self._pending = None  # its failure is told once
            raise
        self._pending = None
        return pending.path

    def close(self) -> None:
        """Wait for this rank's part of a background save, with no collective, and end the
        writer: at the end of a run, also one that ends on an error (a failure of the save is
        logged, not raised over that error)."""
        if self._pending is not None:
            self._pending.wait_here()
            self._pending = None
        if self._thread_pool is not None:
            self._thread_pool.shutdown()
            self._thread_pool = None
        if self._process is not None and not self._process.gone:
            self._process.close()
        self._process = None

    def _training_state(self, extra: Mapping[str, Any], rng: list[Any]) -> dict[str, Any]:
        """Every participant's state under its name, beside extra, the optimizer and the RNG."""
        taken = sorted(extra.keys() & (self._participants.keys() | RESERVED))
        if taken:
            raise ValueError(f"checkpoint extra {taken} would overwrite a participant's state")
        state: dict[str, Any] = dict(extra)
        for name, participant in self._participants.items():
            state[name] = participant.state_dict()
        state.update(self.weights.training_state(self.optimizer))
        state.update(rng=rng, world_size=self.world_size)
        return state

    def restore(self, found: Checkpoint) -> None:
        """Load a validated checkpoint (see `bigbatch.train.resume.load`); call on every rank.

        The model and optimizer in the format the checkpoint was written in (resharded to this
        run's ranks when sharded), every registered participant whose state it holds, and this
        rank's RNG (rank 0's, with a warning, when the world size changed). The ranks agree on
        the outcome, so a failure on one rank is the same error on every rank.

        Raises:
            DamagedCheckpoint: it failed to load on some rank (its files changed since they were
                checked, a participant refused its state): one line on every rank; the caller
                sets it aside and tries the previous one (`bigbatch.train.resume`).
        """
        error, reason = None, None
        try:
            self._restore(found)
        except BaseException as caught:  # noqa: BLE001 - DCP's CheckpointException is one
            failures = dcp_failures(caught)  # every rank's failure, the same everywhere
            if not (failures or isinstance(caught, Exception)):
                raise  # KeyboardInterrupt, SystemExit
            error = caught
            if failures:
                rank, cause = min(failures.items(), key=lambda item: item[0])
                reason = f"{one_line(cause)} (rank {rank})"
        reason = agree_on_candidate(error, reason)
        if reason is not None:
            raise DamagedCheckpoint(found.path, reason) from error

    def _restore(self, found: Checkpoint) -> None:
        saved = found.training_state
        weights_format(found.sharded).load(
            found.path, found.model_state, saved, self.model, self.optimizer
        )
        for name, participant in self._participants.items():
            if name in saved:
                participant.load_state_dict(saved[name])
            else:
                logger.info("resume: %s holds no state of %r: it starts afresh", found.path, name)
        restore_rng_states(saved["rng"], self.rank, self.world_size, saved.get("world_size"))


class DamagedCheckpoint(UsageError):
    """A checkpoint that passed its checks but failed to restore on some rank (every rank
    raises it alike): set it aside and use the previous one."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"resume: cannot restore {path}: {reason}; move it aside to resume from the previous "
            "checkpoint"
        )
        self.path, self.reason = path, reason
