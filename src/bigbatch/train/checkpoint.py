"""Checkpoints: one atomic save path for plain and sharded runs, and a validated load.

A checkpoint is a directory ``step-00000100/`` with the weights (``model.safetensors``, or
``shards/`` of `torch.distributed.checkpoint` for ``parallelism: fsdp``: `checkpoint_weights`),
the training state (``state.pt``: ``torch.save``, read back with ``weights_only=True``) and
``meta.json`` (step, format version, whether sharded, the sha256 of every file). It appears under
its final name only once complete (docs/design.md, invariant 5); a damaged one is reported and the
previous one used. A failure while saving is one line on every rank: the ranks agree on each
phase's outcome, so none is left waiting in a collective for one that gave up.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bigbatch.core import distributed
from bigbatch.train import checkpoint_files as files
from bigbatch.train.checkpoint_agreement import Phases, agree_on_candidate, from_rank_0
from bigbatch.train.checkpoint_files import checkpoint_name, list_checkpoints
from bigbatch.train.checkpoint_weights import (
    MODEL_FILE,
    SHARDS_DIR,
    SHARDS_METADATA,
    full_model_state,
    weights_format,
    write_safetensors,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "MODEL_FILE",
    "SHARDS_DIR",
    "STATE_FILE",
    "Checkpoint",
    "checkpoint_name",
    "full_model_state",
    "list_checkpoints",
    "Scan",
    "load_latest_checkpoint",
    "scan",
    "save",
    "save_checkpoint",
]

FORMAT_VERSION = 2
"""2: participants under their registration names (the planner's state under "planner")."""
READABLE_VERSIONS = (1, 2)
STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes:
        step: optimizer steps completed when it was saved.
        path: the checkpoint directory.
        model_state: the model weights, on the CPU.
        training_state: optimizer, RNG, every participant's state, config, ...
        skipped: the newer checkpoints that failed a check (damaged), newest first.
        sharded: the weights and optimizer are in ``shards/``; model_state then holds meta
            tensors of the full shapes, for checks.
        format_version: the ``meta.json`` format it was written in.
    """

    step: int
    path: Path
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    skipped: tuple[Path, ...] = ()
    sharded: bool = False
    format_version: int = FORMAT_VERSION


def begin_checkpoint(directory: Path, step: int, keep: int | None) -> tuple[Path, Path, Phases]:
    """The checked start of a save: the directory, the checkpoint's final path, and its phases
    (their errors name the checkpoint and whether the earlier ones are intact)."""
    check_arguments(step, keep)
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    newest = list_checkpoints(directory)
    intact = f"; the earlier checkpoints are intact (newest: {newest[-1].name})" if newest else ""
    return directory, final, Phases(f"write checkpoint {final}", intact)


def save(
    directory: Path,
    step: int,
    training_state: Callable[[], dict[str, Any]],
    write_weights: Callable[[Path], None],
    *,
    sharded: bool = False,
    keep: int | None = 3,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep``; every rank.

    Rank 0 creates ``step-NNNNNNNN.tmp-<random>/``; every rank runs ``write_weights`` on it (rank 0
    alone writes plain weights, each rank its shard under DCP); rank 0 then writes the training
    state and ``meta.json``, each file fsynced, renames the directory into place (an existing
    checkpoint of the same step swapped out atomically) and fsyncs the parent. Older ones are
    deleted only after that, so a crash at any moment leaves the previous checkpoints intact.

    Args:
        directory: where the ``step-*`` directories live (created if missing).
        step: optimizer steps completed.
        training_state: builds the training state, called on rank 0 only (inside the first
            phase, so that its failure reaches every rank); tensors, numbers, strings, bools,
            None, lists, tuples and dicts only, so that it loads with ``weights_only=True``.
        write_weights: writes the model (and optimizer) into the temporary directory.
        sharded: recorded in ``meta.json``: which `checkpoint_weights` format reads it back.
        keep: how many checkpoints to keep (the newest by step); None keeps all.

    Raises:
        StorageError: on every rank, one line, when any rank could not write (full disk, quota,
            read-only directory); the temporary directory is removed.
    """
    directory, final, phase = begin_checkpoint(directory, step, keep)
    main = distributed.is_main_process()
    state: dict[str, Any] = {}  # rank 0's

    def prepare() -> str:
        state.update(training_state())
        return prepare_temporary(directory, final, state)

    tmp = directory / phase.on_main(prepare)
    try:
        phase.everywhere(lambda: write_weights(tmp))
        phase.on_main(lambda: finish_checkpoint(tmp, final, step, state, sharded))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        logger.info("saved checkpoint %s%s", final, " (sharded)" if sharded else "")
        if keep is not None:
            files.prune(directory, keep, final)
    return final


def check_arguments(step: Any, keep: Any) -> None:
    """Refuse a step or a ``keep`` that `save` cannot take (a ValueError naming it)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1 or None (keep all), got {keep!r}")


def save_checkpoint(
    directory: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    *,
    keep: int | None = 3,
) -> Path:
    """`save` of a plain checkpoint from a model's ``state_dict()`` (tied weights stored once
    each, as copies); rank 0's weights are written. Returns the final checkpoint directory."""

    def write(tmp: Path) -> None:
        if distributed.is_main_process():
            write_safetensors(tmp / MODEL_FILE, model_state)

    return save(directory, step, lambda: training_state, write, keep=keep)


def prepare_temporary(
    directory: Path, final: Path, training_state: dict[str, Any], *, checked: bool = False
) -> str:
    """Rank 0: refuse an unloadable state (unless ``checked`` already, by `cpu_copy`), then
    create the temporary directory; its name."""
    if not checked:
        files.check_weights_only(training_state, "training_state")
    directory.mkdir(parents=True, exist_ok=True)
    files.remove_temporaries(directory)
    name = files.temporary_name(final)
    (directory / name).mkdir()
    return name


def finish_checkpoint(
    tmp: Path, final: Path, step: int, training_state: dict[str, Any], sharded: bool
) -> None:
    """Rank 0: the training state and meta.json beside the weights, then the rename."""
    files.write_torch_file(tmp / STATE_FILE, training_state)
    names = files.files_under(tmp)
    for name in names:  # the shards of every rank, and the weights
        files.fsync_file(tmp / name)
    for folder in {(tmp / name).parent for name in names}:
        files.fsync_dir(folder)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "sharded": sharded,
        "sha256": {name: files.sha256(tmp / name) for name in names},
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
        files.flush_and_sync(handle)
    files.fsync_dir(tmp)
    files.move_into_place(tmp, final)
    files.fsync_dir(final.parent)


@dataclass(frozen=True)
class Scan:
    """What `scan` found: the newest checkpoint that passed every check on every rank (or
    None), and the newer ones that failed on some rank, newest first, each with its reason."""

    found: Checkpoint | None
    damaged: tuple[tuple[Path, str], ...] = ()


def load_latest_checkpoint(
    directory: Path, check: Callable[[Checkpoint], None] | None = None
) -> Checkpoint | None:
    """The newest checkpoint under ``directory`` that passes every check, or None: `scan`'s
    (call it on every rank when distributed: the ranks agree on each candidate)."""
    return scan(directory, check).found


def scan(
    directory: Path,
    check: Callable[[Checkpoint], None] | None = None,
    damaged: Mapping[Path, str] | None = None,
) -> Scan:
    """The newest checkpoint under ``directory`` that passes every check on every rank.

    A checkpoint whose ``meta.json`` is missing or unparsable, whose checksums differ, whose
    files fail to load, that ``check`` refuses with any error but a `UsageError` (e.g. KeyError
    for a missing key), or that ``damaged`` names (with why: it failed to restore) is damaged:
    reported with a warning, and the previous one tried. Call on every rank: the ranks take rank
    0's listing and agree on each candidate, so one that fails on one rank is damaged on all, and
    a `UsageError` anywhere is raised everywhere. Temporaries of interrupted saves are ignored.
    No code from the files runs: ``weights_only=True``, safetensors, shards item by item.
    """
    directory, known = Path(directory), dict(damaged or {})
    names = from_rank_0(lambda: [path.name for path in list_checkpoints(directory)])
    skipped: list[tuple[Path, str]] = []
    for path in (directory / name for name in reversed(names)):
        if path in known:
            skipped.append((path, known[path]))
            continue
        found, error = None, None
        try:
            found = _load(path)
            if check is not None:
                check(found)
        except Exception as caught:  # noqa: BLE001 - any failure of a candidate is damage
            error = caught
        reason = agree_on_candidate(error)
        if reason is None:
            assert found is not None
            found = replace(found, path=path, skipped=tuple(p for p, _ in skipped))
            return Scan(found, tuple(skipped))
        skipped.append((path, reason))
        logger.warning("skipping checkpoint %s: %s (trying the previous one)", path, reason)
    return Scan(None, tuple(skipped))


def _load(path: Path) -> Checkpoint:
    """Read and validate one checkpoint directory; raises on anything wrong."""
    meta = _read_meta(path)
    sharded = bool(meta.get("sharded", False))
    checksums = meta.get("sha256")
    if not isinstance(checksums, dict):
        raise ValueError(f"{META_FILE} has no sha256 of the files")
    needed = [STATE_FILE, SHARDS_METADATA if sharded else MODEL_FILE]
    missing = [name for name in needed if name not in checksums]
    if missing:
        raise ValueError(f"{META_FILE} lists no {' and no '.join(missing)}")
    for name, expected in checksums.items():
        actual = files.sha256(path / name)
        if actual != expected:
            raise ValueError(
                f"{name} does not match its sha256 in {META_FILE}, truncated or modified (file "
                f"{actual[:12]}..., recorded {str(expected)[:12]}...)"
            )
    model_state = weights_format(sharded).read(path)
    try:
        training_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which is exactly what we refuse to do.
        raise pickle.UnpicklingError(
            f"{STATE_FILE} is not a weights_only file (corrupt, or holds arbitrary objects, "
            "which are never unpickled)"
        ) from error
    if not isinstance(training_state, dict):
        raise TypeError(f"{STATE_FILE} holds a {type(training_state).__name__}, not a dict")
    return Checkpoint(
        step=int(meta["step"]),
        path=path,
        model_state=model_state,
        training_state=training_state,
        sharded=sharded,
        format_version=int(meta["format_version"]),
    )


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json``, checked against the directory's name and the readable format versions."""
    match = files.NAME.match(path.name)
    assert match is not None
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{META_FILE} is not valid JSON ({error})") from error
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{META_FILE} has format_version {version!r}; this bigbatch reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))} (a checkpoint of another bigbatch "
            f"version, or damaged): {meta!r:.160}"
        )
    step = meta.get("step")
    if step != int(match.group(1)):
        raise ValueError(f"{META_FILE} says step {step!r}, the directory name {path.name}")
    return meta
