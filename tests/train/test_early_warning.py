"""The early warning sees a blow-up at step 2: the baseline is the first step, not an average.

It is logged once, on the run's log (`bigbatch.train.early_warning`), and a run prints it once.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.train.early_warning import EarlyWarning

SRC = Path(__file__).resolve().parents[2] / "src"


def test_a_blow_up_at_step_2_warns_at_step_2_with_its_figures(caplog):
    watch = EarlyWarning()
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.early_warning"):
        fired = [watch.observe(1, 2.3, 1.0, 5.0, 256), watch.observe(2, 4.9e7, 3e6, 5.0, 256)]
    assert fired[0] is None and fired[1] is not None
    assert caplog.messages == [fired[1]]
    assert "early warning at step 2" in fired[1]
    assert "the loss rose from 2.3 at step 1 to 4.9e+07" in fired[1]
    assert "mean of the last 2 steps 2.45e+07, above 1.5 x the first" in fired[1]
    assert "lr 5" in fired[1] and "global batch 256" in fired[1]


def test_a_falling_or_noisy_loss_does_not_warn():
    watch = EarlyWarning()
    losses = [2.3, 2.4, 2.2, 3.0, 1.9, 1.5, 1.6, 1.2, 1.0, 0.9]  # noisy, never 1.5 x the first
    assert [watch.observe(s, v, 1.0, 0.1, 64) for s, v in enumerate(losses, start=1)] == [None] * 10


def test_a_rising_loss_warns_once(caplog):
    watch = EarlyWarning()
    figures = [(1.0, 1.0), (1.1, 1.0), (0.9, 1.0), (1.4, 1.0), (2.0, 1.0), (2.2, 1.0), (3.0, 1.0)]
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.early_warning"):
        fired = [
            watch.observe(step, loss, grad_norm, 0.1, 256)
            for step, (loss, grad_norm) in enumerate(figures, start=1)
        ]
    # last-3 means against the first loss 1.0: 1.13, 1.43, 1.87 > 1.5 at step 6
    assert [message is not None for message in fired] == [False] * 5 + [True, False]
    assert caplog.messages == [fired[5]]
    assert "step 6" in fired[5] and "global batch 256" in fired[5] and "lr 0.1" in fired[5]
    assert "learning rate is too high" in fired[5] and "warmup_steps" in fired[5]


def test_a_gradient_spike_warns_only_in_the_first_steps(caplog):
    watch = EarlyWarning(window_steps=50)
    norms = [1.0, 1.2, 0.8, 1.1, 12.5, 30.0]
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.early_warning"):
        fired = [watch.observe(s, 1.0, g, 0.1, 64) for s, g in enumerate(norms, start=1)]
    assert [message is not None for message in fired] == [False] * 4 + [True, False]
    assert caplog.messages == [fired[4]] and "gradient norm spiked" in fired[4]
    assert "12.5" in fired[4] and "median 1.05" in fired[4]  # median of 1.0, 1.2, 0.8, 1.1
    late = EarlyWarning(window_steps=3)
    assert [late.observe(s, 1.0, g, 0.1, 64) for s, g in enumerate(norms, start=1)] == [None] * 6


def test_the_first_step_survives_a_checkpoint():
    watch = EarlyWarning()
    watch.observe(1, 2.0, 1.0, 0.1, 64)
    resumed = EarlyWarning()
    resumed.load_state_dict(watch.state_dict())
    assert resumed.observe(2, 10.0, 1.0, 0.1, 64) is not None
    older = EarlyWarning()  # a checkpoint of a version that kept the first three losses
    older.load_state_dict({"first_losses": [2.0, 2.1, 1.9], "recent_losses": [], "grad_norms": [],
                           "fired": False})  # fmt: skip
    assert older.first_loss == (1, 2.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_digits_at_lr_5_warns_at_step_2_and_prints_it_once(tmp_path):
    """A real `bigbatch train` in its own process: what its stderr shows, every channel at once."""
    argv = ["train", "--set", "lr=5", "--set", "max_steps=2", "--set", "global_batch_size=64"]
    argv += ["--set", "eval_every=0", "--no-progress", "--out", "run"]
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bigbatch", *argv]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert err.count("early warning at step") == 1, err
    # 2.3 is ln(10), chance on ten classes; lr 5 sends it past 1e6 in one step.
    assert re.search(
        r"early warning at step 2: the loss rose from 2\.\d+ at step 1 to \d\.\d+e\+0[6-9]", err
    )
