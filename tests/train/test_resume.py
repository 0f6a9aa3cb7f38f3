"""A run killed with SIGKILL and resumed ends with weights bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
from bigbatch.train.configfile import validate
from bigbatch.train.trainer import Trainer
from tests import models

run_dir, resume = sys.argv[1], sys.argv[2] == "resume"
delay = float(os.environ.get("STEP_DELAY", "0"))
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(5, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 3)
).double()
x, y = models.regression_data(50)

def loss_fn(m, batch):
    time.sleep(delay)
    return models.mse_per_sample(m, *batch).sum(), batch[0].shape[0]

config = validate(dict(global_batch_size=16, micro_batch_size=4, max_steps=14,
                       checkpoint_every=2, lr_schedule="cosine", warmup_steps=3))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
Trainer(model, optimizer, loss_fn, torch.utils.data.TensorDataset(x, y), config,
        run_dir=run_dir, progress=False).fit(resume=resume)
"""


def launch(run_dir: Path, mode: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STEP_DELAY": str(delay)}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(run_dir), mode],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-2000:]


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    reference = launch(tmp_path / "uninterrupted", "fresh")
    killed_dir = tmp_path / "killed"
    killed = launch(killed_dir, "fresh", delay=0.05)
    deadline = time.monotonic() + 60
    while not list((killed_dir / "checkpoints").glob("step-00000004")):
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stderr.close()  # type: ignore[union-attr]
    assert not (killed_dir / "final.safetensors").exists(), "the run ended before the kill"
    finish(launch(killed_dir, "resume"))
    finish(reference)
    expected = load_file(tmp_path / "uninterrupted" / "final.safetensors")
    actual = load_file(killed_dir / "final.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].equal(actual[name]), name
    steps = [
        line.split('"step": ')[1].split(",")[0]
        for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
        if '"kind": "train"' in line
    ]
    assert steps == [str(step) for step in range(1, 15)]
