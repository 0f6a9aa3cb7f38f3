"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases, all offline.

``metrics.jsonl`` is always written (see `bigbatch.train.metrics`); the config's ``trackers`` adds
any of these, each writing into the run directory with no server and no network: TensorBoard event
files under ``tensorboard/``, an MLflow file store under ``mlruns/``, a W&B offline run under
``wandb/`` (``wandb sync`` uploads it later). Every tracker receives the resolved config once and
the same per-step figures, keyed by optimizer step. A resumed run continues the same tracker run.
Closing is bounded in time, so a stuck writer never holds the process at exit.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from bigbatch.train.configfile import flatten
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0
"""How long closing one tracker may take before the run ends without waiting."""
# The extra that installs each tracker's library.
_EXTRAS = {"tensorboard": "full", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker(Protocol):
    """What the metrics logger hands every figure to."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's resolved config (once, at the start)."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record finite scalar figures of one optimizer step."""

    def close(self) -> None:
        """Flush and close."""


def open_trackers(names: Sequence[str], run_dir: Path, *, resume_step: int | None) -> list[Tracker]:
    """The trackers the config names, writing under ``run_dir``.

    Raises:
        ValueError: a tracker whose library is not installed (the message names the extra).
    """
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):  # each once, in the order given
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, resume_step))
            elif name == "mlflow":
                trackers.append(MLflowTracker(run_dir))
            elif name == "wandb":
                trackers.append(WandbTracker(run_dir, resume=resume_step is not None))
            else:
                raise UsageError(f"trackers: unknown tracker {name!r}")
        except ImportError as error:
            if name == "tensorboard":  # the default: a run without it still has metrics.jsonl
                logger.warning("no TensorBoard events: %s (pip install tensorboard)", error)
                continue
            raise UsageError(
                f"trackers: {name} needs {error.name or name}, which is not installed: "
                f"pip install 'bigbatch[{_EXTRAS[name]}]', or remove {name} from trackers"
            ) from None
    return trackers


def close_within(trackers: Sequence[Tracker], timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close every tracker, giving up (with a warning) on any that takes over ``timeout_s``."""
    for tracker in trackers:
        closer = threading.Thread(target=_close_quietly, args=(tracker,), daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            logger.warning(
                "%s did not close within %.0f s; its last figures may be missing",
                type(tracker).__name__,
                timeout_s,
            )


def _close_quietly(tracker: Tracker) -> None:
    """Close one tracker; a failure (a full disk) is a warning: metrics.jsonl has every step."""
    try:
        tracker.close()
    except Exception as error:  # a writer re-raises whatever its own thread met
        logger.warning(
            "%s's last events are lost: %s: %s", type(tracker).__name__, type(error).__name__, error
        )


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among the figures (booleans and text are left out)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class TensorBoardTracker:
    """TensorBoard event files under ``run_dir/tensorboard``; the config as text and hparams.

    ``resume_step`` purges the events an interrupted run wrote after its last checkpoint.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge_step = None if resume_step is None else resume_step + 1
        before = set(threading.enumerate())
        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
        self._quiet = _QuietThreads(set(threading.enumerate()) - before).install()

    def log_config(self, config: Mapping[str, Any]) -> None:
        flat = flatten(config)
        table = "\n".join(f"| {key} | {value} |" for key, value in flat.items())
        self._writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, 0)
        hparams = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in flat.items()
        }
        self._writer.add_hparams(hparams, {}, run_name=".")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in _scalars(values).items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._quiet.uninstall()


class MLflowTracker:
    """An MLflow run in a local file store, ``run_dir/mlruns``, experiment ``bigbatch``.

    The run's id is kept in ``run_dir/mlruns/bigbatch_run_id`` so that a resumed run logs into
    the same MLflow run. Read it back with ``mlflow.MlflowClient("file://.../mlruns")``.
    """

    def __init__(self, run_dir: Path) -> None:
        # MLflow 3 keeps the file store working behind this switch; a database store would need
        # a server-side install that bigbatch does not ask for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        store = Path(run_dir).resolve() / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=store.as_uri())
        id_file = store / "bigbatch_run_id"
        if id_file.exists():
            self._run_id = id_file.read_text().strip()
            self._client.update_run(self._run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name("bigbatch")
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self._client.create_experiment("bigbatch")
            )
            run = self._client.create_run(experiment_id, run_name=Path(run_dir).resolve().name)
            self._run_id = run.info.run_id
            id_file.write_text(self._run_id + "\n")

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        logged = {param for param in self._client.get_run(self._run_id).data.params}
        params = [
            Param(key, str(value)[:500])
            for key, value in flatten(config).items()
            if key not in logged  # MLflow refuses to change a logged param (resume)
        ]
        for start in range(0, len(params), 100):
            self._client.log_batch(self._run_id, params=params[start : start + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, step) for key, value in _scalars(values).items()]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


class WandbTracker:
    """A Weights & Biases run in offline mode under ``run_dir/wandb`` (``wandb sync`` uploads).

    The run's id is kept in ``run_dir/wandb/bigbatch_run_id`` so that a resumed run continues it.
    """

    def __init__(self, run_dir: Path, *, resume: bool) -> None:
        import wandb

        directory = Path(run_dir).resolve()
        (directory / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = directory / "wandb" / "bigbatch_run_id"
        if resume and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids: short, lowercase letters and digits
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project="bigbatch",
            name=directory.name,
            id=run_id,
            dir=str(directory),
            mode="offline",
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._run.config.update(dict(config), allow_val_change=True)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(_scalars(values), step=step)

    def close(self) -> None:
        import wandb

        self._run.finish()
        wandb.teardown()  # waits for W&B's writer process to flush the run file


class _QuietThreads:
    """While installed, an OSError that ends one of ``threads`` (TensorBoard's writer thread, on
    a full disk) is one warning line instead of a thread's traceback; anything else goes to the
    previous `threading.excepthook`."""

    def __init__(self, threads: set[threading.Thread]) -> None:
        self.threads, self.previous = threads, threading.excepthook

    def __call__(self, args: Any) -> None:
        if args.thread in self.threads and issubclass(args.exc_type, OSError):
            logger.warning("TensorBoard logging stops: %s", args.exc_value)
            return
        self.previous(args)

    def install(self) -> _QuietThreads:
        self.previous, threading.excepthook = threading.excepthook, self
        return self

    def uninstall(self) -> None:
        if threading.excepthook is self:
            threading.excepthook = self.previous
