"""Checkpoints written in the background, against the synchronous save path as the reference: the
same contents although training changes the weights meanwhile, an exact resume from them, a
failing background write as one line at the next step boundary (also on one of 2 gloo ranks), a
writer process that is killed or cannot start, and a process killed before the rename leaving the
previous checkpoint to resume from. Plain weights go through the writer process
(`checkpoint_writer`), whose faults `tests.train.writer_faults` injects; sharded ones through a
thread."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train import checkpoint_arena, checkpoint_weights, checkpoint_writer
from bigbatch.train.checkpoint import list_checkpoints, load_latest_checkpoint
from bigbatch.train.checkpointer import Checkpointer
from bigbatch.train.configfile import validate
from bigbatch.train.metrics import read_metrics
from bigbatch.train.rundir import StorageError
from bigbatch.train.trainer import Trainer
from tests import models
from tests.distributed_helpers import run_processes
from tests.train.test_checkpointer import Tally, Unloadable, file_limit, make_checkpointer

ROOT = Path(__file__).resolve().parents[2]
FAULTS = "tests.train.writer_faults"


@pytest.fixture
def faulty_writer(monkeypatch):
    """``faulty_writer(**env)``: the writer processes started from now on import
    `writer_faults`, with the faults ``env`` sets (``hold=path``, ``full_from=n``)."""

    def configure(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(f"BIGBATCH_TEST_WRITER_{name.upper()}", value)
        monkeypatch.setattr(Checkpointer, "writer_preload", (FAULTS,))

    return configure


@pytest.fixture
def writer_ready_first(monkeypatch):
    """Trainers wait for their writer process to be ready before the first step, so that every
    background save goes through it (a run of a few steps would otherwise end before it is
    ready, its saves written by a thread)."""
    start = Checkpointer.start_writer

    def start_and_wait(self: Checkpointer) -> None:
        start(self)
        assert self.writer_process is not None and self.writer_process.wait_ready(timeout=60)

    monkeypatch.setattr(Checkpointer, "start_writer", start_and_wait)


def started_writer(checkpointer: Checkpointer) -> checkpoint_writer.WriterProcess:
    """The checkpointer's writer process, started and ready for a job."""
    checkpointer.start_writer()
    process = checkpointer.writer_process
    assert process is not None and process.wait_ready(timeout=60)
    return process


def hold_the_writer(checkpointer, sharded: bool, faulty_writer, release_file: Path):
    """Hold the background write of ``checkpointer``; the call that lets it go on."""
    if not sharded:
        faulty_writer(hold=str(release_file))
        started_writer(checkpointer)
        return release_file.touch
    return gate_the_writer(checkpointer).set


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Equal nested contents: every tensor equal in dtype, shape and every bit."""
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (one, other) in enumerate(zip(actual, expected, strict=True)):
            assert_same(one, other, f"{where}[{index}]")
    else:
        assert actual == expected, where


def gate_the_writer(checkpointer) -> threading.Event:
    """Hold the background write of ``checkpointer`` until the returned event is set."""
    release, write_staged = threading.Event(), checkpointer.weights.write_staged

    def held(directory: Path, staged: Any):
        finish = write_staged(directory, staged)
        return lambda: (release.wait(timeout=60), finish())

    checkpointer.weights.write_staged = held
    return release


def assert_like_a_synchronous_save(
    checkpointer: Checkpointer, tally: Tally, directory: Path, step: int | None = None
) -> None:
    """The newest checkpoint of ``checkpointer`` holds what a synchronous save of the same model,
    optimizer and participant into ``directory`` holds now."""
    reference = Checkpointer(directory, model=checkpointer.model, optimizer=checkpointer.optimizer)
    reference.register("tally", tally)
    found = load_latest_checkpoint(checkpointer.directory)
    assert found is not None and (step is None or found.step == step)
    reference.save(found.step)
    expected = load_latest_checkpoint(directory)
    assert expected is not None
    assert_same(found.training_state, expected.training_state)
    assert_same(found.model_state, expected.model_state)


def restored(directory: Path, sharded: bool) -> dict[str, Any]:
    """A fresh model, optimizer and participant restored from the newest checkpoint."""
    checkpointer, tally = make_checkpointer(directory, sharded, seed=9, steps=0)
    found = load_latest_checkpoint(directory)
    assert found is not None
    checkpointer.restore(found)
    return {
        "model": checkpointer.model.state_dict(),
        "optimizer": checkpointer.optimizer.state_dict()["state"],
        "tally": tally.state_dict(),
    }


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "sharded"])
def test_a_background_save_holds_what_a_synchronous_one_does(tmp_path, sharded, faulty_writer):
    checkpointer, tally = make_checkpointer(tmp_path / "sync", sharded)
    tally.seen, tally.calls, tally.note = torch.tensor([4.0, 5.0, 6.0]), 3, "at step 2"
    checkpointer.save(2, extra={"total_steps": 9})
    model, optimizer = checkpointer.model, checkpointer.optimizer  # the same objects
    background = Checkpointer(
        tmp_path / "background", model=model, optimizer=optimizer, sharded=sharded
    )
    background.register("tally", tally)
    release = hold_the_writer(background, sharded, faulty_writer, tmp_path / "release")
    path = background.save_in_background(2, extra={"total_steps": 9})
    assert not path.exists()  # held: not there before it is complete
    with torch.no_grad():  # training goes on while the files are written
        for parameter in checkpointer.model.parameters():
            parameter.add_(1.0)
    for moments in checkpointer.optimizer.state.values():
        moments["exp_avg"].mul_(-3.0)
    tally.seen.add_(100.0)
    tally.calls, tally.note = 99, "later"
    assert background.poll() is None  # still writing: nothing to tell
    release()
    assert background.wait() == path and path.is_dir()

    sync_found = load_latest_checkpoint(tmp_path / "sync")
    background_found = load_latest_checkpoint(tmp_path / "background")
    assert sync_found is not None and background_found is not None
    assert_same(background_found.training_state, sync_found.training_state)
    if not sharded:
        assert_same(background_found.model_state, sync_found.model_state)
    assert_same(restored(tmp_path / "background", sharded), restored(tmp_path / "sync", sharded))


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_failed_background_write_is_one_line_and_the_previous_checkpoint_stays(
    tmp_path, monkeypatch, faulty_writer, writer
):
    checkpointer, _ = make_checkpointer(tmp_path, False)
    checkpointer.save(1)
    if writer == "process":  # a real limit on the writer's files, as a full disk would be
        process = started_writer(checkpointer)
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (2_000, hard))
        reason = "File too large"
    else:  # no writer process on this platform: a thread writes

        def full_disk(path: Path, state: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(checkpoint_arena, "available", lambda: False)
        monkeypatch.setattr(checkpoint_weights, "write_safetensors", full_disk)
        reason = "No space left on device"
    checkpointer.save_in_background(2)
    with pytest.raises(StorageError) as error:
        checkpointer.wait()
    message = str(error.value)
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'step-00000002'}: "), message
    assert reason in message, message
    assert message.endswith("the earlier checkpoints are intact (newest: step-00000001)")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no temporary left
    assert checkpointer.wait() is None  # told once; nothing pending any more


def test_a_killed_writer_is_one_line_and_the_next_save_starts_another(
    tmp_path, faulty_writer, monkeypatch
):
    checkpointer, tally = make_checkpointer(tmp_path / "background", False)
    checkpointer.save(1)
    faulty_writer(hold=str(tmp_path / "never"))
    process = started_writer(checkpointer)  # killed while it writes, not while it starts
    checkpointer.save_in_background(2)
    os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(StorageError) as error:
        checkpointer.wait()
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert f"the checkpoint writer process (pid {process.pid}) was killed by signal 9" in message
    assert message.endswith("the earlier checkpoints are intact (newest: step-00000001)")
    checkpoints = tmp_path / "background"
    assert [path.name for path in list_checkpoints(checkpoints)] == ["step-00000001"]
    tally.calls = 3
    monkeypatch.delenv("BIGBATCH_TEST_WRITER_HOLD")
    replacement = started_writer(checkpointer)  # a new writer, without the fault
    assert replacement is not process
    path = checkpointer.save_in_background(3)
    assert checkpointer.wait() == path
    assert_like_a_synchronous_save(checkpointer, tally, tmp_path / "sync")


def test_a_writer_that_cannot_start_leaves_the_writing_to_a_thread(tmp_path, monkeypatch, caplog):
    checkpointer, tally = make_checkpointer(tmp_path / "background", False)
    tally.seen, tally.calls = torch.arange(5.0), 4
    monkeypatch.setattr("sys.executable", "/bin/false")  # exits at once, never ready
    checkpointer.start_writer()
    process = checkpointer.writer_process
    assert process is not None and not process.wait_ready(timeout=60) and process.gone
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.checkpointer"):
        path = checkpointer.save_in_background(2)
        assert checkpointer.wait() == path
    assert "could not start" in caplog.text and "written by a thread" in caplog.text
    path = checkpointer.save_in_background(3)  # a thread again, no second try to start one
    assert checkpointer.wait() == path and checkpointer.writer_process is process
    assert_like_a_synchronous_save(checkpointer, tally, tmp_path / "sync")


def test_a_state_that_grows_is_staged_in_a_larger_block(tmp_path):
    checkpointer, tally = make_checkpointer(tmp_path / "background", False)
    started_writer(checkpointer)
    for step, size in enumerate([3, 3, 50_000, 7], start=1):  # the same places, then more, less
        tally.seen = torch.linspace(0.0, 1.0, size, dtype=torch.float64) * step
        path = checkpointer.save_in_background(step)
        assert checkpointer.wait() == path
        assert_like_a_synchronous_save(checkpointer, tally, tmp_path / f"sync-{step}", step)


def test_a_background_state_that_would_not_load_is_refused_at_save(tmp_path):
    checkpointer, _ = make_checkpointer(tmp_path, False)
    checkpointer.register("odd", Unloadable())
    with pytest.raises(TypeError, match=r"training_state\['odd'\]\['when'\]"):
        checkpointer.save_in_background(1)
    assert list(tmp_path.iterdir()) == []
    assert checkpointer.wait() is None  # nothing was started


def trained_weights(
    run_dir: Path, *, background: bool, resume: bool = False, delay: float = 0.0
) -> dict:
    """6 AdamW steps with a checkpoint after every one (each micro-batch ``delay`` seconds longer);
    the final weights."""

    def loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        time.sleep(delay)
        return models.mse_per_sample(model, *batch).sum(), batch[0].shape[0]

    model = models.mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    config = dict(global_batch_size=16, micro_batch_size=4, max_steps=6, checkpoint_every=1)
    config.update(keep_checkpoints=10, checkpoint_async=background, trackers=[])
    trainer = Trainer(
        model,
        optimizer,
        loss,
        torch.utils.data.TensorDataset(*models.regression_data(40)),
        validate(config),
        run_dir=run_dir,
        progress=False,
    )
    trainer.fit(resume=resume)
    return {name: value.clone() for name, value in trainer.module.state_dict().items()}


def test_a_run_resumed_from_a_background_checkpoint_is_exact(tmp_path, writer_ready_first, caplog):
    expected = trained_weights(tmp_path / "sync", background=False)
    with caplog.at_level(logging.INFO, logger="bigbatch.train.checkpoint_writer"):
        assert_same(trained_weights(tmp_path / "background", background=True), expected)
    written = [r.getMessage() for r in caplog.records if "in the background" in r.getMessage()]
    assert len(written) == 5 and not any("by a thread" in line for line in written)
    names = [path.name for path in list_checkpoints(tmp_path / "background" / "checkpoints")]
    assert names == [f"step-{step:08d}" for step in range(1, 7)]
    # Lose steps 4 to 6 (written in the background, as 1 to 5 were): resume from step 3.
    shutil.copytree(tmp_path / "background", tmp_path / "resumed")
    for step in (4, 5, 6):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step-{step:08d}")
    assert_same(trained_weights(tmp_path / "resumed", background=True, resume=True), expected)
    steps = [line["step"] for line in read_metrics(tmp_path / "resumed" / "metrics.jsonl", "train")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_failed_background_write_stops_the_run_at_the_next_step_boundary(
    tmp_path, faulty_writer, writer_ready_first
):
    faulty_writer(full_from="2")
    with pytest.raises(StorageError) as error:  # steps of 0.2 s: the writer fails in far less
        trained_weights(tmp_path, background=True, delay=0.05)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "step-00000002" in message, message
    assert "No space left on device" in message and "(newest: step-00000001)" in message
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000001"]
    # The write of step 2's checkpoint failed during step 3: the run stopped after it.
    assert [line["step"] for line in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


KILLED_BEFORE_THE_RENAME = r"""
import sys
from pathlib import Path
from tests.train.test_checkpointer import make_checkpointer

checkpointer, tally = make_checkpointer(Path(sys.argv[1]), False)
tally.calls = 1
checkpointer.save(1)
checkpointer.writer_preload = ("tests.train.writer_faults",)
checkpointer.start_writer()
assert checkpointer.writer_process.wait_ready(timeout=60)
print(checkpointer.writer_process.pid, flush=True)
tally.calls = 2
checkpointer.save_in_background(2)
checkpointer.wait()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("killed", ["training and writer", "training alone"])
def test_a_kill_before_the_rename_leaves_the_previous_checkpoint(tmp_path, killed):
    """The writer holds before the rename (as a slow disk would); the training process is
    SIGKILLed, with its writer (a machine lost) or alone (the writer then gives the job up and
    ends). Either way step 1 is the checkpoint a resume finds. The rename is the same for shards."""
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BEFORE_THE_RENAME, str(tmp_path)],
        cwd=ROOT,
        env={
            "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}",
            "OMP_NUM_THREADS": "1",
            "BIGBATCH_TEST_WRITER_STUCK_BEFORE_RENAME": "1",
        },
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    writer = int(process.stdout.readline())
    assert process.stdout.readline() == b"about to rename\n"  # printed by the writer
    if killed == "training and writer":
        os.kill(writer, signal.SIGKILL)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(writer)  # no writer outlives its training process
    temporaries = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    if killed == "training and writer":
        assert len(temporaries) == 1 and temporaries[0].startswith("step-00000002")
        meta = json.loads((tmp_path / temporaries[0] / "meta.json").read_text())
        assert meta["step"] == 2  # complete but for the rename: still never read
    else:
        assert temporaries == []  # given up and removed by the writer
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert restored(tmp_path, False)["tally"]["calls"] == 1


def fsdp_checkpointer(directory: Path, world_size: int) -> tuple[Checkpointer, Tally]:
    """An MLP sharded with FSDP2 over every rank after 2 AdamW steps, and its checkpointer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = models.mlp()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = models.regression_data(16)
    for _ in range(2):
        optimizer.zero_grad()
        models.mse_per_sample(model, x, y).mean().backward()
        optimizer.step()
    checkpointer = Checkpointer(directory, model=model, optimizer=optimizer, sharded=True)
    checkpointer.register("tally", tally := Tally())
    return checkpointer, tally


def background_saves_on_two_ranks(rank: int, world_size: int, directory: str) -> str | None:
    """An FSDP2 model's step 1 saved synchronously and in the background (its shards changed
    meanwhile); then step 2 in the background with rank 1's disk full: each rank's error."""
    checkpointer, tally = fsdp_checkpointer(Path(directory) / "sync", world_size)
    checkpointer.save(1)
    checkpointer.directory = Path(directory) / "background"
    release = gate_the_writer(checkpointer)
    checkpointer.save_in_background(1)
    with torch.no_grad():
        for parameter in checkpointer.model.parameters():
            parameter.mul_(2.0)
    tally.calls = 7
    release.set()
    checkpointer.wait()
    if rank == 1:
        file_limit(2_000)
    try:
        checkpointer.save_in_background(2)
        while checkpointer.poll() is None:  # at step boundaries, until it is over everywhere
            pass
    except StorageError as error:
        return str(error)
    finally:
        file_limit(None)
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_background_shards_on_two_ranks_and_a_full_disk_on_one(tmp_path):
    messages = run_processes(background_saves_on_two_ranks, 2, str(tmp_path))
    assert messages[0] is not None and messages[0] == messages[1]  # one line, every rank
    assert len(messages[0].splitlines()) == 1 and "File too large (rank 1)" in messages[0]
    assert "(newest: step-00000001)" in messages[0]
    background = tmp_path / "background"
    assert [p.name for p in background.iterdir()] == ["step-00000001"]
    assert_same(restored(background, True), restored(tmp_path / "sync", True))
