"""The files of a checkpoint directory: durable writes, checksums, atomic rename, retention.

What makes a checkpoint appear whole or not at all (docs/design.md, invariant 5): every file is
flushed and fsynced, the directory is renamed from its temporary name into place (an existing one
swapped out atomically where the platform allows), the parent directory fsynced, and older
checkpoints deleted only afterwards. Also the check that a training state loads back with
``weights_only=True``, made at save time rather than found out on resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NAME = re.compile(r"^step-(\d+)$")
TMP_MARK = ".tmp-"
_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of one step, e.g. ``step-00000100``."""
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories by name (``step-<digits>``), oldest first; temporaries excluded.

    Only the name is checked here: `checkpoint.load_latest_checkpoint` validates the contents.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def temporary_name(final: Path) -> str:
    """A fresh temporary name beside ``final``, recognised (and removed) as an interrupted save."""
    return f"{final.name}{TMP_MARK}{secrets.token_hex(4)}"


def remove_temporaries(directory: Path) -> None:
    """Delete what interrupted saves left behind (rank 0 alone creates them, one save at a time)."""
    for entry in directory.iterdir():
        if TMP_MARK in entry.name and entry.name.startswith("step-") and entry.is_dir():
            logger.info("removing %s, left by an interrupted save", entry)
            shutil.rmtree(entry, ignore_errors=True)


def check_weights_only(value: Any, where: str) -> None:
    """Refuse, at save time, anything ``torch.load(weights_only=True)`` would refuse at resume.

    Otherwise every checkpoint of the run would be unreadable and only found out on resume.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}")
            check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_weights_only(item, f"{where}[{index}]")
    elif not isinstance(value, _LEAVES):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}, which "
            "torch.load(weights_only=True) cannot read back; allowed are tensors, numbers, "
            "strings, bools, None, lists, tuples and dicts (convert with .item(), .tolist(), "
            "torch.from_numpy() or a to_dict())"
        )


def copy_weights_only(value: Any, where: str, copy_tensor: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``copy_tensor`` applied to every tensor (dicts, lists and tuples copied
    along, other leaves kept), refused as `check_weights_only` refuses it: one walk that both
    checks and copies, for the step boundary of a background save. It names no place as it
    goes (that costs more than the copy); a refusal walks again with `check_weights_only`."""
    try:
        return _copy(value, copy_tensor)
    except _Refused:
        check_weights_only(value, where)  # raises, naming the place
        raise


class _Refused(Exception):
    """Something `check_weights_only` refuses is in the state being copied."""


def _copy(value: Any, copy_tensor: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return copy_tensor(value)
    if isinstance(value, dict):  # an OrderedDict stays one
        for key in value:
            if not isinstance(key, str | int):
                raise _Refused
        return type(value)((key, _copy(item, copy_tensor)) for key, item in value.items())
    if isinstance(value, list | tuple):
        items = [_copy(item, copy_tensor) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if not isinstance(value, _LEAVES):
        raise _Refused
    return value  # numbers, strings, None, dtypes, devices: immutable


def write_torch_file(path: Path, value: Any) -> None:
    """``torch.save`` to ``path``, flushed and fsynced; a failed write raises its OSError."""
    failed_writes: list[OSError] = []
    with io.BufferedWriter(RecordingFile(path, "wb", failed_writes)) as handle:
        try:
            torch.save(value, handle)
        except RuntimeError as error:
            # torch reports a failed write (a full disk) as its own RuntimeError: the I/O error
            # underneath is the one to report.
            if not failed_writes:
                raise
            raise failed_writes[0] from error
        flush_and_sync(handle)


class RecordingFile(io.FileIO):
    """A file that keeps the OSError of a failed write in ``failed`` before raising it: torch.save
    reports it as a RuntimeError of its own. Put under the buffer, it costs one Python call per
    buffer's worth of writes, not one per small write torch.save makes."""

    def __init__(self, path: str | os.PathLike[str], mode: str, failed: list[OSError]) -> None:
        super().__init__(path, mode)
        self._failed_writes = failed

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as error:
            self._failed_writes.append(error)
            raise


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is swapped out atomically and deleted."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if not _exchange(tmp, final):
        # No atomic exchange on this platform: a crash between the two renames leaves the older
        # checkpoints (and the new one under its temporary name), never a half-written one.
        old = final.with_name(f"{final.name}{TMP_MARK}old-{secrets.token_hex(4)}")
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


def prune(directory: Path, keep: int, newest: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints (by step), never the one just written."""
    candidates = [path for path in list_checkpoints(directory) if path != newest]
    for path in candidates[: max(0, len(candidates) - (keep - 1))]:
        logger.info("removing old checkpoint %s (keep=%d)", path, keep)
        shutil.rmtree(path, ignore_errors=True)


def files_under(directory: Path) -> list[str]:
    """Every file below ``directory``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flush_and_sync(handle: Any) -> None:
    """Push a file's buffered bytes to the disk before it is renamed into place."""
    handle.flush()
    os.fsync(handle.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file written by a library that does not expose its handle."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory so that the names in it survive a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
