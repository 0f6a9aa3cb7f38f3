"""`bigbatch train --autoresume`: the same command starts a run and continues it, under every rule
of --resume; `collective_timeout` reaches the process group. (The elastic run itself, under
torchrun with an agent lost: tests/train/test_elastic.py.)"""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist

from bigbatch.cli import main
from bigbatch.train.configfile import load_config
from bigbatch.train.recipe_run import fit
from tests.distributed_helpers import free_port

TINY = [
    "--set", "global_batch_size=32", "--set", "micro_batch_size=16", "--set", "eval_every=0",
    "--set", "checkpoint_every=1", "--set", "trackers=[]", "--no-progress",
]  # fmt: skip


def _train_steps(out) -> list[int]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if line["kind"] == "train"]


def test_autoresume_starts_a_run_then_continues_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--set", "max_steps=2", "--out", str(out), "--autoresume"]) == 0
    assert _train_steps(out) == [1, 2]
    assert main(["train", *TINY, "--set", "max_steps=3", "--out", str(out), "--autoresume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert _train_steps(out) == [1, 2, 3]  # one line per step: the first two kept, not repeated


def test_autoresume_refuses_a_run_it_cannot_continue(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--set", "max_steps=1", "--out", str(out)]) == 0
    for checkpoint in (out / "checkpoints").iterdir():
        for file in checkpoint.iterdir():
            file.unlink()
        checkpoint.rmdir()
    capsys.readouterr()
    code = main(["train", *TINY, "--set", "max_steps=2", "--out", str(out), "--autoresume"])
    err = capsys.readouterr().err
    assert code == 2 and "which holds a run" in err and "metrics.jsonl up to step 1" in err
    assert _train_steps(out) == [1]  # nothing changed


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--autoresume"], "--autoresume needs --out DIR"),
        (["--autoresume", "--out", "x", "--overwrite"], "--overwrite deletes it"),
    ],
)
def test_autoresume_needs_a_run_directory_it_keeps(flags, fragment, capsys):
    assert main(["train", *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_collective_timeout_is_the_process_groups(tmp_path, monkeypatch):
    """One process launched as torchrun launches it: its group waits collective_timeout."""
    environment = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    for key, value in {**environment, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    config = load_config(None, ["max_steps=1", "eval_every=0", "trackers=[]"])
    assert not dist.is_initialized()
    try:
        fit(config.model_copy(update={"collective_timeout": 37}), out_dir=tmp_path, progress=False)
        gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert gloo.options._timeout == datetime.timedelta(seconds=37)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_torchrun_restart_without_autoresume_is_refused_with_the_fix(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--set", "max_steps=1", "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
        assert main(["train", *TINY, "--set", "max_steps=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "torchrun's restart 2" in err
    assert "launch with --autoresume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "604801", "2.5", "true", "ten"])
def test_collective_timeout_outside_a_week_of_whole_seconds_is_refused(value, capsys):
    assert main(["train", "--set", f"collective_timeout={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "collective_timeout" in err
    assert "in [1, 604800] (a week)" in err
