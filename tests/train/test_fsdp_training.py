"""`bigbatch train --set parallelism=fsdp` under torchrun on CPU (gloo): 2 sharded processes equal
1 process to float32 rounding, and a 2-process checkpoint resumes on 1, 2 (bitwise) and 3."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.core.sharding import default_shard_units
from bigbatch.recipes import tinylm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
TRAIN = [
    "-m", "bigbatch", "train", "--no-progress",
    "--set", "recipe=tinylm", "--set", "parallelism=fsdp", "--set", "warmup_steps=0",
    "--set", "global_batch_size=12", "--set", "micro_batch_size=2", "--set", "eval_every=0",
    "--set", "checkpoint_every=0", "--set", "trackers=[]", "--set", "max_grad_norm=1.0",
    "--set", "recipe_options.num_train_samples=96", "--set", "recipe_options.num_eval_samples=7",
]  # fmt: skip


ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": str(ROOT / "src"),
}


def _train(
    out: Path, processes: int, steps: int, *, resume: bool = False, settings: tuple[str, ...] = ()
) -> str:
    launcher = [*TORCHRUN, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    command = [*launcher, *TRAIN, "--set", f"max_steps={steps}", "--out", str(out), *settings]
    env = ENV
    result = subprocess.run(
        [*command, *(["--resume"] if resume else [])],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: {steps} steps" in result.stdout
    return result.stderr


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final.safetensors"))


def _close(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5, msg=name)


def test_tinylm_names_its_blocks_and_the_default_finds_repeated_blocks():
    model = tinylm.TinyGPT(16, 3, 2, 10)
    assert tinylm.shard_units(model) == list(model.blocks)
    assert default_shard_units(model) == list(model.blocks)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    assert default_shard_units(plain) == [plain[0], plain[2]]  # repeated Linear
    single = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    assert default_shard_units(single) == [single[0], single[1]]  # no repeated block: children


def test_fsdp_on_two_processes_equals_one_and_checkpoints_reshard(tmp_path):
    one = tmp_path / "one"
    log = _train(one, 1, 4)
    assert "parallelism fsdp on one process: the model runs unsharded" in log
    two = tmp_path / "two"
    log = _train(two, 2, 4)
    assert "parallelism fsdp: 2 shard units and the root over 2 ranks" in log
    reference = _weights(one)
    _close(_weights(two), reference)

    # A 2-process run stopped at step 2: its checkpoint is sharded, one file per rank.
    half = tmp_path / "half"
    _train(half, 2, 2)
    saved = half / "checkpoints" / "step-00000002"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["sharded"] is True
    assert sorted(p.name for p in (saved / "shards").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not (saved / "model.safetensors").exists()
    for processes in (1, 2, 3):
        resumed = tmp_path / f"resumed-{processes}"
        shutil.copytree(half, resumed)
        (resumed / "final.safetensors").unlink()
        log = _train(resumed, processes, 4, resume=True)
        assert "resumed from" in log
        if processes == 2:  # the same world size: bitwise
            weights, uninterrupted = _weights(resumed), _weights(two)
            assert all(torch.equal(weights[name], uninterrupted[name]) for name in weights)
        else:  # resharded: the same samples in the same order, to float32 rounding
            _close(_weights(resumed), reference)


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["checksum", "loader"])
def test_a_damaged_shard_makes_the_previous_checkpoint_the_one(tmp_path, fix_checksum):
    out = tmp_path / "run"
    _train(out, 1, 2, settings=("--set", "checkpoint_every=1"))  # one process: sharded format too
    saved = out / "checkpoints" / "step-00000002"
    shard = next(p for p in (saved / "shards").iterdir() if p.suffix == ".distcp")
    damaged = shard.read_bytes()[:-3] + b"xyz"
    if fix_checksum:  # garbage whose checksum meta.json records: only the loader can tell
        damaged = b"\x80garbage" * (len(damaged) // 8)
        meta = json.loads((saved / "meta.json").read_text())
        meta["sha256"][f"shards/{shard.name}"] = hashlib.sha256(damaged).hexdigest()
        (saved / "meta.json").write_text(json.dumps(meta))
    shard.write_bytes(damaged)
    log = _train(out, 1, 3, resume=True)
    reason = "does not load weights-only" if fix_checksum else "does not match its sha256"
    assert "skipping checkpoint" in log and reason in log
    assert "UnpicklingError" not in log.replace("does not load weights-only (Unpickling", "")
    assert "resumed from" in log and "step-00000001 at step 1" in log


def test_micro_batch_auto_plans_per_rank_in_lockstep_as_bigbatch_plan_projects(tmp_path):
    """Probed on the shards by both ranks at once, the choice (micro-batch and sync mode) equals
    what `bigbatch plan --parallelism fsdp` projects from the whole model on one process."""
    budget = "2.5MiB"
    planned = subprocess.run(
        [sys.executable, "-m", "bigbatch", "plan", "--json", "--global-batch-size", "64",
         "--world-size", "2", "--memory-budget", budget, "--recipe", "tinylm",
         "--parallelism", "fsdp"],
        capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    choice = json.loads(planned.stdout)["micro_batch_choice"]
    micro, sync = choice["micro_batch_size"], choice["gradient_sync"]
    assert [row["gradient_sync"] for row in choice["rank_memory"]][0] == sync
    settings = (
        "--set", "micro_batch_size=auto", "--set", f"memory_budget={budget}",
        "--set", "global_batch_size=64", "--set", "recipe_options.num_train_samples=128",
    )  # fmt: skip
    log = _train(tmp_path / "run", 2, 1, settings=settings)
    assert f"micro_batch_size auto: {micro} (" in log
    assert "per rank" in log and f"gradient_sync {sync}:" in log
