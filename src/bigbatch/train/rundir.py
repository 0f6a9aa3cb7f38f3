"""The run directory: what a run writes there; a run is never overwritten silently.

`RunLock` keeps one run per directory (an ``flock`` held for the run's life, released when the
process ends, however it ends; the lock file goes with the run); `check_reuse` refuses to reuse a
directory that holds a run unless the caller resumes it or asks to overwrite it, and
`prepare_run_dir` then deletes only that run's own files (docs/design.md, invariant 6);
`storage_errors` turns a full disk or a read-only directory into one line. No torch is loaded
here: the command line checks `--out` before torch loads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import safetensors

from bigbatch.train.trackers import MLFLOW_DATABASE, MLFLOW_RUN_FILE
from bigbatch.units import UsageError, shorten

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = ".bigbatch.lock"

FINAL_WEIGHTS = "final.safetensors"
PLOT_FILE = "curves.png"
# What a run writes, and all that --overwrite deletes.
RUN_FILES = (
    FINAL_WEIGHTS,
    "metrics.jsonl",
    "config.yaml",
    "report.md",
    PLOT_FILE,
    MLFLOW_DATABASE,
    MLFLOW_RUN_FILE,
)
RUN_DIRS = ("checkpoints", "tensorboard")


def check_run_dir(run_dir: Path | str) -> Path:
    """The run directory as a Path; an empty name, a name the file system refuses (a part longer
    than its limit, a null byte) or an existing file is refused in one line."""
    if not str(run_dir).strip():
        raise UsageError("--out: the run directory is an empty name; give a directory")
    path = Path(run_dir)
    name = shorten(str(path), limit=200)
    if "\0" in str(path):
        raise UsageError(f"--out {name}: a null byte cannot be part of a directory name")
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > _name_max(path):
        raise UsageError(
            f"--out {name}: a name in the path has {longest} bytes; the file system allows "
            f"{_name_max(path)}: choose a shorter --out"
        )
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as error:  # a path too long for the file system, say
        raise UsageError(f"--out {name}: not a usable directory name ({error.strerror})") from None
    if is_file:
        raise UsageError(f"--out {name} is a file, not a directory; give a directory")
    return path


def _name_max(path: Path) -> int:
    """The longest name, in bytes, that the file system of the path's nearest existing parent
    takes (255 where it cannot say)."""
    for parent in path.absolute().parents:
        try:
            return int(os.pathconf(parent, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):  # missing, or no pathconf (Windows)
            continue
    return 255


def check_reuse(run_dir: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The run's files and folders in ``run_dir`` that an overwrite deletes; refuse to reuse a
    directory holding a run unless resuming it or overwriting it (nothing is written)."""
    if resume and overwrite:
        raise UsageError(
            "--resume continues the run in --out and --overwrite deletes it: give one of them"
        )
    existing = [name for name in (*RUN_FILES, *RUN_DIRS) if (run_dir / name).exists()]
    if resume or not existing:
        return []
    if not overwrite:
        state = "a finished" if (run_dir / FINAL_WEIGHTS).exists() else "an earlier"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        elastic = (
            f" (this is torchrun's restart {restart}: launch with --autoresume so that every "
            "restart continues the run)"
            if restart not in ("", "0")
            else ""
        )
        raise UsageError(
            f"run directory {str(run_dir)!r} holds {state} run ({', '.join(existing)}): pass "
            f"--resume to continue it, --overwrite to replace it, or choose another --out{elastic}"
        )
    return existing


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to reuse a run's directory silently; with overwrite delete only that run's files."""
    from bigbatch.core import distributed  # torch: a run is under way

    existing = check_reuse(run_dir, resume=resume, overwrite=overwrite)
    if existing and distributed.is_main_process():
        for name in existing:
            path = run_dir / name
            with storage_errors(f"delete {path}"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info("overwrite: removed %s from %s", ", ".join(existing), run_dir)


class StorageError(UsageError, OSError):
    """bigbatch could not write its own files (a full disk, a quota, a read-only directory).

    An OSError for library callers, and a `UsageError`: the command line prints one line.
    """


@contextlib.contextmanager
def storage_errors(action: str, hint: str = "") -> Iterator[None]:
    """A failed write of bigbatch's own files (full disk, quota, read-only) as one line.

    safetensors reports its I/O failures as SafetensorError; only bigbatch's writes go through
    here, so an error from a user's code keeps its traceback.
    """
    try:
        yield
    except StorageError:
        raise
    except (OSError, safetensors.SafetensorError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise StorageError(f"cannot {action}: {reason}{hint}") from error


class RunLock:
    """One run per directory: an exclusive ``flock`` on ``run_dir/.bigbatch.lock``.

    Held from `acquire` to `release` (or the end of the process, however it ends, so a killed run
    never blocks its own resume). The file keeps the holder's pid for the message of the run
    that is refused, and goes when the run ends: it is removed while the flock is still held, and
    a run that locked it in between finds that the path no longer names its file and locks the
    file now there (the lock is always on the file at the path). A run that ends in a
    `UsageError` leaves the directory as it found it (a refused resume changes nothing): the
    file of a killed run keeps its pid, the folders the lock created go again when empty. Only
    rank 0 locks; the others learn the outcome from it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None
        self._created, self._previous = False, b""
        self._created_dirs: list[Path] = []  # the folders the lock created, the deepest first

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the directory and the holder's pid."""
        from bigbatch.core import distributed  # torch: a run is under way

        message = distributed.rank_0_value(
            self._try_lock() if distributed.is_main_process() else None
        )
        if message is not None:
            raise UsageError(message)

    def _try_lock(self) -> str | None:
        """None when the lock is ours (or locking is not available), else the refusal."""
        if fcntl is None:
            return None
        with storage_errors(f"create the lock file {self.path}"):
            fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                where = shorten(str(self.path.parent), limit=200)
                return (
                    f"run directory {where} is in use by another bigbatch run (pid {holder}); "
                    "wait for it to end or choose another --out"
                )
            logger.warning("%s cannot be locked (%s): the run goes on unlocked", self.path, error)
            if self._created:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            return None
        if not _names(fd, self.path):  # its run ended and removed it after our open: again
            os.close(fd)
            return self._try_lock()
        self._previous = os.pread(fd, 4096, 0)  # a killed holder's pid, back if refused
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def _open(self) -> int:
        """The lock file's descriptor, the file and its directory created when missing."""
        for _ in range(2):
            with contextlib.suppress(FileNotFoundError):  # a refused run removed its empty dir
                return self._open_once()
        return self._open_once()

    def _open_once(self) -> int:
        missing = []
        for folder in (self.path.parent, *self.path.parent.parents):
            if folder.exists():
                break
            missing.append(folder)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created_dirs = self._created_dirs or missing
        self._created = not self.path.exists()
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def release(self, *, refused: bool = False) -> None:
        """Remove the lock file and let the next run in (safe to call twice); a refused run
        leaves the directory as it found it."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # before the flock goes: nobody else writes it
            if refused and not self._created:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
            else:
                self.path.unlink()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        for folder in self._created_dirs:  # the deepest first, each only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(refused=isinstance(error, UsageError))


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
