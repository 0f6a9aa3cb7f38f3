"""Stopping on a signal: a checkpoint of the last step, then a prompt exit every rank agrees on.

Clusters send SIGTERM (or, with SLURM's ``--signal``, SIGUSR1) before they take a node back, and
people press Ctrl-C. `StopSignals` installs handlers that only record the request; the trainer
asks `StopSignals.agreed` before the first step, at every step boundary and once more after the
run's last files are written (one small all-reduce, so one rank receiving the signal is enough),
saves a checkpoint of that step and raises `RunStopped`, which the command line turns into one
line and exit code 128 + the signal's number. A second Ctrl-C aborts at once: the first one gives
SIGINT back its default action, which the kernel carries out even while Python is busy in a long
operator. Under torchrun, `LauncherWatch` sends its own process SIGTERM when the launcher dies, so
that workers left behind (each in a session of its own) stop with a checkpoint too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

import torch

from bigbatch.core import distributed

logger = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class RunStopped(Exception):
    """The run stopped on a signal at a step boundary; what it trained is in a checkpoint.

    Attributes:
        signal_number: the signal that asked for the stop.
        step: optimizer steps completed (the checkpoint's step).
        total_steps: the run's planned steps.
        checkpoint: the checkpoint to resume from (None: nothing saved, or no run directory).
        moment: ``"step"``: stopped after a step, its checkpoint saved; ``"start"``: the signal
            came before the first step of this session, nothing was trained or saved;
            ``"end"``: it came during the last step, the run finished (final checkpoint, weights
            and report written).
        run_dir: the run directory (None without one).
        summary: the finished run's summary (``moment == "end"`` only).
        exit_code: 128 + signal_number, what a shell reports for a process ended by that signal.
    """

    def __init__(
        self,
        signal_number: int,
        step: int,
        total_steps: int,
        checkpoint: Path | None,
        *,
        moment: Literal["step", "start", "end"] = "step",
        run_dir: Path | None = None,
        summary: Any = None,
    ) -> None:
        self.signal_number, self.step, self.total_steps = signal_number, step, total_steps
        self.checkpoint, self.moment, self.summary = checkpoint, moment, summary
        self.run_dir = run_dir if checkpoint is None else checkpoint.parent.parent
        self.exit_code = 128 + signal_number
        name = signal_name(signal_number)
        if moment == "end":
            text = (
                f"{name} received during the last step: the run finished all {total_steps} steps "
                f"(final checkpoint, weights and report in {self.run_dir})"
            )
        elif moment == "start":
            text = f"stopped by {name} before step {step + 1} of {total_steps}: nothing trained" + (
                f", the checkpoint of step {step} stays" if step else ", nothing saved"
            )
        else:
            saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no run directory"
            text = f"stopped by {name} after step {step} of {total_steps} ({saved})"
        super().__init__(text)


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15, or the number for a signal without a name here."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class StopSignals:
    """Handlers that record a stop request; `agreed` tells every rank at a step boundary.

    A context manager: it installs the handlers on entry (only in the main thread, the only one
    Python lets handle signals) and puts the previous ones back on exit. Under torchrun it also
    watches the launcher (`LauncherWatch`) for as long.

    Args:
        names: the signals to handle, e.g. ``["SIGTERM", "SIGINT", "SIGUSR1"]``.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.signals = [signal.Signals[name] for name in names]
        self.received = 0
        self._previous: dict[signal.Signals, Handler] = {}
        self._announce = distributed.is_main_process()
        self._watch = LauncherWatch() if LauncherWatch.wanted() else None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not the main thread: %s keep their actions", self.signals)
            return self
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        if self._watch is not None:
            self._watch.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watch is not None:
            self._watch.close()
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


class LauncherWatch:
    """A thread that sends its own process SIGTERM once the process that launched it is gone.

    torchrun starts every worker in a session of its own, so a launcher killed with SIGKILL (or
    lost with its node's agent) takes no worker with it: they would train on, unsupervised and
    holding the run directory's lock. The thread compares ``os.getppid()`` with the parent seen
    at start every ``interval_s`` seconds; a new parent (init, or a subreaper) means the
    launcher died, and the worker then gets the SIGTERM that torchrun would have forwarded: it
    stops at the end of the step with a checkpoint (or, when SIGTERM is not among the stop
    signals, ends as SIGTERM ends it). Polling works on every POSIX system; Linux's
    ``PR_SET_PDEATHSIG`` is not used because it fires when the launcher's *thread* that started
    the worker ends, not its process.

    Args:
        interval_s: seconds between two looks at the parent.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.parent = os.getppid()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bigbatch-launcher", daemon=True)

    @staticmethod
    def wanted() -> bool:
        """True in a worker of torchrun's elastic agent (it sets ``TORCHELASTIC_RUN_ID``)."""
        return "TORCHELASTIC_RUN_ID" in os.environ and hasattr(os, "getppid")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while not self._closed.wait(self.interval_s):
            if os.getppid() != self.parent:
                rank = os.environ.get("RANK", "?")
                text = (
                    f"\nbigbatch: rank {rank}: its launcher (pid {self.parent}) is gone: "
                    "stopping as on SIGTERM\n"
                )
                os.write(2, text.encode())
                os.kill(os.getpid(), signal.SIGTERM)
                return
