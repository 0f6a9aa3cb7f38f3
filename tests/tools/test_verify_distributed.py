"""bigbatch verify over several ranks: `torchrun -m bigbatch verify` with DDP and FSDP2 on 2 gloo
processes passes on the recipes with a row per gradient sync mode, fails on every rank alike when
the update is wrong, and on one process `parallelism=fsdp` warns and checks the one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch import cli
from bigbatch.core import sharding
from bigbatch.recipes import build
from bigbatch.tools.verify import format_report
from bigbatch.tools.verify_distributed import distributed_splits, rank_window, verify_distributed
from bigbatch.units import UsageError
from tests.distributed_helpers import run_processes

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 11 items over 2 ranks: rank 1 holds one item less, and micro 1 leaves it an empty micro-batch.
VERIFY = [
    "-m", "bigbatch", "verify", "--num-global-batches", "1",
    "--set", "global_batch_size=11", "--set", "micro_batch_size=2",
]  # fmt: skip
SMALL_LM = {"num_train_samples": 32, "num_eval_samples": 4, "d_model": 16, "num_heads": 2}
ROW = re.compile(
    r"^(micro 1|uneven|configured|empty) +2  (ddp|fsdp) +(every_micro_batch|step_end) +\S+  "
    r"(ok|FAIL)",
    re.MULTILINE,
)


def _torchrun(*settings: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    return subprocess.run(
        [*TORCHRUN, *VERIFY, *settings],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=150,
    )  # fmt: skip


def _rows(stdout: str) -> set[tuple[str, str, str, str]]:
    return set(ROW.findall(stdout))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_fsdp_verify_passes_for_both_sync_modes():
    options = [f"recipe_options.{key}={value}" for key, value in SMALL_LM.items()]
    settings = ["recipe=tinylm", "parallelism=fsdp", *options]
    result = _torchrun(*(arg for setting in settings for arg in ("--set", setting)))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("PASS: all splits match the full batch") == 1  # rank 0 prints
    assert "verify tinylm: 1 global batches of 11 over 2 ranks" in result.stdout
    assert _rows(result.stdout) == {
        (name, "fsdp", sync, "ok")
        for name in ("micro 1", "uneven", "configured")
        for sync in ("every_micro_batch", "step_end")
    }, result.stdout
    assert "1 x 6 | 1 1 1 1 1 0" in result.stdout  # an empty micro-batch on rank 1: a stand-in


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torchrun_ddp_verify_fails_with_batchnorm_and_exits_1():
    """BatchNorm in keep mode normalises per micro-batch: every row fails, exit status 1."""
    result = _torchrun("--set", "recipe=digits-bn")  # parallelism ddp, the default
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("FAIL: splits differ") == 1
    assert _rows(result.stdout) == {
        (name, "ddp", sync, "FAIL")
        for name in ("micro 1", "uneven", "configured")
        for sync in ("every_micro_batch", "step_end")
    }, result.stdout
    assert "features.1: BatchNorm2d" in result.stdout
    # torchrun stops the other rank once one exits: the first to exit did with 1, none aborted.
    root_cause = result.stderr[result.stderr.index("Root Cause") :]
    assert re.search(r"exitcode\s*: 1 ", root_cause), result.stderr
    assert "SIGABRT" not in result.stderr


def _verify_on_ranks(rank: int, world_size: int) -> list:
    """digits under DDP and FSDP as they are, then under FSDP with its default mean over ranks
    left in place (the engine's sum reduction undone): the update is then half the right one."""
    recipe = build("digits", {"seed": 0})
    settings = {"global_batch_size": 10, "micro_batch_size": 4, "num_global_batches": 1}
    reports = [verify_distributed(recipe, parallelism=p, **settings) for p in ("ddp", "fsdp")]
    sharding.use_sum_reduction = lambda model: None  # this process only
    broken = verify_distributed(recipe, parallelism="fsdp", gradient_sync="step_end", **settings)
    return [*reports, broken]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distributed_verify_passes_ddp_and_fsdp_and_catches_a_wrong_sharded_gradient():
    on_rank_0, on_rank_1 = run_processes(_verify_on_ranks, 2)
    assert on_rank_0 == on_rank_1  # every rank reports (and exits) alike
    ddp, fsdp, broken = on_rank_0
    # 10 items over 2 ranks: micro 1 has no empty micro-batch, so "empty" adds one per rank.
    names = [name for name in ("micro 1", "uneven", "configured", "empty") for _ in range(2)]
    for report, parallelism in ((ddp, "ddp"), (fsdp, "fsdp")):
        assert report.passed, format_report(report)
        assert [split.name for split in report.splits] == names
        assert {split.parallelism for split in report.splits} == {parallelism}
        assert [split.gradient_sync for split in report.splits[:2]] == [
            "every_micro_batch",
            "step_end",
        ]
        assert report.splits[-1].rank_micro_batch_sizes == ((1, 1, 1, 1, 1, 0),) * 2
    assert not broken.passed
    assert len(broken.splits) == 4  # gradient_sync given: that mode only
    for split in broken.splits:
        assert split.gradient_sync == "step_end" and split.world_size == 2
        assert split.relative_error == pytest.approx(0.5, rel=1e-9)  # the mean over 2 ranks


def test_one_process_fsdp_warns_and_checks_the_one_process(capsys):
    code = cli.main(
        ["verify", "--num-global-batches", "1", "--set", "global_batch_size=8",
         "--set", "micro_batch_size=3", "--set", "parallelism=fsdp"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert "PASS: all splits match the full batch" in captured.out
    assert "over 2 ranks" not in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "torchrun --standalone --nproc_per_node=2" in warning[0]


def test_the_splits_over_ranks_leave_a_rank_short_or_empty():
    splits = distributed_splits(11, 2, 2)
    assert splits["uneven"].sizes == ((3, 3), (3, 2))  # rank 1 holds one item less
    assert "empty" not in splits  # micro 1 already leaves rank 1 an empty micro-batch
    assert distributed_splits(10, 2, None)["empty"].sizes == ((1, 1, 1, 1, 1, 0),) * 2
    samples = [(torch.full((2,), float(i)), i) for i in range(11)]
    window = rank_window(samples, splits["micro 1"], 1, torch.utils.data.default_collate)
    assert [len(labels) for _, labels in window] == [1, 1, 1, 1, 1, 0]
    assert window[0][0].dtype == torch.float64 and int(window[0][1][0]) == 6  # rank 1 starts at 6
    with pytest.raises(UsageError, match="micro_batch_size 7 is larger than a rank's share"):
        distributed_splits(11, 2, 7)


def test_verify_distributed_needs_a_process_group():
    with pytest.raises(UsageError, match="gloo process group of 2 or more ranks"):
        verify_distributed(build("digits", {"seed": 0}), global_batch_size=8, micro_batch_size=2)
