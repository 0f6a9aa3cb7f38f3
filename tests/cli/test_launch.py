"""`torchrun -m bigbatch train` on CPU (gloo): one machine with 2 processes, and two single-process
launchers on loopback standing in for two machines (c10d rendezvous). A few steps each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = [
    "-m", "bigbatch", "train", "--no-progress",
    "--set", "max_steps=2", "--set", "global_batch_size=32", "--set", "micro_batch_size=8",
    "--set", "eval_every=0", "--set", "checkpoint_every=0",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _check_run(out: Path, stdout: str) -> None:
    assert "done: 2 steps" in stdout
    assert (out / "final.safetensors").exists() and (out / "metrics.jsonl").exists()


def test_torchrun_two_processes_on_one_machine(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc_per_node=2", *TRAIN, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(out, result.stdout)
    assert result.stdout.count("done: 2 steps") == 1  # only rank 0 prints the summary
    assert "2 (ranks)" in result.stderr  # the plan of the first step, over 2 ranks


def test_two_launchers_on_loopback_as_two_machines(tmp_path):
    out, port = tmp_path / "run", free_port()
    launchers = []
    for node_rank in (0, 1):
        command = [
            *TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node-rank={node_rank}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bigbatch-test",
            *TRAIN, "--out", str(out),
        ]  # fmt: skip
        launchers.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=_env(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    outputs = []
    try:
        for launcher in launchers:
            outputs.append(launcher.communicate(timeout=240))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][1][-3000:]
    stdout = "".join(stdout for stdout, _ in outputs)
    _check_run(out, stdout)
    assert stdout.count("done: 2 steps") == 1
