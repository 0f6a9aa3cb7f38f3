"""One run per directory: a second run is refused naming the holder's pid; a killed run's lock goes;
the lock file goes with the run that held it, and a run that locked a file being removed locks the
file at the path instead.

The concurrent case runs two command lines on one directory, the second with --overwrite (the one
that would delete the first run's files); the first must end exactly as a run in a directory of
its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.train.rundir import LOCK_FILE, RunLock
from bigbatch.units import UsageError
from tests.slow_recipe import SLOW_RECIPE

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(UsageError) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert str(tmp_path / "run") in message and f"pid {os.getpid()}" in message
        assert "\n" not in message
    with RunLock(tmp_path / "run"):  # released: the next run gets it
        pass


def test_the_lock_file_goes_when_the_run_ends_however_it_ends(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # a run that ends normally
        (run_dir / "metrics.jsonl").write_text("")
    assert sorted(path.name for path in run_dir.iterdir()) == ["metrics.jsonl"]
    with pytest.raises(RuntimeError), RunLock(run_dir):  # an error, a stop signal's RunStopped
        raise RuntimeError("the user's code failed")
    assert not (run_dir / LOCK_FILE).exists()


def test_a_refused_run_leaves_the_directory_as_it_found_it(tmp_path):
    with pytest.raises(UsageError), RunLock(tmp_path / "new" / "run"):
        raise UsageError("refused")
    assert not (tmp_path / "new").exists()
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / LOCK_FILE).write_text("12345\n")  # a run killed with SIGKILL
    with pytest.raises(UsageError), RunLock(tmp_path / "killed"):
        raise UsageError("refused")
    assert (tmp_path / "killed" / LOCK_FILE).read_text() == "12345\n"


def test_a_lock_on_a_file_its_holder_removed_moves_to_the_file_at_the_path(tmp_path, monkeypatch):
    """The race of the unlink: B opens the lock file, A ends (removes it, releases the flock),
    B's flock then succeeds on a file no longer at the path; B must lock the one there now, so
    that a third run C is refused while B runs."""
    first = RunLock(tmp_path)
    first.acquire()
    real_open, interleaved = os.open, []

    def open_then_the_holder_ends(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        if not interleaved:
            interleaved.append(fd)
            first.release()
        return fd

    monkeypatch.setattr(os, "open", open_then_the_holder_ends)
    second = RunLock(tmp_path)
    second.acquire()
    monkeypatch.setattr(os, "open", real_open)
    assert interleaved  # the holder ended between the second's open and its flock
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(UsageError, match="is in use by another bigbatch run"):
        RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_holder_never_blocks_the_next_run(tmp_path):
    hold = (
        "import sys, time\n"
        "from bigbatch.train.rundir import RunLock\n"
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
    with pytest.raises(UsageError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bigbatch", "train", "--no-progress", "--out", str(out),
        "--set", "recipe=slow:build", "--set", "max_steps=30", "--set", "global_batch_size=64",
        "--set", "eval_every=0", "--set", "checkpoint_every=4", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_runs_on_one_directory_one_refused_the_other_exact(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_RECIPE)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    run = {"cwd": tmp_path, "text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    reference = subprocess.run(command(tmp_path / "alone"), env=env, timeout=240, **run)
    assert reference.returncode == 0, reference.stderr[-2000:]
    shared = tmp_path / "shared"
    # The first run holds in its first step until the others were refused, however slow they start.
    hold = tmp_path / "hold"
    hold.touch()
    started = tmp_path / "started"
    held = {"HOLD_FILE": str(hold), "STARTED_FILE": str(started)}
    first = subprocess.Popen(command(shared), env={**env, **held}, **run)
    deadline = time.monotonic() + 200
    while not started.exists():  # it holds the lock and trains
        assert first.poll() is None, first.stderr.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    seconds = [
        subprocess.Popen(command(shared, *extra), env=env, **run)
        for extra in ([], ["--overwrite"], ["--resume"])
    ]
    for second in seconds:
        _, err = second.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, err[-2000:]
        assert f"run directory {str(shared)!r} is in use" in lines[0]
        assert f"pid {first.pid}" in lines[0]
    assert first.poll() is None, "the first run ended before the others were refused"
    hold.unlink()
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    assert not (shared / LOCK_FILE).exists() and not (tmp_path / "alone" / LOCK_FILE).exists()
    expected = load_file(tmp_path / "alone" / "final.safetensors")
    actual = load_file(shared / "final.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    records = [json.loads(line) for line in (shared / "metrics.jsonl").read_text().splitlines()]
    # One train line per step and the final evaluation, nothing from the refused runs.
    assert [(r["kind"], r["step"]) for r in records] == [
        *(("train", step) for step in range(1, 31)),
        ("eval", 30),
    ]
