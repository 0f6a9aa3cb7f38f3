"""The checkpointer: registered participants round-trip; plain and sharded saves share one path,
its one-line storage errors on every rank (1 process and 2 gloo processes, never a hang), and a
damaged shard whose checksum was rewritten falls back to the previous checkpoint, and so do shards
that fail to load after their check (the same line on every rank)."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import resource
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train.checkpoint import list_checkpoints, load_latest_checkpoint, scan
from bigbatch.train.checkpointer import Checkpointer, DamagedCheckpoint
from bigbatch.train.rundir import StorageError
from tests import models
from tests.distributed_helpers import run_processes


class Tally:
    """A participant nobody's save or restore code knows about."""

    def __init__(self) -> None:
        self.seen = torch.zeros(3)
        self.calls = 0
        self.note = "fresh"

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen.clone(), "calls": self.calls, "note": self.note}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.calls, self.note = state["seen"].clone(), int(state["calls"]), state["note"]


def trained(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = models.mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = models.regression_data(16)
    for _ in range(steps):
        optimizer.zero_grad()
        models.mse_per_sample(model, x, y).mean().backward()
        optimizer.step()
    return model, optimizer


def make_checkpointer(directory: Path, sharded: bool, seed: int = 0, steps: int = 2):
    model, optimizer = trained(seed, steps)
    checkpointer = Checkpointer(directory, model=model, optimizer=optimizer, sharded=sharded)
    tally = Tally()
    checkpointer.register("tally", tally)
    return checkpointer, tally


def rewrite_checksum(checkpoint: Path, name: str) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_a_registered_participant_round_trips(tmp_path, sharded):
    saving, tally = make_checkpointer(tmp_path, sharded)
    tally.seen, tally.calls, tally.note = torch.tensor([1.0, 2.0, 3.0]), 5, "after two steps"
    path = saving.save(2, extra={"total_steps": 9})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["sharded"] is sharded and meta["format_version"] == 2
    assert ("shards/.metadata" in meta["sha256"]) is sharded

    restoring, fresh = make_checkpointer(tmp_path, sharded, seed=7, steps=0)
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found.training_state["total_steps"] == 9
    restoring.restore(found)
    assert torch.equal(fresh.seen, tally.seen)
    assert (fresh.calls, fresh.note) == (5, "after two steps")
    for name, value in saving.model.state_dict().items():
        assert torch.equal(restoring.model.state_dict()[name], value), name
    expected = saving.optimizer.state_dict()["state"]
    for index, moments in restoring.optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, expected[index][key]), (index, key)


def test_a_participant_missing_from_the_checkpoint_starts_afresh(tmp_path):
    saving, _ = make_checkpointer(tmp_path, False)
    saving.save(1)
    restoring, _ = make_checkpointer(tmp_path, False, seed=3)
    later = Tally()
    restoring.register("added_later", later)
    found = load_latest_checkpoint(tmp_path)
    assert found is not None
    restoring.restore(found)
    assert later.note == "fresh"


def test_registration_and_extra_are_checked(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path, False)
    with pytest.raises(TypeError, match="without state_dict"):
        checkpointer.register("planner", object())  # type: ignore[arg-type]
    for name in ("", "rng", "optimizer", "tally"):
        with pytest.raises(ValueError, match="participant"):
            checkpointer.register(name, Tally())
    with pytest.raises(ValueError, match=r"\['tally'\]"):
        checkpointer.save(1, extra={"tally": 1})
    assert list(tmp_path.iterdir()) == []


class Unloadable(Tally):
    def state_dict(self) -> dict[str, Any]:
        return {"when": object()}


def test_a_participant_state_that_would_not_load_is_refused_at_save(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path, False)
    checkpointer.register("odd", Unloadable())
    with pytest.raises(TypeError, match=r"training_state\['odd'\]\['when'\]"):
        checkpointer.save(1)
    assert list(tmp_path.iterdir()) == []


def file_limit(limit: int | None) -> None:
    """Make the kernel refuse writes past ``limit`` bytes (EFBIG), as a full disk would."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


def assert_one_line_and_intact(message: str, directory: Path, reason: str) -> None:
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert "cannot write checkpoint" in message and reason in message, message
    assert "intact (newest: step-00000001)" in message, message
    assert [p.name for p in directory.iterdir()] == ["step-00000001"]  # no temporary left
    found = load_latest_checkpoint(directory)
    assert found is not None and found.step == 1


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, sharded):
    checkpointer, _ = make_checkpointer(tmp_path, sharded)
    checkpointer.save(1)
    file_limit(2_000)  # smaller than the weights of the mlp
    try:
        with pytest.raises(StorageError) as error:
            checkpointer.save(2)
    finally:
        file_limit(None)
    assert_one_line_and_intact(str(error.value), tmp_path, "File too large")


def save_with_a_failing_rank(rank: int, world_size: int, directory: str, sharded: bool, how: str):
    """Step 1 saved, then step 2 with one rank unable to write; each rank's outcome."""
    torch.manual_seed(0)
    checkpointer, _ = make_checkpointer(Path(directory), sharded)
    checkpointer.save(1)
    if how == "full disk on rank 1" and rank == 1:
        file_limit(2_000)
    if how == "not a directory on rank 0" and rank == 0:
        checkpointer.directory = Path(directory) / "step-00000001" / "meta.json" / "x"
    if how == "a participant fails on rank 0" and rank == 0:
        checkpointer.register("broken", Broken())
    try:
        checkpointer.save(2)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        return f"{type(error).__name__}: {error}"
    finally:
        file_limit(None)
    return None


class Broken(Tally):
    def state_dict(self) -> dict[str, Any]:
        raise RuntimeError("a bug in a participant")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sharded", "how", "reason"),
    [
        (True, "full disk on rank 1", "File too large (rank 1)"),
        (True, "not a directory on rank 0", "Not a directory"),
        (False, "not a directory on rank 0", "Not a directory"),
        (True, "a participant fails on rank 0", "a bug in a participant"),
    ],
)
def test_a_storage_error_on_one_rank_is_one_line_on_every_rank(tmp_path, sharded, how, reason):
    messages = run_processes(save_with_a_failing_rank, 2, str(tmp_path), sharded, how)
    if how == "a participant fails on rank 0":  # its own error there, one line on the other
        assert messages[0] == "RuntimeError: a bug in a participant"
        assert messages[1].startswith("UsageError: rank 0 could not save the checkpoint")
    else:
        assert all(message.startswith("StorageError: ") for message in messages), messages
        assert messages[0] == messages[1]  # the same line on every rank
    for message in messages:
        assert len(message.splitlines()) == 1 and reason in message, message
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step")] == ["step-00000001"]
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found.step == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated item"])
def test_a_damaged_shard_with_a_valid_checksum_falls_back(tmp_path, caplog, damage):
    checkpointer, tally = make_checkpointer(tmp_path, True)
    checkpointer.save(1)
    tally.calls = 2
    checkpointer.save(2)
    newest = tmp_path / "step-00000002"
    shard = next((newest / "shards").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(b"\x80garbage" * (len(data) // 8) if damage == "garbage" else data[:-40])
    rewrite_checksum(newest, f"shards/{shard.name}")
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.checkpoint"):
        found = load_latest_checkpoint(tmp_path)
    assert found is not None and found.step == 1 and found.skipped == (newest,)
    assert "skipping checkpoint" in caplog.text and str(newest) in caplog.text
    restoring, fresh = make_checkpointer(tmp_path, True, seed=5, steps=0)
    restoring.restore(found)
    assert fresh.calls == 0


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_shard_metadata_with_arbitrary_objects_is_refused_not_executed(tmp_path, caplog):
    checkpointer, _ = make_checkpointer(tmp_path, True)
    checkpointer.save(1)
    checkpointer.save(2)
    newest, marker = tmp_path / "step-00000002", tmp_path / "code-ran"
    (newest / "shards" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rewrite_checksum(newest, "shards/.metadata")
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found.step == 1
    assert "never unpickled" in caplog.text
    assert not marker.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def restore_after_the_shards_changed(rank: int, world_size: int, directory: str):
    """Steps 1 and 2 saved sharded; step 2 validated on every rank, then its shards damaged
    before the restore: each rank's outcome, then the previous checkpoint restored."""
    torch.manual_seed(0)
    checkpointer, tally = make_checkpointer(Path(directory), True)
    checkpointer.save(1)
    tally.calls = 2
    checkpointer.save(2)
    found = load_latest_checkpoint(Path(directory))
    assert found is not None and found.step == 2
    torch.distributed.barrier()
    if rank == 0:
        for shard in (found.path / "shards").glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:-40])
    torch.distributed.barrier()
    restoring, fresh = make_checkpointer(Path(directory), True, seed=5, steps=0)
    try:
        restoring.restore(found)
        outcome = None
    except DamagedCheckpoint as error:
        outcome = (str(error), error.reason)
    assert outcome is not None
    again = scan(Path(directory), damaged={found.path: outcome[1]})
    assert again.found is not None and again.found.step == 1
    assert again.damaged == ((found.path, outcome[1]),)
    restoring.restore(again.found)
    return outcome[0], fresh.calls


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shards_that_fail_to_load_after_their_check_are_damaged_on_every_rank(tmp_path):
    outcomes = run_processes(restore_after_the_shards_changed, 2, str(tmp_path))
    assert outcomes[0][0] == outcomes[1][0]  # the same line on every rank
    message = outcomes[0][0]
    assert message.startswith(f"resume: cannot restore {tmp_path / 'step-00000002'}: ")
    assert len(message.splitlines()) == 1 and "(rank " in message, message
    assert [calls for _, calls in outcomes] == [0, 0]  # step 1's state, restored
