"""What a run shows while it runs: progress bar, metrics.jsonl, TensorBoard, live figures.

Everything counts optimizer steps (docs/design.md, invariant 4). ``metrics.jsonl`` holds one train
line per step and one eval line per evaluation; on resume the lines after the checkpoint's step are
dropped first, so the file keeps exactly one train line per step. Only rank 0 writes: on other ranks
every object here is built with ``enabled=False`` and does nothing. The end-of-run report is
`report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from bigbatch.core.engine import StepResult
from bigbatch.data.loader import Window
from bigbatch.train.rundir import storage_errors
from bigbatch.units import format_bytes, format_number

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CLOSE_TIMEOUT_S = 10.0
"""How long closing the TensorBoard writer may take before the run ends without waiting."""
# Progress-bar labels of the figures the trainer logs, in display order; other keys follow as is.
_BAR_LABELS = {
    "loss": "loss",
    "lr": "lr",
    "learning_rate": "lr",
    "grad_norm": "gnorm",
    "samples_per_s": "samples/s",
    "items_per_s": "items/s",
    "step_time_s": "s/step",
    "peak_memory_bytes": "mem",
    "skipped_steps": "skipped",
    "critical_batch_size": "B_crit",
}


class MetricsLogger:
    """Writes per-step figures to ``metrics.jsonl`` and TensorBoard in ``run_dir``.

    Train lines look like ``{"step": 5, "kind": "train", "loss": 0.31, "lr": 0.001, ...}`` and
    evaluation lines like ``{"step": 5, "kind": "eval", "eval/loss": 0.35, "eval/accuracy": 0.9}``:
    separate lines, because the file is only ever appended to, so a killed run loses at most the
    line being written. Non-finite numbers are written as ``null`` (strict JSON).

    Args:
        run_dir: the run directory (created when enabled).
        enabled: False on ranks other than 0: nothing is created or written.
        resume_step: the step of the checkpoint a resumed run starts from: lines of later steps,
            written after that checkpoint by the interrupted run, are dropped first. None starts
            a new file.
        tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file: Any = None
        self._writer: Any = None
        self._quiet: _QuietThreads | None = None
        if not enabled:
            return
        with storage_errors(f"write {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                _truncate_after(self.path, resume_step)
            elif self.path.exists() and self.path.stat().st_size > 0:
                logger.warning("starting a new %s: the previous one is replaced", self.path)
                self.path.unlink()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        if tensorboard:
            before = set(threading.enumerate())
            self._writer = _summary_writer(
                self.path.parent / "tensorboard",
                purge_step=None if resume_step is None else resume_step + 1,
            )
            self._quiet = _QuietThreads(set(threading.enumerate()) - before).install()

    def log_step(self, step: int, values: Mapping[str, float | int | None]) -> None:
        """Record the figures of one optimizer step (loss, lr, grad_norm, samples_per_s, ...)."""
        self._write(step, "train", dict(values), "train/")

    def log_eval(self, step: int, values: Mapping[str, float]) -> None:
        """Record an evaluation after ``step``; keys are stored as ``eval/<name>``."""
        named = {key if key.startswith("eval/") else f"eval/{key}": v for key, v in values.items()}
        self._write(step, "eval", named, "")

    def close(self) -> None:
        """Flush and close the files (safe to call twice).

        The TensorBoard writer flushes from a thread of its own; closing it gets at most
        `CLOSE_TIMEOUT_S` seconds, so a stopping run ends promptly (its last events may be lost).
        """
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: the failed write was reported
                self._file.close()
            self._file = None
        if self._writer is not None:
            closing = threading.Thread(target=_close_quietly, args=(self._writer,), daemon=True)
            closing.start()
            closing.join(CLOSE_TIMEOUT_S)
            if closing.is_alive():
                logger.warning(
                    "the TensorBoard writer did not close within %.0f s: its last events may be "
                    "missing (metrics.jsonl has every step)",
                    CLOSE_TIMEOUT_S,
                )
            self._writer = None
        if self._quiet is not None:
            self._quiet.uninstall()
            self._quiet = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, step: int, kind: str, values: dict[str, Any], tb_prefix: str) -> None:
        """Append one JSON line (flushed, so a killed run keeps it) and the TensorBoard scalars."""
        if self._file is None:
            return
        if "step" in values or "kind" in values:
            raise ValueError(f"values may not hold 'step' or 'kind' keys, got {sorted(values)}")
        record = {"step": int(step), "kind": kind, **{k: _jsonable(v) for k, v in values.items()}}
        with storage_errors(f"write {self.path}"):
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._writer is not None:
            try:
                for key, value in values.items():
                    number = isinstance(value, int | float) and not isinstance(value, bool)
                    if number and math.isfinite(value):
                        self._writer.add_scalar(f"{tb_prefix}{key}", value, int(step))
            except (
                OSError
            ) as error:  # its thread failed to write (a full disk): metrics.jsonl goes on
                logger.warning("TensorBoard logging stops: %s", error)
                self._writer = None


class ProgressBar:
    """A tqdm bar over optimizer steps that shows the latest figures compactly.

    Args:
        total_steps: steps of the whole run.
        initial: steps already done (a resumed run starts there).
        enabled: False on ranks other than 0.
        desc: the bar's label.
    """

    def __init__(
        self, total_steps: int, *, initial: int = 0, enabled: bool = True, desc: str = "train"
    ) -> None:
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            disable=not enabled,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
        )

    def update(self, step: int, figures: Mapping[str, Any]) -> None:
        """Move the bar to ``step`` (steps completed) and show ``figures``."""
        if self._bar.disable:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix_str(format_figures(figures), refresh=True)

    def close(self) -> None:
        """Close the bar (safe to call twice)."""
        self._bar.close()


def format_figures(figures: Mapping[str, Any]) -> str:
    """The figures of a step in one short line, known ones first.

    >>> format_figures({"grad_norm": 1.5, "loss": 0.25, "lr": 0.0003, "peak_memory_bytes": 2**31})
    'loss 0.25 | lr 3.00e-04 | gnorm 1.5 | mem 2.00 GiB'
    """
    order = {key: index for index, key in enumerate(_BAR_LABELS)}
    parts = []
    for key in sorted(figures, key=lambda k: (order.get(k, len(order)), k)):
        value = figures[key]
        # Only the known figures, so the bar stays one short line; skipped only when there are.
        if key not in order or value is None or isinstance(value, Mapping | list | tuple):
            continue
        if key == "skipped_steps" and not value:
            continue
        if key == "peak_memory_bytes":
            parts.append(f"mem {format_bytes(value)}")
        else:
            parts.append(f"{_BAR_LABELS.get(key, key)} {format_number(value)}")
    return " | ".join(parts)


def read_metrics(path: Path, kind: Literal["train", "eval"] | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` in file order, optionally only one kind.

    A line that does not parse (the half-written last line of a killed run) is skipped with a
    warning. Records without a ``kind`` count as train lines.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON, skipped: %.80s", path, number, line)
                continue
            if kind is None or record.get("kind", "train") == kind:
                records.append(record)
    return records


def _jsonable(value: Any) -> Any:
    """Numbers as JSON numbers (non-finite ones as null), tensors and numpy scalars via item()."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Drop lines of steps after ``step`` (and unparsable ones); rewrites the file atomically."""
    if not path.exists():
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        logger.info("resuming at step %d: dropping %d later lines of %s", step, dropped, path)
        tmp = path.with_name(f"{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


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


def _close_quietly(writer: Any) -> None:
    """Close a TensorBoard writer; its failure (a full disk) is a warning: metrics.jsonl has all."""
    try:
        writer.close()
    except Exception as error:  # the writer re-raises whatever its own thread met
        logger.warning("TensorBoard's last events are lost: %s: %s", type(error).__name__, error)


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None (with one warning) when tensorboard is missing.

    ``purge_step`` hides the events an interrupted run wrote after its last checkpoint.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        logger.warning("TensorBoard logging is off: %s (pip install tensorboard)", error)
        return None
    try:
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    except OSError as error:  # a full disk: metrics.jsonl is the record that matters
        logger.warning("TensorBoard logging is off: %s", error)
        return None


def step_record(
    window: Window,
    result: StepResult,
    learning_rate: float,
    step_time_s: float,
    global_batch_size: int,
    items_per_sample: float = 1.0,
) -> dict[str, Any]:
    """The figures of one step for metrics.jsonl, TensorBoard and the progress bar.

    The critical batch size is measured in loss items; ``critical_batch_samples`` divides it by
    the run's items per sample, the unit of the global batch.
    """
    record: dict[str, Any] = {
        "loss": result.loss,
        "lr": learning_rate,
        "grad_norm": result.grad_norm,
        "num_items": result.num_items,
        "global_batch_size": global_batch_size,
        "num_samples": window.num_samples,
        "micro_batches": result.micro_batches,
        "samples_per_s": window.num_samples / step_time_s,
        "items_per_s": result.num_items / step_time_s,
        "step_time_s": step_time_s,
        "skipped": int(result.skipped),
        "epoch": window.epoch,
    }
    if result.noise_scale is not None:
        critical = result.noise_scale.critical_batch_size
        record["critical_batch_size"] = critical
        record["critical_batch_samples"] = None if critical is None else critical / items_per_sample
        record["gradient_sq_norm"] = result.noise_scale.gradient_sq_norm
        record["trace_covariance"] = result.noise_scale.trace_covariance
    return record
