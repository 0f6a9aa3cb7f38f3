"""The command line: every bad input answers one line on stderr and exit 2; the main job runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main

FAST = ["--set", "max_steps=3", "--set", "eval_every=0", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_plan_json_is_the_seed_example(capsys):
    code, out, _ = run(
        capsys,
        "plan",
        "--global-batch-size",
        "224",
        "--world-size",
        "16",
        "--micro-batch-size",
        "7",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["gradient_accumulation_steps"] == 2
    assert data["micro_batch_sizes"] == [[7, 7]] * 16 and data["world_size"] == 16


def test_print_config_shows_recipe_defaults_and_overrides(capsys):
    code, out, _ = run(
        capsys, "train", "--print-config", "--set", "lr=0.01", "--set", "train_batch_size=128"
    )
    assert code == 0
    assert "recipe: digits" in out and "lr: 0.01" in out
    assert "global_batch_size: 128" in out and "micro_batch_size: 16" in out


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        ("lr=-1", ("lr",)),  # invalid value
        ("dropout=0.1", ("unknown key", "dropout")),  # unknown key
        ("recipe=nosuch", ("recipe", "nosuch")),  # unknown recipe
        ("gradient_accumulation_steps=3", ("gradient_accumulation_steps", "256 / (1 x 16)")),
        ("micro_batch_size=300", ("micro_batch_size 300", "share", "<= 256")),
    ],
    ids=["invalid value", "unknown key", "unknown recipe", "impossible plan", "micro above share"],
)
def test_bad_settings_exit_2_with_one_line(capsys, tmp_path, setting, fragments):
    # the impossible plan: 256 items over micro-batches of 16 need 16 accumulation steps, not 3
    code, _, err = run(capsys, "train", "--set", setting, "--out", str(tmp_path / "run"), *FAST)
    assert_one_line_error(code, err, *fragments)


def test_malformed_yaml_and_missing_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\nrecipe: digits\n")
    code, _, err = run(capsys, "train", str(bad), *FAST)
    assert_one_line_error(code, err, "bad.yaml", "YAML")
    code, _, err = run(capsys, "verify", str(tmp_path / "missing.yaml"))
    assert_one_line_error(code, err, "missing.yaml", "not found")


def test_impossible_plan_on_the_plan_command(capsys):
    code, _, err = run(capsys, "plan", "--global-batch-size", "224", "--world-size", "300")
    assert_one_line_error(code, err, "world_size 300")


@pytest.mark.slow
def test_train_writes_the_run_and_refuses_to_reuse_it(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--out", str(out), *FAST)
    assert code == 0, err
    assert "done: 3 steps" in stdout and "global batch 256" in err  # summary and plan
    for name in ("final.safetensors", "metrics.jsonl", "config.yaml", "report.md", "checkpoints"):
        assert (out / name).exists(), name
    code, _, err = run(capsys, "train", "--out", str(out), *FAST)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    code, stdout, _ = run(capsys, "train", "--out", str(out), "--overwrite", *FAST)
    assert code == 0 and "done: 3 steps" in stdout


def test_resume_needs_out(capsys):
    code, _, err = run(capsys, "train", "--resume", *FAST)
    assert_one_line_error(code, err, "--out")


@pytest.mark.slow
def test_verify_exit_codes(capsys, tmp_path):
    small = [
        "--set",
        "global_batch_size=12",
        "--set",
        "micro_batch_size=4",
        "--num-global-batches",
        "1",
    ]
    code, out, _ = run(capsys, "verify", *small)
    assert code == 0 and "PASS" in out
    config = tmp_path / "bn.yaml"
    config.write_text("recipe: digits-bn\n")
    code, out, _ = run(capsys, "verify", str(config), *small)
    assert code == 1 and "BatchNorm2d" in out and "FAIL" in out


@pytest.mark.slow
def test_bench_smoke(capsys):
    code, out, _ = run(
        capsys, "bench", "--smoke", "--micro-batch-size", "4", "--gradient-accumulation-steps", "2"
    )
    assert code == 0 and "median ratio" in out and "| MLP |" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_python_dash_m_runs_the_cli_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[2]
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigbatch",
            "plan",
            "--global-batch-size",
            "10",
            "--world-size",
            "2",
            "--micro-batch-size",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["micro_batch_sizes"] == [[3, 2], [3, 2]]
    bad = subprocess.run(
        [sys.executable, "-m", "bigbatch", "verify", "--set", "lr=oops"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "lr" in bad.stderr


def test_help_config_lists_every_key_from_the_schema(capsys):
    from bigbatch.train.config import Config, LRScaling
    from bigbatch.train.configfile import ALIASES

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help-config"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    keys = {line.split(":")[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert set(Config.model_fields) | {f"lr_scaling.{k}" for k in LRScaling.model_fields} <= keys
    assert all(f"{alias} -> {name}" in out for alias, name in ALIASES.items())
    assert 'optimize: "memory" or "throughput"; default "memory"' in out
