"""`bigbatch plan CONFIG --set ...`: the plan of a run's config, as `train` would run it.

The plan of a given micro setting is checked against the arithmetic of the split; a probed one
lists every checkpointing candidate, the chosen one among them with the fewest micro-steps; bad
values answer one line and exit 2, before torch is loaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bigbatch.cli import main
from tests.cli.test_cli import assert_one_line_error, run

TINY = [
    "--set", "recipe=tinylm", "--set", "device=cpu", "--set", "recipe_options.num_layers=4",
    "--set", "recipe_options.d_model=16", "--set", "recipe_options.num_heads=2",
    "--set", "recipe_options.max_digits=18", "--set", "recipe_options.num_train_samples=32",
]  # fmt: skip


def test_a_config_with_its_micro_batch_plans_like_train(capsys, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "recipe: tinylm\nglobal_batch_size: 96\nrecipe_options:\n  num_train_samples: 100\n"
    )
    code, out, _ = run(
        capsys, "plan", str(config), "--set", "micro_batch_size=10", "--world-size", "2", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["world_size"] == 2
    steps = math.ceil(96 / (2 * 10))  # 48 per rank in micro-batches of at most 10
    assert data["gradient_accumulation_steps"] == steps
    assert sum(map(sum, data["micro_batch_sizes"])) == 96
    assert data["activation_checkpointing"] == {"chosen": "none"}


def test_auto_lists_every_candidate_and_picks_the_fewest_micro_steps(capsys) -> None:
    settings = ["--set", "global_batch_size=16", "--set", "micro_batch_size=auto"]
    settings += ["--set", "memory_budget=800000"]
    code, out, err = run(
        capsys, "plan", *TINY, *settings, "--activation-checkpointing", "auto", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    candidates = data["activation_checkpointing"]["candidates"]
    assert [c["activation_checkpointing"] for c in candidates] == ["none", "every_2", "full"]
    for candidate in candidates:
        assert candidate["micro_steps"] == math.ceil(16 / candidate["micro_batch_size"])
        assert candidate["predicted_peak_bytes"] * 1.1 <= 800000
    fewest = min(candidates, key=lambda c: c["micro_steps"])
    assert data["activation_checkpointing"]["chosen"] == fewest["activation_checkpointing"]
    assert data["micro_batch_choice"]["micro_batch_size"] == fewest["micro_batch_size"]
    assert data["gradient_accumulation_steps"] == fewest["micro_steps"]


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--activation-checkpointing", "every_x"], ["--activation-checkpointing", "every_<k>"]),
        (["--set", "global_batch_size=abc"], ["global_batch_size"]),
        (["--set", "recipe=tinylm", "--global-batch-size", "8"], ["--global-batch-size", "--set"]),
        (["--global-batch-size", "8", "--activation-checkpointing", "full"], ["config"]),
        ([], ["global batch"]),
    ],
    ids=["bad policy", "bad value", "flag and config", "policy without config", "nothing"],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragments) -> None:
    try:
        code, _, err = run(capsys, "plan", *argv)
    except SystemExit as stop:  # the parser's own refusals exit there
        code, err = int(stop.code or 0), capsys.readouterr().err
    assert_one_line_error(code, err, *fragments)


def test_config_errors_answer_before_torch_loads() -> None:
    code = (
        "import sys\nfrom bigbatch.cli import main\n"
        "code = main(['plan', '--set', 'global_batch_size=abc'])\n"
        "assert 'torch' not in sys.modules\nsys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert main is not None
