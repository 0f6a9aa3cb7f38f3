"""What `--resume` accepts: the same run continued, never another run under the same name.

Through the command line: every field that defines the run, changed, is refused with exit 2 in
one line naming it with its old and new value; a field that only changes how the run runs is
accepted (and, where it cannot change the numbers, the result is bitwise equal to the run left
alone). A finished run resumed is left as it is; a resumed run's report covers the whole run.
Damaged checkpoints whose checksums are valid fall back to the previous one and are set aside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.cli import main
from bigbatch.train import resume
from bigbatch.train.checkpoint import load_latest_checkpoint
from bigbatch.train.configfile import validate
from bigbatch.train.trainer import Trainer
from bigbatch.units import UsageError

BASE = [
    "--set", "global_batch_size=64", "--set", "micro_batch_size=16", "--set", "eval_every=0",
    "--set", "checkpoint_every=1", "--no-progress",
]  # fmt: skip


def train(capsys, out: Path, *extra: str, steps: int = 2) -> tuple[int, str, str]:
    code = main(["train", *BASE, "--set", f"max_steps={steps}", *extra, "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A finished run of 2 steps (to be copied before it is continued)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *BASE, "--set", "max_steps=2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """The same run left alone for 4 steps: what a resumed one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *BASE, "--set", "max_steps=4", "--out", str(out)]) == 0
    return out


def written(run_dir: Path) -> dict[str, int]:
    """When each file of the run was last written (the lock file aside: it names its holder)."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != ".bigbatch.lock"]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files}


RUN_DEFINING = [
    ("recipe=digits-bn", "recipe 'digits' -> 'digits-bn'"),
    ("global_batch_size=32", "global_batch_size 64 -> 32"),
    ("batch_size_schedule=[[0, 64], [3, 32]]", "batch_size_schedule None -> [[0, 64], [3, 32]]"),
    ("seed=1", "seed 0 -> 1"),
    ("lr=0.01", "lr 0.003 -> 0.01"),
    ("weight_decay=0.1", "weight_decay 0.0 -> 0.1"),
    ("lr_scaling.rule=sqrt", "lr_scaling.rule 'linear' -> 'sqrt'"),
    ("lr_scaling.base_batch_size=128", "lr_scaling.base_batch_size 'auto' -> 128"),
    ("warmup_steps=1", "warmup_steps 0 -> 1"),
    ("lr_schedule=cosine", "lr_schedule 'constant' -> 'cosine'"),
    ("precision=bf16", "precision 'fp32' -> 'bf16'"),
    ("max_grad_norm=1.0", "max_grad_norm None -> 1.0"),
    ("batchnorm=freeze", "batchnorm 'keep' -> 'freeze'"),
    ("drop_last=true", "drop_last False -> True"),
    ("noise_scale=true", "noise_scale False -> True"),
    ("noise_smoothing_steps=50", "noise_smoothing_steps 200 -> 50"),
    ("min_global_batch_size=32", "min_global_batch_size None -> 32"),
    ("max_global_batch_size=128", "max_global_batch_size None -> 128"),
    ("adapt_every=10", "adapt_every 50 -> 10"),
]


@pytest.mark.parametrize(("setting", "named"), RUN_DEFINING, ids=[s for s, _ in RUN_DEFINING])
def test_a_changed_run_defining_field_is_refused_naming_it(capsys, two_steps, setting, named):
    before = written(two_steps)
    code, _, err = train(capsys, two_steps, "--set", setting, "--resume", steps=4)
    lines = [line for line in err.splitlines() if line.startswith("bigbatch")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert named in lines[0] and "step-00000002" in lines[0], lines[0]
    assert "Traceback" not in err
    assert written(two_steps) == before  # refused before anything is written


def test_an_option_the_recipe_does_not_take_is_refused_before_the_resume(capsys, two_steps):
    # recipe_options that differ are named like any field (resume.run_differences' doctest);
    # digits takes no options at all, so the recipe refuses this one first.
    before = written(two_steps)
    code, _, err = train(
        capsys, two_steps, "--set", "recipe_options={depth: 2}", "--resume", steps=4
    )
    lines = [line for line in err.splitlines() if line.startswith("bigbatch")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "recipe_options for digits: unknown key 'depth'" in lines[0], lines[0]
    assert written(two_steps) == before


def test_every_difference_is_named_at_once(capsys, two_steps):
    code, _, err = train(
        capsys, two_steps, "--set", "lr=0.01", "--set", "seed=3", "--resume", steps=4
    )
    assert code == 2 and "lr 0.003 -> 0.01, seed 0 -> 3" in err


HOW_IT_RUNS = [
    (["--set", "num_workers=1"], True),
    (["--set", "checkpoint_every=3", "--set", "keep_checkpoints=1"], True),
    (["--set", "eval_every=1"], True),
    (["--set", "stop_signals=[SIGUSR1]", "--set", "device=cpu"], True),
    (["--set", "on_nonfinite=stop", "--set", "max_nonfinite_in_row=5"], True),
    (["--set", "memory_budget=1GiB", "--set", "optimize=throughput"], True),
    (["--set", "micro_batch_size=8"], False),  # another rounding of the same sums
    (["--set", "micro_batch_size=32", "--set", "gradient_accumulation_steps=2"], False),
    (["--set", "max_steps=null", "--set", "epochs=1"], False),  # longer: 23 steps
]


@pytest.mark.parametrize(
    ("settings", "exact"), HOW_IT_RUNS, ids=[" ".join(s[1::2]) for s, _ in HOW_IT_RUNS]
)
def test_a_how_it_runs_field_is_accepted(capsys, tmp_path, two_steps, four_steps, settings, exact):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    code, stdout, err = train(capsys, out, *settings, "--resume", steps=4)
    assert code == 0, err[-2000:]
    assert "resumed from" in err and "step-00000002" in err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in steps if line["kind"] == "train"]
    assert train_steps == list(range(1, len(train_steps) + 1)) and len(train_steps) >= 4
    if exact:
        expected = load_file(four_steps / "final.safetensors")
        actual = load_file(out / "final.safetensors")
        assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_longer_decaying_run_warns_that_the_schedule_moves(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "--set", "lr_schedule=cosine")[0] == 0
    code, _, err = train(capsys, out, "--set", "lr_schedule=cosine", "--resume", steps=4)
    assert code == 0, err[-2000:]
    assert "the run now has 4 steps instead of 2: the cosine decay moves" in err
    assert "step 3 gets 0.5 x the learning rate instead of 0 x" in err
    code, _, err = train(capsys, out, "--set", "lr_schedule=cosine", "--resume", steps=3)
    assert code == 2 and "is at step 4: give a length of at least 4 steps" in err


def test_a_finished_run_resumed_is_left_as_it_is(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "--set", "eval_every=1")[0] == 0
    files = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "report.md")}
    code, stdout, err = train(capsys, out, "--set", "eval_every=1", "--resume")
    assert code == 0 and "nothing to do" in err
    assert {name: (out / name).read_bytes() for name in files} == files  # no eval line added
    records = [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert "done: 2 steps" in stdout and f"{100 * last_eval['eval/accuracy']:.2f}%" in stdout


def test_the_report_of_a_resumed_run_covers_the_whole_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, steps=2)[0] == 0
    assert train(capsys, out, "--resume", steps=4)[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    samples_per_s = sum(r["num_samples"] for r in steps) / sum(r["step_time_s"] for r in steps)
    report = (out / "report.md").read_text()
    assert "| steps | 4 |" in report
    assert f"| samples/s | {samples_per_s:,.0f} |" in report
    assert f"| final train loss | {steps[-1]['loss']:.4g} |" in report


# -- damaged checkpoints whose checksums are valid ---------------------------------------------


def tiny_run(run_dir: Path, max_steps: int, *, resume: bool = False, keep: int = 3) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    config = validate(
        dict(global_batch_size=8, micro_batch_size=4, max_steps=max_steps, checkpoint_every=1,
             keep_checkpoints=keep, lr=0.01)
    )  # fmt: skip

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum(), batch[0].shape[0]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = Trainer(model, optimizer, loss_fn, data, config, run_dir=run_dir, progress=False)
    trainer.fit(resume=resume)
    return trainer


def rewrite_state(checkpoint: Path, change) -> None:
    """Change a checkpoint's training state and record the new checksum: valid, but wrong."""
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    change(state)
    torch.save(state, checkpoint / "state.pt")
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256((checkpoint / "state.pt").read_bytes()).hexdigest()
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_valid_checksums_but_unusable_contents_fall_back_and_are_set_aside(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # "resumed from" is an INFO line, whatever ran before
    tiny_run(tmp_path / "reference", 6)
    out = tmp_path / "run"
    tiny_run(out, 4)  # checkpoints of steps 2, 3 and 4
    checkpoints = out / "checkpoints"
    rewrite_state(checkpoints / "step-00000004", lambda state: state.pop("optimizer"))
    rewrite_state(checkpoints / "step-00000003", lambda state: state["data"].update(position=10**6))
    tiny_run(out, 6, resume=True)
    assert "skipping checkpoint" in caplog.text and "lacks optimizer" in caplog.text
    assert "position 1000000 does not fit" in caplog.text
    assert "resumed from" in caplog.text and "step-00000002 at step 2" in caplog.text
    names = sorted(path.name for path in checkpoints.iterdir())
    # Retention counts valid checkpoints only: the damaged ones no longer take a place.
    assert names == [
        "step-00000003.damaged", "step-00000004", "step-00000004.damaged", "step-00000005",
        "step-00000006",
    ]  # fmt: skip
    expected = load_file(tmp_path / "reference" / "final.safetensors")
    actual = load_file(out / "final.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    out = tmp_path / "run"
    tiny_run(out, 2)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    config = validate(
        dict(global_batch_size=8, micro_batch_size=4, max_steps=4, checkpoint_every=1, lr=0.01)
    )
    trainer = Trainer(
        other, torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9),
        lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(), data, config, run_dir=out, progress=False,
    )  # fmt: skip
    with pytest.raises(
        UsageError, match=r"do not fit the model \(3 differences: 0.bias \[4\] vs \[5\]"
    ):
        trainer.fit(resume=True)
    with pytest.raises(UsageError, match="--resume continues"):
        trainer.fit(resume=True, overwrite=True)


def test_a_checkpoint_of_format_1_still_resumes_exactly(tmp_path, caplog):
    """Format 1 kept the planner's values at the top of the training state: upgraded on load."""
    caplog.set_level(logging.INFO)
    tiny_run(tmp_path / "reference", 6)
    out = tmp_path / "run"
    tiny_run(out, 3)
    newest = out / "checkpoints" / "step-00000003"

    def as_format_1(state: dict) -> None:
        state.update(state.pop("planner"))

    rewrite_state(newest, as_format_1)
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    found = load_latest_checkpoint(out / "checkpoints")
    assert found is not None and found.format_version == 1
    assert resume.upgrade(found).training_state["planner"]["micro_batch_size"] == 4
    (out / "final.safetensors").unlink()
    tiny_run(out, 6, resume=True)
    assert "skipping checkpoint" not in caplog.text and "step-00000003 at step 3" in caplog.text
    expected = load_file(tmp_path / "reference" / "final.safetensors")
    actual = load_file(out / "final.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
