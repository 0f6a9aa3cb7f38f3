"""How a sharded checkpoint is written by `torch.distributed.checkpoint`, for less CPU per save.

`ShardedWeights` (``parallelism: fsdp``) saves through DCP on every rank; two things here keep
that cheap when a run saves often (``checkpoint_every: 1``) without changing what is written
(every item and the metadata are what a fresh save writes): `SavePlans`, DCP's save plan kept
from one save of a run to the next (rank 0 gathers the plans and builds the global plan again
only when some rank's plan changed), and `recording_writer`, DCP's file writer that keeps the
OSError of a failed write (torch.save reports it as a RuntimeError) at the file itself, below
the buffer, rather than at every small write torch.save makes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bigbatch.train.checkpoint_files import RecordingFile


class SavePlans:
    """DCP's save plans, cached under keys of one checkpointer's own across its saves.

    DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) keeps the plans in
    class-wide dicts under a key, by default the planner's class name: one cache for every
    checkpointer of the process. Each `SavePlans` has keys of its own, one per world size (a
    cache holds one plan per rank), and drops their entries when it is freed. DCP reuses a plan
    when the items' names, offsets and sizes are unchanged, not their dtypes; `planner` makes a
    rank send its plan again whenever anything in it changed. The ranks' caches stay in step
    because every rank saves the same sequence (SPMD).
    """

    def __init__(self) -> None:
        self.key = f"bigbatch-shards-{uuid.uuid4().hex}"
        self._keys: set[str] = set()
        weakref.finalize(self, _forget, self._keys)

    def planner(self, world_size: int) -> Any:
        """A DCP save planner for one save over ``world_size`` ranks, caching under its key."""
        key = f"{self.key}-{world_size}"
        self._keys.add(key)
        return _caching_planner()(key)


@functools.cache
def _caching_planner() -> Any:
    """DCP's default save planner with plan caching, under a given key, that sends a plan DCP
    would take for unchanged when anything in it changed (a dtype, say)."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

    class CachingPlanner(DefaultSavePlanner):
        def __init__(self, key: str) -> None:
            super().__init__(enable_plan_caching=True)
            self._cached_plans_key = key

        def create_local_plan(self) -> SavePlan:
            plan = super().create_local_plan()
            cached = SavePlanner._cached_save_plan.get(self._cached_plans_key)
            if plan.usable or self.plan == cached:
                return plan
            # DCP compared names, offsets and sizes only: send the changed plan, and keep it
            # once the global plan succeeds, as DCP keeps a plan it found changed.
            self._pending_local_plan = self.plan
            return self.plan

    return CachingPlanner


def _forget(keys: set[str]) -> None:
    planner = sys.modules.get("torch.distributed.checkpoint.planner")
    if planner is None:  # never saved: nothing cached
        return
    for cache in (
        planner.SavePlanner._cached_save_plan,
        planner.SavePlanner._cached_final_save_plan,
        planner.SavePlanner._cached_all_plans,
        planner.SavePlanner._cached_global_plan,
        planner.SavePlanner._cached_metadata,
    ):
        for key in keys:
            cache.pop(key, None)


def recording_writer(shards: Path, failed_writes: list[OSError]) -> Any:
    """DCP's file writer into ``shards``, appending the I/O errors that torch.save turns into
    RuntimeErrors to ``failed_writes``. The files are buffered as DCP's own are; the errors are
    caught where the buffer reaches the file, so a write costs no more Python calls than DCP's."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class RecordingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with io.BufferedWriter(RecordingFile(path, mode, failed_writes)) as stream:
                yield stream

    writer = FileSystemWriter(str(shards))
    writer.fs = RecordingFileSystem()
    return writer
