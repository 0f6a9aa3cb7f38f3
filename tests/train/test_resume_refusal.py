"""A resume never destroys a run: with no valid checkpoint where a run is, it refuses.

Through the command line: every checkpoint deleted, or every one damaged, or only a config.yaml
left, gives exit 2 and one line naming what was found and the choices, and leaves every byte of
the directory as it was (nothing set aside, no file created); an empty or missing directory starts
fresh. The same refusal on 2 gloo processes, as torchrun launches them, ends both without a hang.
A checkpoint that passes its checks but fails to restore -- on every rank, or on one rank only --
is set aside and the previous one used, ending bitwise equal to the run left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.cli import main
from bigbatch.train.configfile import validate
from bigbatch.train.trainer import Trainer
from tests.distributed_helpers import free_port, run_processes

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    "--set", "global_batch_size=64", "--set", "micro_batch_size=16", "--set", "eval_every=0",
    "--set", "checkpoint_every=1", "--no-progress",
]  # fmt: skip
CHOICES = (
    "Nothing was changed. Pass --overwrite to start afresh (it deletes that run), or restore a "
    "checkpoint into its checkpoints/ and resume again"
)


def train(capsys, out: Path, *extra: str, steps: int) -> tuple[int, str]:
    code = main(["train", *BASE, "--set", f"max_steps={steps}", *extra, "--out", str(out)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    """A finished run of 3 steps with a checkpoint of each (copied before it is changed)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *BASE, "--set", "max_steps=3", "--out", str(out)]) == 0
    return out


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file and folder of the directory, with its bytes (the lock file included)."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes() if path.is_file() else b"<dir>"
        for path in sorted(run_dir.rglob("*"))
    }


def refusal(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("bigbatch train: error:")]
    assert len(lines) == 1, err
    assert len(lines[0]) <= 400 + len("bigbatch train: error: "), lines[0]
    return lines[0]


def test_every_checkpoint_deleted_is_refused_and_nothing_changes(capsys, tmp_path, three_steps):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    for checkpoint in (out / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
    metrics = (out / "metrics.jsonl").read_bytes()
    before = snapshot(out)
    code, err = train(capsys, out, "--resume", steps=5)
    assert code == 2
    line = refusal(err)
    assert f"no valid checkpoint in {out}, which holds a run: no checkpoint, but" in line
    assert "metrics.jsonl up to step 3" in line, line
    assert line.endswith(CHOICES)
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert snapshot(out) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def test_every_checkpoint_damaged_is_refused_and_none_is_set_aside(
    capsys, tmp_path, monkeypatch, three_steps
):
    monkeypatch.chdir(tmp_path)  # a short --out: the line has room for every reason
    out = Path("run")
    shutil.copytree(three_steps, out)
    assert not (out / ".bigbatch.lock").exists()  # the finished run took its lock file along
    for checkpoint in (out / "checkpoints").iterdir():
        truncate(checkpoint / "model.safetensors")
    (out / "checkpoints" / "step-00000002.damaged").mkdir()  # set aside by an earlier resume
    before = snapshot(out)
    code, err = train(capsys, out, "--resume", steps=5)
    assert code == 2
    line = refusal(err)
    assert (
        "3 checkpoints, all damaged: step-00000003, step-00000002, step-00000001 "
        "(model.safetensors does not match its sha256 in meta.json, truncated or modified); "
        "metrics.jsonl up to step 3"
    ) in line, line
    assert line.endswith(CHOICES)
    assert snapshot(out) == before  # byte for byte; no .damaged, no lock file


def test_a_directory_with_only_a_config_and_no_step_starts_fresh(capsys, tmp_path, three_steps):
    # What a run stopped before its first step leaves: nothing trained is lost by starting.
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(three_steps / "config.yaml", out / "config.yaml")
    (out / "metrics.jsonl").write_text("")
    code, err = train(capsys, out, "--resume", steps=2)
    assert code == 0, err[-2000:]
    assert "no valid checkpoint" in err and "starting at step 0" in err
    assert (out / "final.safetensors").exists()


@pytest.mark.parametrize("directory", ["missing", "empty", "only the lock file"])
def test_a_directory_without_a_run_starts_fresh(capsys, tmp_path, directory):
    out = tmp_path / "run"
    if directory != "missing":
        out.mkdir()
    if directory == "only the lock file":
        (out / ".bigbatch.lock").write_text("12345\n")
    code, err = train(capsys, out, "--resume", steps=2)
    assert code == 0, err
    assert "no valid checkpoint" in err and "starting at step 0" in err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [1, 2]
    assert (out / "final.safetensors").exists()


# -- 2 processes, as torchrun launches them -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_refusal_ends_both_of_two_ranks_without_a_hang(tmp_path, three_steps):
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    for checkpoint in (out / "checkpoints").iterdir():
        truncate(checkpoint / "state.pt")
    before = snapshot(out)
    port = free_port()
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "OMP_NUM_THREADS": "1",
            **dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)),
            **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        }
        command = [sys.executable, "-m", "bigbatch", "train", *BASE, "--set", "max_steps=5"]
        processes.append(
            subprocess.Popen(
                [*command, "--resume", "--out", str(out)],
                cwd=tmp_path,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    results = [process.communicate(timeout=240) for process in processes]
    codes = [process.returncode for process in processes]
    assert codes == [2, 2], [err[-2000:] for _, err in results]
    lines = [refusal(err) for _, err in results]
    assert lines[0] == lines[1]
    assert "3 checkpoints, all damaged" in lines[0] and "state.pt does not match" in lines[0]
    assert snapshot(out) == before


# -- a checkpoint that passes its checks but fails to restore ------------------------------------


def tiny_trainer(run_dir: Path, max_steps: int) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 3, generator=generator), torch.randn(40, 1, generator=generator)
    )
    config = validate(
        dict(global_batch_size=8, micro_batch_size=2, max_steps=max_steps, checkpoint_every=1,
             lr=0.01, device="cpu")
    )  # fmt: skip

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum(), batch[0].shape[0]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Trainer(model, optimizer, loss_fn, data, config, run_dir=run_dir, progress=False)


def rewrite_state(checkpoint: Path, change) -> None:
    """Change a checkpoint's training state and record the new checksum: valid, but wrong."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    change(state)
    torch.save(state, checkpoint / "state.pt")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256((checkpoint / "state.pt").read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def extra_param_group(state: dict) -> None:
    """An optimizer state the optimizer refuses only while it loads it (after every check)."""
    groups = state["optimizer"]["param_groups"]
    groups.append({**groups[0], "params": []})


def test_a_checkpoint_that_fails_to_restore_falls_back(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tiny_trainer(tmp_path / "reference", 5).fit()
    out = tmp_path / "run"
    tiny_trainer(out, 3).fit()
    rewrite_state(out / "checkpoints" / "step-00000003", extra_param_group)
    (out / "final.safetensors").unlink()  # else the run counts as finished at step 3
    tiny_trainer(out, 5).fit(resume=True)
    assert "cannot restore" in caplog.text and "different number of parameter groups" in caplog.text
    assert "resumed from" in caplog.text and "step-00000002 at step 2" in caplog.text
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000003.damaged", "step-00000004", "step-00000005"]
    expected = load_file(tmp_path / "reference" / "final.safetensors")
    actual = load_file(out / "final.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def break_rank_1_rng(state: dict) -> None:
    """Rank 1's RNG state unusable: the checks pass; only rank 1 fails, while restoring."""
    state["rng"][1]["torch"] = torch.zeros(3, dtype=torch.uint8)


def two_rank_run(rank: int, world_size: int, run_dir: str, max_steps: int, resume: bool):
    trainer = tiny_trainer(Path(run_dir), max_steps)
    trainer.fit(resume=resume)
    return {name: value.clone() for name, value in trainer.module.state_dict().items()}


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def damage_then_resume(rank: int, world_size: int, run_dir: str):
    if rank == 0:
        rewrite_state(Path(run_dir) / "checkpoints" / "step-00000003", break_rank_1_rng)
        (Path(run_dir) / "final.safetensors").unlink()
    torch.distributed.barrier()
    recorded = Recorded()
    logging.getLogger("bigbatch.train.trainer").addHandler(recorded)
    return two_rank_run(rank, world_size, run_dir, 5, True), recorded.lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_checkpoint_that_fails_to_restore_on_one_rank_falls_back_on_both(tmp_path):
    expected = run_processes(two_rank_run, 2, str(tmp_path / "reference"), 5, False)
    out = tmp_path / "run"
    run_processes(two_rank_run, 2, str(out), 3, False)
    results = run_processes(damage_then_resume, 2, str(out))
    for rank, (actual, warnings) in enumerate(results):
        assert all(torch.equal(expected[rank][k], actual[k]) for k in expected[rank])
        assert any(
            "cannot restore" in line and "step-00000003" in line and "(rank 1)" in line
            for line in warnings
        ), warnings
    names = sorted(path.name for path in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000003.damaged", "step-00000004", "step-00000005"]
