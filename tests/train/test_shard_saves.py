"""Sharded saves keep DCP's save plan from one save to the next: every save, whether the state
changed or not (values, dtype, shapes), synchronous or from the background copy, and the one
after a failed write, holds what a fresh DCP save of the same state holds, item by item; it
reads back through bigbatch's load checks and through `torch.distributed.checkpoint.load` on
one process (resharded from 2). A state that would not load back weights-only is refused at
save, in both kinds of save, as the plain format refuses it."""

from __future__ import annotations

import gc
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train.checkpoint_weights import SHARDS_DIR, ShardedWeights, read_shards_metadata
from bigbatch.train.checkpointer import Checkpointer
from tests import models
from tests.distributed_helpers import run_processes
from tests.train.test_checkpointer import file_limit

# Each save in turn: its name, how the state differs from the save before, and how it is saved.
SAVES = (
    ("first", "no optimizer step yet", "sync"),
    ("stepped", "optimizer state added", "background"),
    ("values", "values only", "background"),
    ("float32", "dtype", "sync"),
    ("wider", "shapes", "background"),
    ("full disk", "values only; rank 1 cannot write", "sync"),
    ("after", "values only", "sync"),
)


def sharded_mlp(width: int, dtype: torch.dtype, world_size: int) -> tuple[Any, Any]:
    """An MLP of the shape of `models.mlp` (hidden ``width``) sharded with FSDP2, and AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(width)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)
    ).to(dtype)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def step(model: Any, optimizer: Any) -> None:
    x, y = models.regression_data(16)
    dtype = next(model.parameters()).dtype
    optimizer.zero_grad()
    models.mse_per_sample(model, x.to(dtype), y.to(dtype)).mean().backward()
    optimizer.step()


def saves_of_a_changing_state(rank: int, world_size: int, directory: str) -> dict[str, Any]:
    """Every save of SAVES through one ShardedWeights into ``<name>/cached``, beside a fresh
    DCP save of the same state into ``<name>/fresh``; what rank 0 saw of the plan cache."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.planner import SavePlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    weights = ShardedWeights()
    key = f"{weights._plans.key}-{world_size}"  # the cache of this world size
    model, optimizer = sharded_mlp(16, torch.float64, world_size)
    reused, full_weights, failures = {}, {}, {}
    for name, change, how in SAVES:
        if change == "optimizer state added" or change.startswith("values"):
            step(model, optimizer)
        elif change == "dtype":
            model, optimizer = sharded_mlp(16, torch.float32, world_size)
            step(model, optimizer)
        elif change == "shapes":
            model, optimizer = sharded_mlp(24, torch.float32, world_size)
            step(model, optimizer)
        cached = Path(directory) / name / "cached"
        metadata_before = SavePlanner._cached_metadata.get(key)
        if change.endswith("rank 1 cannot write") and rank == 1:
            file_limit(2_000)
        try:
            if how == "sync":
                weights.write(cached, model, optimizer)
            else:
                weights.write_staged(cached, weights.stage(model, optimizer))()
        except BaseException as error:  # noqa: BLE001 - DCP raises a BaseException
            failures[name] = f"{type(error).__name__}: {error}"
            continue
        finally:
            file_limit(None)
        reused[name] = SavePlanner._cached_metadata.get(key) is metadata_before
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state},
            storage_writer=FileSystemWriter(str(Path(directory) / name / "fresh" / SHARDS_DIR)),
        )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full_weights[name] = get_model_state_dict(model, options=options)
    del weights
    gc.collect()
    forgotten = all(
        key not in cache for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans)
    )
    return {"reused": reused, "weights": full_weights, "failures": failures, "forgotten": forgotten}


def items(shards: Path) -> tuple[Any, dict[tuple[str, tuple[int, ...]], Any]]:
    """A DCP checkpoint's metadata and every item it holds, read weights-only by its index."""
    metadata = read_shards_metadata(shards)
    found = {}
    for index, info in metadata.storage_data.items():
        with open(shards / info.relative_path, "rb") as handle:
            handle.seek(info.offset)
            data = io.BytesIO(handle.read(info.length))
        found[(index.fqn, tuple(index.offset or ()))] = torch.load(data, weights_only=True)
    return metadata, found


def load_on_one_process(shards: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's full weights loaded by DCP on this one process from a 2-rank checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {"model": {name: torch.empty_like(tensor) for name, tensor in like.items()}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(state, storage_reader=FileSystemReader(str(shards)))
    return state["model"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_save_with_a_kept_plan_holds_what_a_fresh_save_does(tmp_path: Path) -> None:
    results = run_processes(saves_of_a_changing_state, 2, str(tmp_path))
    assert "full disk" not in results[0]["reused"]  # failed on every rank, as one error each
    assert "File too large (rank 1)" in results[1]["failures"]["full disk"]
    assert results[0]["failures"]["full disk"].startswith("CheckpointException")
    # The cache was used where nothing but values changed, and not where more did.
    reused = results[0]["reused"]
    assert reused["values"] and reused["after"], reused
    assert not reused["float32"] and not reused["wider"], reused
    assert all(result["forgotten"] for result in results)

    for name, _, _ in SAVES:
        if name != "full disk":
            assert_as_fresh(tmp_path / name, results[0]["weights"][name])


def assert_as_fresh(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """``cached/`` holds what ``fresh/`` holds, item by item, and reads back: through
    bigbatch's checks, and through DCP on this one process as ``expected`` (gathered by FSDP
    from the live shards)."""
    cached, fresh = directory / "cached" / SHARDS_DIR, directory / "fresh" / SHARDS_DIR
    cached_metadata, cached_items = items(cached)
    fresh_metadata, fresh_items = items(fresh)
    assert cached_metadata.state_dict_metadata == fresh_metadata.state_dict_metadata
    assert cached_metadata.planner_data == fresh_metadata.planner_data
    assert cached_items.keys() == fresh_items.keys()
    for index, value in cached_items.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == fresh_items[index].dtype, index
            assert torch.equal(value, fresh_items[index]), index
        else:
            assert value == fresh_items[index], index
    shapes = ShardedWeights().read(cached.parent)
    assert {key: (t.shape, t.dtype) for key, t in shapes.items()} == {
        key: (t.shape, t.dtype) for key, t in expected.items()
    }
    loaded = load_on_one_process(cached, expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


class Unloadable:
    """What torch.load(weights_only=True) refuses."""


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_state_that_would_not_load_is_refused_at_save(tmp_path: Path, background: bool) -> None:
    model = models.mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    optimizer.param_groups[0]["schedule"] = Unloadable()
    checkpointer = Checkpointer(tmp_path, model=model, optimizer=optimizer, sharded=True)
    where = r"state\['optimizer'\]\['param_groups'\]\[0\]\['schedule'\] is a .*Unloadable"
    with pytest.raises(TypeError, match=where):
        if background:
            checkpointer.save_in_background(1)
            checkpointer.wait()
        else:
            checkpointer.save(1)
    assert list(tmp_path.iterdir()) == []


def an_upload_that_one_rank_never_joins(rank: int, world_size: int, directory: str) -> Any:
    """Rank 0 uploads a background copy that rank 1 staged but never uploads: how long rank 0
    waited, and what it raised."""
    import time

    weights = ShardedWeights(collective_timeout_s=3)
    model, optimizer = sharded_mlp(8, torch.float32, world_size)
    step(model, optimizer)
    finish = weights.write_staged(Path(directory), weights.stage(model, optimizer))
    if rank == 1:
        return None  # waits at the end's barrier on the default group, far beyond 3 s
    start = time.monotonic()
    try:
        finish()
    except Exception as error:  # noqa: BLE001 - the test reads what it was
        return time.monotonic() - start, type(error).__name__
    return "finished"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_that_never_joins_an_upload_is_noticed_after_the_collective_timeout(tmp_path):
    """The upload's own gloo group takes the run's collective_timeout, not torch's 30 minutes."""
    waited, error = run_processes(an_upload_that_one_rank_never_joins, 2, str(tmp_path))[0]
    assert 2.5 < waited < 30, (waited, error)
