"""A signal stops a run at the end of a step with a checkpoint; `--resume` then ends bitwise equal.

The reference is the same command left alone. Runs go through the command line in fresh
interpreters, on 1 process and on 2 (gloo, launched as torchrun would, the signal sent to one rank
only), with a recipe whose loss_fn sleeps a little so that the signal lands inside a step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_helpers import free_port
from tests.slow_recipe import REAPER, SIGNAL_BEFORE_TRAINING, SLOW_RECIPE

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 12
SETTINGS = [
    "--set", "recipe=slow:build", "--set", "global_batch_size=64", "--set", "micro_batch_size=16",
    "--set", f"max_steps={MAX_STEPS}", "--set", "eval_every=4", "--set", "checkpoint_every=5",
    "--set", "lr_schedule=cosine", "--set", "warmup_steps=2", "--no-progress",
]  # fmt: skip


TOKEN_SETTINGS = [
    "--set", "recipe=slow:build_tokens", "--set", "global_batch_tokens=600",
    "--set", "micro_batch_tokens=200", "--set", "packing=true", "--set", "num_workers=2",
    "--set", "recipe_options.num_train_samples=2000", "--set", f"max_steps={MAX_STEPS}",
    "--set", "eval_every=4", "--set", "checkpoint_every=5", "--set", "lr_schedule=cosine",
    "--set", "warmup_steps=2", "--no-progress",
]  # fmt: skip


def launch(
    work: Path,
    out: Path,
    *extra: str,
    delay: float = 0.0,
    rank: int = 0,
    world: int = 1,
    port=0,
    settings: list[str] = SETTINGS,
    new_session: bool = False,
) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "STEP_DELAY": str(delay),
    }
    if world > 1:  # what torchrun sets
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    command = [sys.executable, "-m", "bigbatch", "train", *settings, *extra, "--out", str(out)]
    return subprocess.Popen(
        command,
        cwd=work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=new_session,  # a group of its own, as a terminal's foreground job
    )


def launch_all(work: Path, out: Path, *extra: str, world: int, delay: float = 0.0):
    port = free_port()
    return [
        launch(work, out, *extra, delay=delay, rank=r, world=world, port=port) for r in range(world)
    ]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        results.append((process.returncode, out, err))
    return results


def train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written
        if record["kind"] == "train":
            steps.append(record["step"])
    return steps


def assert_bitwise_equal(expected_dir: Path, actual_dir: Path) -> None:
    expected = load_file(expected_dir / "final.safetensors")
    actual = load_file(actual_dir / "final.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert train_steps(actual_dir) == list(range(1, MAX_STEPS + 1))  # one train line per step
    evals = [json.loads(line) for line in (actual_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [4, 8, 12]
    assert not (actual_dir / ".bigbatch.lock").exists()  # the lock goes with the run


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work")
    (work / "slow.py").write_text(SLOW_RECIPE)
    return work


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The run left alone, on one process."""
    out = work / "reference"
    ((code, _, err),) = finish(launch_all(work, out, world=1))
    assert code == 0, err[-2000:]
    return out


def stop_at_a_random_step(
    processes: list[subprocess.Popen], out: Path, number: int, target: int = 0, group: bool = False
) -> tuple[int, float]:
    """Send the signal to one process (with group, to its whole process group, data workers
    included, as a Ctrl-C in a terminal does) once a random step has run; (that step, seconds
    to exit)."""
    step = random.randint(2, MAX_STEPS - 3)
    deadline = time.monotonic() + 200
    while len(train_steps(out)) < step:
        assert all(p.poll() is None for p in processes), "a run ended before the signal"
        assert time.monotonic() < deadline, "the run does not progress"
        time.sleep(0.01)
    sent = time.monotonic()
    if group:
        os.killpg(processes[target].pid, number)
    else:
        processes[target].send_signal(number)
    for process in processes:
        process.wait(timeout=120)
    return step, time.monotonic() - sent


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("name", "extra"),
    [("SIGTERM", []), ("SIGINT", []), ("SIGUSR1", ["--set", "stop_signals=[SIGUSR1]"])],
)
def test_a_signal_at_a_random_step_then_resume_is_bitwise_equal(
    work, reference, tmp_path, name, extra
):
    number = signal.Signals[name]
    out = tmp_path / "stopped"
    processes = launch_all(work, out, *extra, world=1, delay=0.05)
    step, exit_s = stop_at_a_random_step(processes, out, number)
    code, _, err = finish(processes)[0]
    assert code == 128 + number, err[-2000:]
    assert not (out / "final.safetensors").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"bigbatch train: stopped by {name} after step "), err[-2000:]
    assert "--resume" in last and str(out) in last and "Traceback" not in err
    stopped_at = len(train_steps(out))
    assert stopped_at in (step, step + 1), (step, stopped_at)  # the step in progress, no more
    assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert not (out / ".bigbatch.lock").exists()  # a stopped run takes its lock file along
    print(f"{name} after step {step}: exit after {exit_s:.2f} s")
    assert exit_s < 60
    ((code, _, err),) = finish(launch_all(work, out, *extra, "--resume", world=1))
    assert code == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints'}/step-{stopped_at:08d}" in err
    assert_bitwise_equal(reference, out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_token_run_with_workers_stopped_by_sigint_resumes_bitwise_equal(work, tmp_path):
    """The token path gets the sample path's stop handling by construction: its DataLoader
    workers ignore the stop signals (the Ctrl-C here reaches the whole process group, workers
    included) and the main process saves at the step boundary."""
    tokens = {"settings": TOKEN_SETTINGS}
    reference = tmp_path / "reference"
    ((code, _, err),) = finish([launch(work, reference, **tokens)])
    assert code == 0, err[-2000:]
    out = tmp_path / "stopped"
    processes = [launch(work, out, delay=0.05, new_session=True, **tokens)]
    step, _ = stop_at_a_random_step(processes, out, signal.SIGINT, group=True)
    code, _, err = finish(processes)[0]
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    stopped_at = len(train_steps(out))
    assert stopped_at in (step, step + 1), (step, stopped_at)
    ((code, _, err),) = finish([launch(work, out, "--resume", **tokens)])
    assert code == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints'}/step-{stopped_at:08d}" in err
    assert_bitwise_equal(reference, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_one_of_two_ranks_stops_both_then_resume_is_bitwise_equal(work, tmp_path):
    results = finish(launch_all(work, tmp_path / "reference", world=2))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    out = tmp_path / "stopped"
    processes = launch_all(work, out, world=2, delay=0.05)
    step, exit_s = stop_at_a_random_step(processes, out, signal.SIGTERM, target=1)
    results = finish(processes)
    assert [code for code, _, _ in results] == [143, 143], results[0][2][-3000:]
    last = results[0][2].strip().splitlines()[-1]
    assert last.startswith("bigbatch train: stopped by SIGTERM after step "), last
    assert "--resume" in last and "torchrun" not in last
    assert "stopped by" not in results[1][2]  # rank 0 alone says it
    stopped_at = len(train_steps(out))
    assert stopped_at in (step, step + 1)
    print(f"SIGTERM to rank 1 after step {step}: both exited after {exit_s:.2f} s")
    results = finish(launch_all(work, out, "--resume", world=2))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert_bitwise_equal(tmp_path / "reference", out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_ctrl_c_aborts_at_once(work, tmp_path):
    out, started = tmp_path / "run", tmp_path / "started"
    os.environ["STARTED_FILE"] = str(started)  # launch() passes the environment on
    try:
        (process,) = launch_all(work, out, world=1, delay=2.0)  # a step takes 8 s
    finally:
        del os.environ["STARTED_FILE"]
    deadline = time.monotonic() + 200
    while not started.exists():  # the first step runs: the handlers are in place
        assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the first one is handled: it asks for a stop at the end of the step
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGINT  # ended by the signal itself, mid-step
    assert time.monotonic() - sent < 5
    assert "Ctrl-C again aborts at once" in process.stderr.read()  # type: ignore[union-attr]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def torchrun(work: Path, out: Path, *extra: str, delay: float = 0.0, reaped: bool = False):
    """`torchrun --nproc_per_node=2 -m bigbatch train` (under `REAPER` with reaped)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{work}", "OMP_NUM_THREADS": "1"}
    env.update(STEP_DELAY=str(delay), PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "bigbatch", "train", *SETTINGS, *extra, "--out", str(out),
    ]  # fmt: skip
    if reaped:
        command = [sys.executable, "-c", REAPER, *command]
    return subprocess.Popen(command, cwd=work, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


@pytest.fixture(scope="module")
def torchrun_reference(work) -> Path:
    """The run left alone, under torchrun with 2 processes."""
    out = work / "torchrun-reference"
    process = torchrun(work, out)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    return out


def signal_the_launcher(
    work: Path, out: Path, number: int
) -> tuple[int, dict[int, int], str, float]:
    """Run under torchrun (and `REAPER`), send the launcher the signal at a random step; (that
    step, {pid: exit code} with the launcher's first, everything printed, seconds until every
    process ended)."""
    process = torchrun(work, out, delay=0.1, reaped=True)
    assert process.stdout is not None
    launcher = int(process.stdout.readline())
    step = random.randint(2, MAX_STEPS - 3)
    deadline = time.monotonic() + 200
    while len(train_steps(out)) < step:
        assert process.poll() is None and time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    sent = time.monotonic()
    os.kill(launcher, number)
    stdout, err = process.communicate(timeout=120)
    codes = dict(tuple(map(int, line.split())) for line in stdout.splitlines())
    return step, {launcher: codes.pop(launcher), **codes}, err, time.monotonic() - sent


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sigterm_to_torchrun_stops_its_workers_then_resume_is_bitwise_equal(
    work, torchrun_reference, tmp_path
):
    out = tmp_path / "stopped"
    step, codes, err, _ = signal_the_launcher(work, out, signal.SIGTERM)
    assert list(codes.values()) == [1], err[-3000:]  # torchrun's own: it reaps its workers
    assert "SignalException: Process" in err and "got signal: 15" in err  # torchrun's traceback
    stopped_at = len(train_steps(out))
    assert stopped_at in (step, step + 1), (step, stopped_at)
    assert f"bigbatch train: stopped by SIGTERM after step {stopped_at} of {MAX_STEPS}" in err
    assert "continue with the same launch command plus --out" in err
    assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    process = torchrun(work, out, "--resume")
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert_bitwise_equal(torchrun_reference, out)


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.skipif(sys.platform != "linux", reason="the test's reaper needs Linux's prctl")
def test_sigkill_to_torchrun_stops_its_orphaned_workers_with_a_checkpoint(
    work, torchrun_reference, tmp_path
):
    out = tmp_path / "stopped"
    step, codes, err, exit_s = signal_the_launcher(work, out, signal.SIGKILL)
    launcher_code, *worker_codes = codes.values()
    assert launcher_code == -signal.SIGKILL and worker_codes == [143, 143], err[-3000:]
    assert err.count("its launcher (pid") == 2  # each worker noticed
    stopped_at = len(train_steps(out))
    assert stopped_at < MAX_STEPS and (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert f"stopped by SIGTERM after step {stopped_at} of {MAX_STEPS}" in err
    print(f"SIGKILL to torchrun after step {step}: its workers ended after {exit_s:.1f} s")
    assert exit_s < 60  # a look at the parent a second, the step in progress, a checkpoint
    process = torchrun(work, out, "--resume")  # the lock went with the workers: not "in use"
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert_bitwise_equal(torchrun_reference, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_before_the_first_step_exits_143_with_nothing_trained(work, reference, tmp_path):
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SIGNAL_BEFORE_TRAINING, "train", *SETTINGS, "--out", str(out)]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 143, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"bigbatch train: stopped by SIGTERM before step 1 of {MAX_STEPS}: nothing trained, "
        "nothing saved; continue with: bigbatch train"
    ), last
    assert train_steps(out) == [] and not list((out / "checkpoints").glob("step-*"))
    ((code, _, err),) = finish(launch_all(work, out, "--resume", world=1))
    assert code == 0, err[-2000:]
    assert_bitwise_equal(reference, out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_the_last_step_finishes_the_run_and_exits_143(work, tmp_path, monkeypatch):
    out = tmp_path / "signalled"
    monkeypatch.setenv("SIGNAL_AT_CALL", str(4 * (MAX_STEPS - 1) + 2))  # inside the last step
    ((code, stdout, err),) = finish([launch(work, out, "--set", "eval_every=0")])
    assert code == 143, err[-2000:]
    assert f"done: {MAX_STEPS} steps" in stdout  # the summary of a finished run
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"bigbatch train: SIGTERM received during the last step: the run finished all "
        f"{MAX_STEPS} steps"
    ), last
    assert train_steps(out) == list(range(1, MAX_STEPS + 1))
    assert (out / "report.md").exists() and (out / "final.safetensors").exists()
    assert (out / "checkpoints" / f"step-{MAX_STEPS:08d}").is_dir()


WATCH = """
import os, signal, sys, threading
from bigbatch.train.preemption import LauncherWatch

received = threading.Event()
signal.signal(signal.SIGTERM, lambda number, frame: received.set())
watch = LauncherWatch(interval_s=0.05)
watch.parent = -1  # as if the launcher seen at start had gone: the parent is another process now
watch.start()
sys.exit(0 if received.wait(30) else 1)
"""


@pytest.mark.timeout(120)
def test_the_launcher_watch_sends_sigterm_once_the_parent_changed():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-c", WATCH], env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its launcher (pid -1) is gone: stopping as on SIGTERM" in result.stderr
