"""Checkpoints: atomic save, validated load, and the RNG state needed for an exact resume.

A checkpoint is a directory ``step-00000100/`` with the weights (safetensors), the training state
(``torch.save``, loaded back with ``weights_only=True``) and ``meta.json`` (step, checksums, format
version). It appears under its final name only once complete (docs/design.md, invariant 5); a
damaged one is reported and the previous one used. Loading never unpickles arbitrary objects.

A sharded run's checkpoint (``parallelism: fsdp``) holds ``shards/`` instead of the weights: the
model and optimizer saved by `torch.distributed.checkpoint`, every rank writing its own shard,
loadable on any number of ranks (resharded on load); ``meta.json`` then says ``"sharded": true``
and has the checksum of every file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist

from bigbatch.core import distributed
from bigbatch.train.rundir import storage_errors
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
_NAME = re.compile(r"^step-(\d+)$")
_TMP_MARK = ".tmp-"
# What a damaged checkpoint can raise while it is read: I/O errors, JSON and pickle errors, the
# weights_only unpickler's refusals, safetensors' header errors, and our own checks (ValueError).
_LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    EOFError,
    RuntimeError,
    pickle.UnpicklingError,
    safetensors.SafetensorError,
)
_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes:
        step: optimizer steps completed when it was saved.
        path: the checkpoint directory.
        model_state: the model weights, on the CPU.
        training_state: optimizer, scheduler, grad scaler, RNG, data position, plan, config, ...
        skipped: the newer checkpoints that failed a check (damaged), newest first.
        sharded: the weights and optimizer are in ``shards/`` (`load_sharded_state`); model_state
            then holds meta tensors of the full shapes, for checks.
    """

    step: int
    path: Path
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    skipped: tuple[Path, ...] = ()
    sharded: bool = False


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of one step, e.g. ``step-00000100``."""
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories by name (``step-<digits>``), oldest first; temporaries excluded.

    Only the name is checked here: `load_latest_checkpoint` validates the contents.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    directory: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    *,
    keep: int | None = 3,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep`` ones.

    The files go into ``step-NNNNNNNN.tmp-<random>/``, each flushed and fsynced, then the directory
    is renamed to its final name (an existing checkpoint of the same step is swapped out
    atomically), and the parent directory is fsynced. Older checkpoints are deleted only after
    that, so a crash at any moment leaves the previous checkpoints intact.

    Args:
        directory: where the ``step-*`` directories live (created if missing).
        step: optimizer steps completed.
        model_state: the model's ``state_dict()``; tensors that share memory (tied weights) are
            stored once each, as copies.
        training_state: tensors, numbers, strings, bools, None, lists, tuples and dicts only, so
            that it loads with ``weights_only=True``.
        keep: how many checkpoints to keep (the newest by step); None keeps all.

    Returns:
        The final checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1 or None (keep all), got {keep!r}")
    tensors = _storable_model_state(model_state)
    _check_weights_only(training_state, "training_state")
    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f"{final.name}{_TMP_MARK}{secrets.token_hex(4)}"
    newest = list_checkpoints(directory)
    intact = f"; the earlier checkpoints are intact (newest: {newest[-1].name})" if newest else ""
    with storage_errors(f"write checkpoint {final}", intact):
        directory.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(directory)
        tmp.mkdir()
        try:
            _write_files(tmp, step, tensors, training_state)
            _move_into_place(tmp, final)
            _fsync_dir(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("saved checkpoint %s", final)
    if keep is not None:
        _prune(directory, keep, final)
    return final


def _write_files(
    tmp: Path, step: int, tensors: dict[str, torch.Tensor], training_state: dict[str, Any]
) -> None:
    """The three files of a checkpoint, each flushed and fsynced, then the directory."""
    safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    _fsync_file(tmp / MODEL_FILE)
    with open(tmp / STATE_FILE, "wb") as handle:
        recording = _RecordingFile(handle)
        try:
            torch.save(training_state, recording)  # type: ignore[arg-type]
        except RuntimeError as error:
            # torch reports a failed write (a full disk) as its own RuntimeError: the I/O error
            # underneath is the one to report.
            if recording.error is None:
                raise
            raise recording.error from error
        _flush_and_sync(handle)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "sha256": {name: _sha256(tmp / name) for name in (MODEL_FILE, STATE_FILE)},
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
        _flush_and_sync(handle)
    _fsync_dir(tmp)


class _RecordingFile:
    """A binary file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.handle.write(data))
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_latest_checkpoint(
    directory: Path, check: Callable[[Checkpoint], None] | None = None
) -> Checkpoint | None:
    """The newest checkpoint under ``directory`` that passes every check, or None.

    A checkpoint whose ``meta.json`` is missing or unparsable, whose checksums differ, whose
    files fail to load, or that ``check`` refuses (it raises, e.g. KeyError for a missing key) is
    reported with a warning naming its path and the reason, and the previous one is tried; a
    `UsageError` from ``check`` is not damage and propagates. Temporary directories of
    interrupted saves are ignored. The training state is read with ``weights_only=True`` and the
    weights with safetensors, so no code from the files runs.
    """
    skipped: list[Path] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            found = _load(path)
            if check is not None:
                check(found)
            return replace(found, path=path, skipped=tuple(skipped))
        except UsageError:
            raise
        except _LOAD_ERRORS as error:
            skipped.append(path)
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            logger.warning(
                "skipping checkpoint %s: %s: %s (trying the previous one)",
                path,
                type(error).__name__,
                reason,
            )
    return None


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from, in ``weights_only``-safe types.

    Covers torch's CPU generator, every CUDA device's generator when CUDA is available, numpy's
    global generator and python's ``random``. Each rank captures its own.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every random generator back to a state from `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    python_state = state["python"]
    internal = tuple(int(value) for value in python_state["internal"].tolist())
    random.setstate((int(python_state["version"]), internal, python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning(
                "CUDA RNG state saved for %d devices, %d visible: restoring the first %d",
                len(cuda_states),
                torch.cuda.device_count(),
                min(len(cuda_states), torch.cuda.device_count()),
            )
        for device, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _load(path: Path) -> Checkpoint:
    """Read and validate one checkpoint directory; raises on anything wrong."""
    match = _NAME.match(path.name)
    assert match is not None
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{META_FILE} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{META_FILE} has no format_version {FORMAT_VERSION}: {meta!r:.200}")
    step = meta.get("step")
    if step != int(match.group(1)):
        raise ValueError(f"{META_FILE} says step {step!r}, the directory name {path.name}")
    sharded = bool(meta.get("sharded", False))
    names = list(meta["sha256"]) if sharded else [MODEL_FILE, STATE_FILE]
    if sharded and (STATE_FILE not in names or f"{SHARDS_DIR}/.metadata" not in names):
        raise ValueError(f"{META_FILE} lists no {STATE_FILE} or no {SHARDS_DIR}/.metadata")
    for name in names:
        expected = meta["sha256"][name]
        actual = _sha256(path / name)
        if actual != expected:
            raise ValueError(
                f"{name} does not match its sha256 in {META_FILE} (file {actual[:12]}..., "
                f"recorded {str(expected)[:12]}...): truncated or modified"
            )
    if sharded:
        model_state = _sharded_shapes(path / SHARDS_DIR)
    else:
        model_state = safetensors.torch.load_file(str(path / MODEL_FILE), device="cpu")
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
        step=step,
        path=path,
        model_state=model_state,
        training_state=training_state,
        sharded=sharded,
    )


def _sharded_shapes(shards: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a sharded checkpoint as meta tensors (full shapes, no data)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(shards)).read_metadata()
    shapes = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            shapes[key[len("model.") :]] = torch.empty(
                tuple(item.size), dtype=item.properties.dtype, device="meta"
            )
    return shapes


def save_sharded_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    *,
    keep: int | None = 3,
) -> Path:
    """Write the checkpoint of ``step`` of a sharded (or, on one process, unsharded) model.

    Call on every rank. The model and optimizer go through `torch.distributed.checkpoint` into
    ``shards/`` of a temporary directory, each rank writing its own shard (no full gather); rank
    0 then writes the training state and ``meta.json`` (the checksum of every file) and renames
    the directory into place, as `save_checkpoint` does. Loadable on any number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final = directory / checkpoint_name(step)
    main, together = distributed.is_main_process(), distributed.is_initialized()
    names = [f"{final.name}{_TMP_MARK}{secrets.token_hex(4)}"]
    newest = list_checkpoints(directory)
    intact = f"; the earlier checkpoints are intact (newest: {newest[-1].name})" if newest else ""
    if main:
        _check_weights_only(training_state, "training_state")
        with storage_errors(f"write checkpoint {final}", intact):
            directory.mkdir(parents=True, exist_ok=True)
            _remove_temporaries(directory)
            (directory / names[0]).mkdir()
    if together:
        dist.broadcast_object_list(names, src=0)
    tmp = directory / names[0]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with storage_errors(f"write checkpoint {final}", intact):
            dcp.save(
                {"model": model_state, "optimizer": optimizer_state},
                checkpoint_id=str(tmp / SHARDS_DIR),
            )
            if together:
                dist.barrier()  # every shard is written
            if main:
                _write_sharded_files(tmp, step, training_state)
                _move_into_place(tmp, final)
                _fsync_dir(directory)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if together:
        dist.barrier()  # the checkpoint is in place before any rank goes on
    if main:
        logger.info("saved checkpoint %s (sharded)", final)
        if keep is not None:
            _prune(directory, keep, final)
    return final


def _write_sharded_files(tmp: Path, step: int, training_state: dict[str, Any]) -> None:
    """The training state and meta.json beside ``shards/``, with every file's checksum."""
    with open(tmp / STATE_FILE, "wb") as handle:
        torch.save(training_state, handle)
        _flush_and_sync(handle)
    files = sorted(p for p in (tmp / SHARDS_DIR).rglob("*") if p.is_file())
    for file in files:
        _fsync_file(file)
    _fsync_dir(tmp / SHARDS_DIR)
    names = [STATE_FILE, *(p.relative_to(tmp).as_posix() for p in files)]
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "sharded": True,
        "sha256": {name: _sha256(tmp / name) for name in names},
    }
    with open(tmp / META_FILE, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
        _flush_and_sync(handle)
    _fsync_dir(tmp)


def load_sharded_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a sharded checkpoint's model and optimizer, resharded to this run's ranks.

    Call on every rank (a collective when distributed).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load(
        {"model": model_state, "optimizer": optimizer_state},
        checkpoint_id=str(Path(path) / SHARDS_DIR),
    )  # in place
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full weights on rank 0's CPU (empty elsewhere); call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[return-value]


def _storable_model_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as safetensors accepts them: dense, contiguous, no two sharing memory.

    Tied weights (one tensor under two names) would make safetensors refuse the file, so every
    tensor whose storage was already seen is stored as a copy; loading then fills both names.
    """
    seen: set[tuple[str, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"model_state[{name!r}] is a {type(tensor).__name__}; only tensors are allowed "
                "(put other values into training_state)"
            )
        tensor = tensor.detach()
        storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
        if storage in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[name] = tensor.contiguous()
    return tensors


def _check_weights_only(value: Any, where: str) -> None:
    """Refuse, at save time, anything ``torch.load(weights_only=True)`` would refuse at resume.

    Otherwise every checkpoint of the run would be unreadable and only found out on resume.
    """
    if isinstance(value, dict | OrderedDict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}")
            _check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_weights_only(item, f"{where}[{index}]")
    elif not isinstance(value, _LEAVES):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which "
            "torch.load(weights_only=True) cannot read back; allowed are tensors, numbers, "
            "strings, bools, None, lists, tuples and dicts (convert with .item(), .tolist(), "
            "torch.from_numpy() or a to_dict())"
        )


def _remove_temporaries(directory: Path) -> None:
    """Delete what interrupted saves left behind (only rank 0 saves, so none is in progress)."""
    for entry in directory.iterdir():
        if _TMP_MARK in entry.name and entry.name.startswith("step-") and entry.is_dir():
            logger.info("removing %s, left by an interrupted save", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is swapped out atomically and deleted."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if not _exchange(tmp, final):
        # No atomic exchange on this platform: a crash between the two renames leaves the older
        # checkpoints (and the new one under its temporary name), never a half-written one.
        old = final.with_name(f"{final.name}{_TMP_MARK}old-{secrets.token_hex(4)}")
        os.replace(final, old)
        os.replace(tmp, final)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux's renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to open this way (Windows)
        return False
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _prune(directory: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints (by step), never the one just written."""
    candidates = [path for path in list_checkpoints(directory) if path != newest]
    for path in candidates[: max(0, len(candidates) - (keep - 1))]:
        logger.info("removing old checkpoint %s (keep=%d)", path, keep)
        shutil.rmtree(path, ignore_errors=True)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flush_and_sync(handle: Any) -> None:
    """Push a file's buffered bytes to the disk before it is renamed into place."""
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    """fsync a file written by a library that does not expose its handle."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that the names in it survive a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def gather_rng_states(world_size: int) -> list[Any]:
    """Every rank's RNG states, on every rank (a collective under torch.distributed)."""
    rng = [capture_rng_state()]
    if distributed.is_initialized() and world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    return rng


def save_run_checkpoint(
    run_dir: Path, step: int, module: torch.nn.Module, state: dict[str, Any], keep: int
) -> None:
    """Write ``run_dir/checkpoints/step-N`` atomically (call on rank 0 only)."""
    save_checkpoint(run_dir / "checkpoints", step, module.state_dict(), state, keep=keep)


def load_run_checkpoint(
    run_dir: Path | None, check: Callable[[Checkpoint], None] | None = None
) -> Checkpoint | None:
    """The newest valid checkpoint of a run directory, or None (with a warning)."""
    found = None
    if run_dir is not None:
        found = load_latest_checkpoint(run_dir / "checkpoints", check)
    if found is None:
        logger.warning("resume: no valid checkpoint under %s: starting at step 0", run_dir)
    return found


def restore_rng_states(rng: list[Any], rank: int, world_size: int, saved_world_size: Any) -> None:
    """This rank's RNG states from a checkpoint (rank 0's when the world size changed)."""
    restore_rng_state(rng[rank] if len(rng) == world_size else rng[0])
    if saved_world_size != world_size:
        logger.warning(
            "resume: world_size %s -> %d: same sample order; RNG streams of rank 0 restored",
            saved_world_size,
            world_size,
        )
