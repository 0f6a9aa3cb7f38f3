"""Stopping on a signal: a checkpoint of the last step, then a prompt exit every rank agrees on.

Clusters send SIGTERM (or, with SLURM's ``--signal``, SIGUSR1) before they take a node back, and
people press Ctrl-C. `StopSignals` installs handlers that only record the request; the trainer
asks `StopSignals.agreed` at every step boundary (one small all-reduce, so one rank receiving the
signal is enough), saves a checkpoint of that step and raises `RunStopped`, which the command line
turns into one line and exit code 128 + the signal's number. A second Ctrl-C aborts at once: the
first one gives SIGINT back its default action, which the kernel carries out even while Python is
busy in a long operator.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch

from bigbatch.core import distributed

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class RunStopped(Exception):
    """The run stopped on a signal after saving a checkpoint of its last completed step.

    Attributes:
        signal_number: the signal that asked for the stop.
        step: optimizer steps completed (the checkpoint's step).
        total_steps: the run's planned steps.
        checkpoint: the checkpoint directory to resume from (None without a run directory).
        exit_code: 128 + signal_number, what a shell reports for a process ended by that signal.
    """

    def __init__(
        self, signal_number: int, step: int, total_steps: int, checkpoint: Path | None
    ) -> None:
        self.signal_number, self.step, self.total_steps = signal_number, step, total_steps
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no run directory"
        super().__init__(
            f"stopped by {signal_name(signal_number)} after step {step} of {total_steps} ({saved})"
        )


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15, or the number for a signal without a name here."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class StopSignals:
    """Handlers that record a stop request; `agreed` tells every rank at a step boundary.

    A context manager: it installs the handlers on entry (only in the main thread, the only one
    Python lets handle signals) and puts the previous ones back on exit.

    Args:
        names: the signals to handle, e.g. ``["SIGTERM", "SIGINT", "SIGUSR1"]``.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.signals = [signal.Signals[name] for name in names]
        self.received = 0
        self._previous: dict[signal.Signals, Handler] = {}
        self._announce = distributed.is_main_process()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not the main thread: %s keep their actions", self.signals)
            return self
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        """Record the first request; only async-signal-safe work here (no locks, no logging)."""
        if not self.received:
            self.received = number
            if self._announce:
                again = " (Ctrl-C again aborts at once, unsaved)" if number == signal.SIGINT else ""
                text = (
                    f"\nbigbatch: {signal_name(number)} received: stopping after this step, "
                    f"with a checkpoint{again}\n"
                )
                os.write(2, text.encode())
        if number == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process

    @property
    def active(self) -> bool:
        """True when there are signals to watch (every rank has the same config)."""
        return bool(self.signals)

    def agreed(self) -> int:
        """The signal any rank received (0: none), the same on every rank.

        One all-reduce of one number under torch.distributed: call it on every rank at the same
        step boundary.
        """
        if distributed.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        return int(distributed.all_reduce_max(flag).item())
