"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases.

``metrics.jsonl`` is always written (see `bigbatch.train.metrics`); the config's ``trackers`` adds
any of these: TensorBoard event files under ``tensorboard/``, an MLflow run in the run's own SQLite
store ``mlflow.db`` (MLflow's recommended local store; or on the tracking server of
``mlflow_tracking_uri`` / ``MLFLOW_TRACKING_URI``), a W&B offline run under ``wandb/`` (``wandb
sync`` uploads it later). Every tracker receives the resolved config once and the same per-step
figures, keyed by optimizer step. A resumed run continues the same tracker run. Closing is bounded
in time, so a stuck writer never holds the process at exit. Which packages a tracker needs is
`bigbatch.train.packages`'s to check, before anything is written.
"""

from __future__ import annotations

import json
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
from bigbatch.train.packages import EXTRAS
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0
"""How long closing one tracker may take before the run ends without waiting."""
MLFLOW_DATABASE = "mlflow.db"
"""The run's own MLflow store (SQLite), in the run directory, unless a tracking URI is given."""
MLFLOW_RUN_FILE = "mlflow_run.json"
"""The tracking URI and id of the run's MLflow run, so that a resumed run logs into it."""


class Tracker(Protocol):
    """What the metrics logger hands every figure to."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's resolved config (once, at the start)."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record finite scalar figures of one optimizer step."""

    def close(self) -> None:
        """Flush and close."""


def open_trackers(
    names: Sequence[str],
    run_dir: Path,
    *,
    resume_step: int | None,
    mlflow_tracking_uri: str = "auto",
) -> list[Tracker]:
    """The trackers the config names, writing under ``run_dir`` (MLflow: see
    `mlflow_tracking_uri`).

    Raises:
        ValueError: a tracker whose library is not installed (the message names the extra).
    """
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):  # each once, in the order given
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir, resume_step))
            elif name == "mlflow":
                uri = resolve_mlflow_uri(mlflow_tracking_uri, run_dir)
                trackers.append(MLflowTracker(run_dir, uri, resume=resume_step is not None))
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
                f"pip install 'bigbatch[{EXTRAS[name]}]', or remove {name} from trackers"
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


def _read_run_file(run_file: Path) -> dict[str, Any]:
    """What ``mlflow_run.json`` says; {} when it is missing or damaged (a new MLflow run)."""
    try:
        known = json.loads(run_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("%s cannot be read (%s): a new MLflow run starts", run_file, error)
        return {}
    return known if isinstance(known, dict) and "run_id" in known else {}


def resolve_mlflow_uri(setting: str, run_dir: Path) -> str:
    """Where the MLflow tracker logs: the config's ``mlflow_tracking_uri`` unless "auto", else
    ``MLFLOW_TRACKING_URI``, else the run's own SQLite store ``sqlite:///<run dir>/mlflow.db``.

    >>> resolve_mlflow_uri("http://tracking:5000", Path("/runs/a"))
    'http://tracking:5000'
    """
    if setting != "auto":
        return setting
    return os.environ.get("MLFLOW_TRACKING_URI") or _own_store(run_dir)


def _own_store(run_dir: Path) -> str:
    """The URI of the run's own SQLite store."""
    return "sqlite:///" + (Path(run_dir).resolve() / MLFLOW_DATABASE).as_posix()


class MLflowTracker:
    """An MLflow run in experiment ``bigbatch`` at ``tracking_uri``, named after the run directory.

    The URI and the run's id are kept in ``run_dir/mlflow_run.json``, so that a resumed run logs
    into the same MLflow run (at the same URI). Read it back with MLflow's own defaults, e.g.
    ``mlflow.MlflowClient("sqlite:///<run dir>/mlflow.db")`` or ``mlflow ui --backend-store-uri
    sqlite:///<run dir>/mlflow.db``. In the run's own store, artifacts would go to
    ``run_dir/mlartifacts`` (bigbatch logs none).
    """

    def __init__(self, run_dir: Path, tracking_uri: str, *, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        directory = Path(run_dir).resolve()
        self._client = MlflowClient(tracking_uri=tracking_uri)
        run_file = directory / MLFLOW_RUN_FILE
        known = _read_run_file(run_file) if resume else {}
        if known.get("tracking_uri") == tracking_uri:
            self._run_id = str(known["run_id"])
            self._client.update_run(self._run_id, status="RUNNING")
            return
        own_store = tracking_uri == _own_store(directory)
        experiment = self._client.get_experiment_by_name("bigbatch")
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(
                "bigbatch",
                artifact_location=(directory / "mlartifacts").as_uri() if own_store else None,
            )
        )
        run = self._client.create_run(
            experiment_id, run_name=directory.name, tags={"bigbatch.run_dir": str(directory)}
        )
        self._run_id = run.info.run_id
        run_file.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": self._run_id}))

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
