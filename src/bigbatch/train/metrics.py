"""What a run shows while it runs: progress bar, metrics.jsonl, the trackers, live figures.

Everything counts optimizer steps (docs/design.md, invariant 4). ``metrics.jsonl`` holds one train
line per step and one eval line per evaluation; on resume the lines after the checkpoint's step are
dropped first, so the file keeps exactly one train line per step. Only rank 0 writes: on other ranks
every object here is built with ``enabled=False`` and does nothing. The end-of-run report is
`report`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from bigbatch.core.engine import StepResult
from bigbatch.train.rundir import storage_errors
from bigbatch.train.state import TrainState
from bigbatch.train.trackers import Tracker, close_within, open_trackers
from bigbatch.units import format_bytes, format_number

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Progress-bar labels of the figures the trainer logs, in display order; other keys follow as is.
_BAR_LABELS = {
    "loss": "loss",
    "lr": "lr",
    "learning_rate": "lr",
    "grad_norm": "gnorm",
    "samples_per_s": "samples/s",
    "items_per_s": "items/s",
    "tokens_per_s": "tokens/s",
    "padding_fraction": "padding",
    "step_time_s": "s/step",
    "peak_memory_bytes": "mem",
    "skipped_steps": "skipped",
    "critical_batch_size": "B_crit",
}


class MetricsLogger:
    """Writes per-step figures to ``metrics.jsonl`` and the configured trackers in ``run_dir``.

    Train lines look like ``{"step": 5, "kind": "train", "time": 1796180569.585, "loss": 0.31,
    "lr": 0.001, ...}`` and evaluation lines like ``{"step": 5, "kind": "eval", "time": ...,
    "eval/loss": 0.35, "eval/accuracy": 0.9}``: separate lines, because the file is only ever
    appended to, so a killed run loses at most the line being written. ``time`` is when the line
    was written, in seconds since the epoch. Non-finite numbers are written as ``null`` (strict
    JSON). Trackers get train figures as ``train/<name>`` and evaluations as ``eval/<name>``.

    Args:
        run_dir: the run directory (created when enabled).
        enabled: False on ranks other than 0: nothing is created or written.
        resume_step: the step of the checkpoint a resumed run starts from: lines of later steps,
            written after that checkpoint by the interrupted run, are dropped first. None starts
            a new file.
        trackers: names from `bigbatch.choices.TRACKERS` (see `bigbatch.train.trackers`).
        config: the resolved config, handed to every tracker once (not on resume).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        trackers: Sequence[str] = ("tensorboard",),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file: Any = None
        self._trackers: list[Tracker] = []
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
        self._trackers = open_trackers(
            trackers,
            self.path.parent,
            resume_step=resume_step,
            mlflow_tracking_uri=(config or {}).get("mlflow_tracking_uri", "auto"),
        )
        if config is not None and resume_step is None:
            for tracker in self._trackers:
                tracker.log_config(config)

    def log_step(self, step: int, values: Mapping[str, float | int | None]) -> None:
        """Record the figures of one optimizer step (loss, lr, grad_norm, samples_per_s, ...)."""
        self._write(step, "train", dict(values), "train/")

    def log_eval(self, step: int, values: Mapping[str, float]) -> None:
        """Record an evaluation after ``step``; keys are stored as ``eval/<name>``."""
        named = {key if key.startswith("eval/") else f"eval/{key}": v for key, v in values.items()}
        self._write(step, "eval", named, "")

    def close(self) -> None:
        """Flush and close the file and the trackers (safe to call twice).

        Each tracker gets at most `bigbatch.train.trackers.CLOSE_TIMEOUT_S` seconds to close, so a
        stopping run ends promptly (a tracker's last events may then be lost; metrics.jsonl has
        every step).
        """
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk: the failed write was reported
                self._file.close()
            self._file = None
        trackers, self._trackers = self._trackers, []
        close_within(trackers)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, step: int, kind: str, values: dict[str, Any], tracker_prefix: str) -> None:
        """Append one JSON line (flushed, so a killed run keeps it) and the TensorBoard scalars."""
        if self._file is None:
            return
        if {"step", "kind", "time"} & set(values):
            raise ValueError(f"values may not hold 'step', 'kind' or 'time', got {sorted(values)}")
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        with storage_errors(f"write {self.path}"):
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        prefixed = {f"{tracker_prefix}{key}": value for key, value in values.items()}
        for tracker in list(self._trackers):
            try:
                tracker.log(int(step), prefixed)
            except OSError as error:  # it failed to write (a full disk): metrics.jsonl goes on
                logger.warning("%s stops logging: %s", type(tracker).__name__, error)
                self._trackers.remove(tracker)


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


def step_record(
    window: Any,
    result: StepResult,
    *,
    learning_rate: float,
    step_time_s: float,
    global_batch: int,
    state: TrainState,
    unit: str,
) -> dict[str, Any]:
    """The figures of one step for metrics.jsonl, the trackers and the progress bar.

    ``global_batch_size`` is the step's samples, in either unit; a run in tokens adds its
    budget (``global_batch_tokens``), the step's input and padded tokens, and its micro-steps.
    The critical batch is measured in loss items: ``critical_batch_samples`` divides it by the
    run's loss items per sample, ``critical_batch_tokens`` (tokens) by its items per token.
    ``world_size`` and ``sample_digest`` audit the step: its samples, whatever the split
    (docs/design.md, invariant 8).
    """
    record: dict[str, Any] = {
        "world_size": window.plan.world_size,
        "sample_digest": sample_digest(window.indices),
        "loss": result.loss,
        "lr": learning_rate,
        "grad_norm": result.grad_norm,
        "num_items": result.num_items,
        "global_batch_size": window.num_samples if unit == "tokens" else global_batch,
        "num_samples": window.num_samples,
        "micro_batches": result.micro_batches,
        "samples_per_s": window.num_samples / step_time_s,
        "items_per_s": result.num_items / step_time_s,
        "step_time_s": step_time_s,
        "skipped": int(result.skipped),
        "epoch": window.epoch,
    }
    noise = result.noise_scale
    if noise is not None:
        critical = noise.critical_batch_size
        record["critical_batch_size"] = critical
        per_sample = None if critical is None else critical / state.items_per_sample
        record["critical_batch_samples"] = per_sample
        record["gradient_sq_norm"] = noise.gradient_sq_norm
        record["trace_covariance"] = noise.trace_covariance
    if unit == "tokens":
        num_tokens, padded = window.num_tokens, window.num_padded_tokens
        record.update(
            global_batch_tokens=global_batch,
            num_tokens=num_tokens,
            num_padded_tokens=padded,
            padding_fraction=1.0 - num_tokens / padded if padded else 0.0,
            tokens_per_s=num_tokens / step_time_s,
            micro_steps=window.plan.gradient_accumulation_steps,
        )
        if noise is not None and noise.critical_batch_size is not None:
            record["critical_batch_tokens"] = noise.critical_batch_size / state.items_per_token
    return record


def sample_digest(indices: Sequence[int] | np.ndarray) -> str:
    """The SHA-256 (hex) of a step's dataset indices, sorted ascending, in decimal, joined by
    commas: the same for every world size and split of that global batch, so two runs can be
    compared step by step (docs/elastic.md).

    >>> sample_digest([3, 1, 2]) == hashlib.sha256(b"1,2,3").hexdigest()
    True
    """
    ascending = np.sort(np.asarray(indices, dtype=np.int64)).tolist()
    text = ",".join(map(str, ascending))
    return hashlib.sha256(text.encode("ascii")).hexdigest()
