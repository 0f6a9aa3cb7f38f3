"""What `--resume` accepts: the same run, continued; never another run under the same name.

A checkpoint keeps the run's resolved config. On resume, the fields that define the run (recipe
and its options, global batch and its schedule, seed, optimizer and learning-rate settings,
precision, BatchNorm policy, ...) must match, or the resume is refused naming each difference;
the fields that only change how it runs (`HOW_IT_RUNS`: micro-batch, devices, workers, intervals,
a longer run) may change, and a length that moves the learning-rate decay is said in a warning.
A checkpoint whose files check out but whose contents do not (a missing key, a data position past
the dataset) counts as damaged, so the previous one is used (docs/design.md, invariant 5). A resume
that finds no valid checkpoint in a directory that holds a run refuses, changing nothing
(invariant 6).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bigbatch.core import distributed
from bigbatch.data.sampler import GlobalBatchSampler
from bigbatch.train import checkpoint, rundir
from bigbatch.train.checkpoint import Checkpoint
from bigbatch.train.config import Config
from bigbatch.train.configfile import flatten
from bigbatch.train.metrics import METRICS_FILE, read_metrics
from bigbatch.train.schedules import lr_factor
from bigbatch.train.state import TrainState
from bigbatch.units import UsageError, shorten

logger = logging.getLogger(__name__)

HOW_IT_RUNS = frozenset(
    {
        "micro_batch_size",
        "gradient_accumulation_steps",
        "micro_batch_tokens",
        "packing",
        "trackers",
        "mlflow_tracking_uri",
        "memory_budget",
        "optimize",
        "device",
        "gradient_sync",
        "activation_checkpointing",
        "num_workers",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "checkpoint_async",
        "on_nonfinite",
        "max_nonfinite_in_row",
        "stop_signals",
        "collective_timeout",
        "max_steps",
        "epochs",
    }
)
"""Config fields a resumed run may change: how it runs, not what it computes (plus its length)."""

REQUIRED_STATE = ("optimizer", "accumulator", "data", "rng", "counters", "config")
"""What a checkpoint's training state must hold to resume from it."""


_UNSET = "(unset)"


def load(
    run_dir: Path | None,
    config: Config,
    module: torch.nn.Module,
    num_samples: int,
    damaged: Mapping[Path, str] | None = None,
) -> Checkpoint | None:
    """The newest checkpoint of the run directory that this run may continue from, or None.

    Call on every rank. A checkpoint of a run with other settings, or whose weights do not fit
    the model, is refused (UsageError); one whose contents are unusable counts as damaged, like
    a truncated one, and so do those in ``damaged`` (they failed to restore): the previous one
    is used. Nothing is set aside here (`set_aside_everywhere`, once one has restored).

    Raises:
        UsageError: no valid checkpoint, but the directory holds a run (`refuse_to_restart`).
    """

    def check(found: Checkpoint) -> None:
        check_contents(found, num_samples)  # KeyError / ValueError: damaged, the previous one
        check_same_run(found, config)
        check_fits(found, module)

    scanned = checkpoint.Scan(None)
    if run_dir is not None:
        scanned = checkpoint.scan(run_dir / "checkpoints", check, damaged)
    if scanned.found is None:
        if run_dir is not None:
            refuse_to_restart(run_dir, scanned.damaged)
        logger.warning("resume: no valid checkpoint under %s: starting at step 0", run_dir)
        return None
    return upgrade(scanned.found)


def refuse_to_restart(run_dir: Path, damaged: Sequence[tuple[Path, str]]) -> None:
    """A resume that found no valid checkpoint in a directory that holds a run refuses: any
    checkpoint (damaged, set aside or a temporary), a metrics.jsonl with trained steps, final
    weights or a report.

    Starting at step 0 would replace the run's ``metrics.jsonl``, report and weights: its history
    would be lost to the command meant to continue it (docs/design.md, invariant 6). Nothing in
    the directory changes, the damaged checkpoints are not even set aside: the user may restore
    one. Rank 0 decides from what it reads; every rank raises the same line.

    Raises:
        UsageError: one line (at most 400 characters) naming what the directory holds, then the
            choices.
    """
    message: str | None = None
    if distributed.is_main_process():
        checkpoints, extra = checkpoint_remains(run_dir / "checkpoints", damaged)
        others = other_remains(run_dir) + extra
        remains = [checkpoints] if checkpoints else []
        if others:
            remains.append(("" if damaged else "no checkpoint, but ") + ", ".join(others))
        if remains and (checkpoints or extra or any(map(_is_history, others))):
            head = f"resume: no valid checkpoint in {run_dir}, which holds a run: "
            tail = (
                ". Nothing was changed. Pass --overwrite to start afresh (it deletes that run), "
                "or restore a checkpoint into its checkpoints/ and resume again"
            )
            room = max(40, 400 - len(head) - len(tail))
            message = head + _first_items("; ".join(remains), room) + tail
    message = distributed.rank_0_value(message)
    if message is not None:
        raise UsageError(message)


def checkpoint_remains(
    directory: Path, damaged: Sequence[tuple[Path, str]]
) -> tuple[str, list[str]]:
    """The damaged checkpoints with why (grouped by reason; "" when none), and what else
    ``directory`` holds (set aside ones, temporaries of interrupted saves), for a refusal."""
    found = ""
    if damaged:
        reasons: dict[str, list[str]] = {}
        for path, reason in damaged:
            # Without the error's type and the details that differ (checksums): room for more.
            short = reason.split(" (", 1)[0].split(": ", 1)[-1]
            reasons.setdefault(_clip(short, 100), []).append(path.name)
        shown = ", ".join(f"{', '.join(names)} ({reason})" for reason, names in reasons.items())
        count = len(damaged)
        every = "all damaged" if count > 1 else "damaged"
        found = f"{count} checkpoint{'s' if count > 1 else ''}, {every}: {shown}"
    named = {path.name for path, _ in damaged}
    others = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    others = [name for name in others if name not in named]
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    return found, [f"checkpoints/ holds {', '.join(others[:3])}{more}"] if others else []


def other_remains(run_dir: Path) -> list[str]:
    """What of a run ``run_dir`` holds besides its checkpoints, e.g. ``["metrics.jsonl up to
    step 12", "config.yaml"]`` (the lock file alone is no run; nor is an empty folder)."""
    found = []
    for name in dict.fromkeys((METRICS_FILE, *rundir.RUN_FILES, *rundir.RUN_DIRS)):
        path = run_dir / name
        if name == "checkpoints" or not path.exists():
            continue
        if path.is_dir() and not any(path.iterdir()):
            continue
        found.append(_last_step(path) if name == METRICS_FILE else name)
    return found


def _is_history(remain: str) -> bool:
    """What a fresh start would lose: trained steps, final weights, a report. A run stopped
    before its first step leaves only its config, an empty metrics.jsonl and tensorboard/: that
    directory starts afresh under --resume."""
    trained = remain.startswith(METRICS_FILE) and not remain.endswith("(no step)")
    return trained or remain in (rundir.FINAL_WEIGHTS, "report.md")


def _last_step(metrics: Path) -> str:
    """``metrics.jsonl up to step 12``."""
    try:
        steps = [int(record["step"]) for record in read_metrics(metrics, "train")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{METRICS_FILE} (unreadable)"
    return f"{METRICS_FILE} up to step {max(steps)}" if steps else f"{METRICS_FILE} (no step)"


def _first_items(text: str, limit: int) -> str:
    """As many of the comma- or semicolon-separated items of ``text`` as fit ``limit``."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(", ", 0, limit - 9), text.rfind("; ", 0, limit - 9))
    return (text[:cut] if cut > 0 else text[: limit - 12] + "...") + " and more"


def _clip(reason: str, limit: int = 70) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def upgrade(found: Checkpoint) -> Checkpoint:
    """A checkpoint of format 1 as format 2 holds it: the planner's values under "planner".

    Every other participant (accumulator, data, counters, early_warning) kept its name.
    """
    if found.format_version >= 2:
        return found
    state = dict(found.training_state)
    state["planner"] = {
        key: state.pop(key, None) for key in ("micro_batch_size", "micro_batch_tokens", "adaptive")
    }
    return replace(found, training_state=state, format_version=2)


def set_aside_everywhere(paths: tuple[Path, ...]) -> None:
    """`set_aside` on rank 0 once every rank is done with the checkpoints; call on every rank."""
    if distributed.is_initialized():
        dist.barrier()
    if paths and distributed.is_main_process():
        set_aside(paths)


def set_aside(paths: tuple[Path, ...]) -> None:
    """Rename damaged checkpoints to ``step-N.damaged`` (call on rank 0 only).

    They stay for inspection, and no longer count as checkpoints: retention keeps the newest
    ``keep`` valid ones, and the resumed run writes those steps afresh.
    """
    for path in paths:
        target = path.with_name(f"{path.name}.damaged")
        try:
            if target.exists():
                shutil.rmtree(target)
            os.replace(path, target)
            logger.warning("damaged checkpoint %s set aside as %s", path, target.name)
        except OSError as error:
            logger.warning("could not set aside damaged checkpoint %s: %s", path, error)


def run_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"lr 0.003 -> 0.1"`` for each run-defining field that differs.

    A top-level field only one side knows (a checkpoint of an older version) is skipped; inside
    a field (recipe_options, lr_scaling) a key only one side has differs from "(unset)".

    Example:
        >>> run_differences({"lr": 0.003, "num_workers": 0}, {"lr": 0.1, "num_workers": 4})
        ['lr 0.003 -> 0.1']
        >>> run_differences({"recipe_options": {}}, {"recipe_options": {"depth": 2}})
        ['recipe_options.depth (unset) -> 2']
    """
    shared = [key for key in saved.keys() & current.keys() if key not in HOW_IT_RUNS]
    old = flatten({key: saved[key] for key in shared})
    new = flatten({key: current[key] for key in shared})
    differences = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _UNSET), new.get(key, _UNSET)
        if before != after:
            shown = [
                value if value is _UNSET else shorten(value, limit=40) for value in (before, after)
            ]
            differences.append(f"{key} {shown[0]} -> {shown[1]}")
    return differences


def check_same_run(found: Checkpoint, config: Config) -> None:
    """Refuse a checkpoint of another run: UsageError naming every run-defining difference."""
    saved = found.training_state["config"]
    if not isinstance(saved, Mapping):
        raise TypeError(f"its config is a {type(saved).__name__}, not a mapping")
    differences = run_differences(saved, config.model_dump(mode="json"))
    if differences:
        shown = ", ".join(differences[:8]) + (", ..." if len(differences) > 8 else "")
        raise UsageError(
            f"resume: {found.path} belongs to a run with other settings: {shown}. These define "
            "the run: set them back (its config.yaml has them) or start a new run with another "
            "--out"
        )


def check_fits(found: Checkpoint, module: torch.nn.Module) -> None:
    """Refuse weights that do not fit the model (it changed since the run began)."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    saved = {name: tuple(t.shape) for name, t in found.model_state.items()}
    problems = [f"{name} missing" for name in sorted(expected.keys() - saved.keys())]
    problems += [f"{name} unexpected" for name in sorted(saved.keys() - expected.keys())]
    problems += [
        f"{name} {list(saved[name])} vs {list(shape)}"
        for name, shape in sorted(expected.items())
        if name in saved and saved[name] != shape
    ]
    if problems:
        raise UsageError(
            f"resume: the weights of {found.path} do not fit the model ({len(problems)} "
            f"differences: {', '.join(problems[:4])}{', ...' if len(problems) > 4 else ''}): the "
            "model changed since the run began; start a new run with another --out"
        )


def check_contents(found: Checkpoint, num_samples: int) -> None:
    """A checkpoint whose files check out must also hold a usable state, else it is damaged.

    Raises:
        KeyError: a key the resume needs is missing.
        ValueError: the data position does not fit the dataset or the checkpoint's step.
    """
    state = found.training_state
    missing = [key for key in REQUIRED_STATE if key not in state]
    if missing:
        raise KeyError(f"its training state lacks {', '.join(missing)}")
    data = state["data"]
    if int(data["step"]) != found.step:
        raise ValueError(
            f"its data position is at step {data['step']}, the checkpoint {found.step}"
        )
    GlobalBatchSampler(num_samples, seed=0).load_state_dict(data)  # raises when out of range
    TrainState().load_state_dict(dict(state["counters"]))
    if not state["rng"]:
        raise ValueError("it holds no RNG state")


def warn_if_schedule_moves(found: Checkpoint, config: Config, total_steps: int, step: int) -> None:
    """A resumed run of another length moves a decaying learning rate: say by how much.

    Raises:
        UsageError: the run is now shorter than the checkpoint's step.
    """
    saved_total = found.training_state.get("total_steps")
    if saved_total is None or int(saved_total) == total_steps:
        return
    if total_steps < step:
        raise UsageError(
            f"resume: the run now has {total_steps} steps (max_steps / epochs), but "
            f"{found.path} is at step {step}: give a length of at least {step} steps"
        )
    if config.lr_schedule == "constant":
        return
    if config.batch_size_schedule == "adaptive":
        logger.warning(
            "resume: the run now has %d epochs: the %s decay, counted in samples, moves",
            config.epochs,
            config.lr_schedule,
        )
        return
    before = lr_factor(step, int(saved_total), config.warmup_steps, config.lr_schedule)
    after = lr_factor(step, total_steps, config.warmup_steps, config.lr_schedule)
    logger.warning(
        "resume: the run now has %d steps instead of %d: the %s decay moves, so step %d gets "
        "%.4g x the learning rate instead of %.4g x",
        total_steps,
        int(saved_total),
        config.lr_schedule,
        step + 1,
        after,
        before,
    )
