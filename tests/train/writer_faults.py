"""Faults for the checkpoint writer process, imported by it before its first job
(``Checkpointer.writer_preload = ("tests.train.writer_faults",)``) and chosen by environment
variables that the writer inherits from the test:

- ``BIGBATCH_TEST_WRITER_HOLD=<path>``: each write of the weights waits until ``<path>`` exists.
- ``BIGBATCH_TEST_WRITER_FULL_FROM=<n>``: the n-th write of the weights and every later one fail
  with ENOSPC, as a full disk would.
- ``BIGBATCH_TEST_WRITER_STUCK_BEFORE_RENAME=1``: print "about to rename" and wait, before the
  rename, for as long as the training process lives.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

from bigbatch.train import checkpoint_files, checkpoint_writer

_write_safetensors = checkpoint_writer.write_safetensors
_calls = 0


def _faulty_write(path: Path, state: Any) -> None:
    global _calls
    _calls += 1
    hold = os.environ.get("BIGBATCH_TEST_WRITER_HOLD")
    if hold:
        deadline = time.monotonic() + 60
        while not Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    full_from = int(os.environ.get("BIGBATCH_TEST_WRITER_FULL_FROM", "0"))
    if full_from and _calls >= full_from:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _write_safetensors(path, state)


def _stuck(tmp: Path, final: Path) -> None:
    print("about to rename", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
    raise OSError(errno.ESHUTDOWN, "the training process is gone")


checkpoint_writer.write_safetensors = _faulty_write
if os.environ.get("BIGBATCH_TEST_WRITER_STUCK_BEFORE_RENAME"):
    checkpoint_files.move_into_place = _stuck
