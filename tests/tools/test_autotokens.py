"""micro_batch_tokens from the memory probe, and the token plan `bigbatch plan` prints.

The probe measures rows of the longest sample; the claim checked here against an independent
count of the autograd graph is that any micro-batch of no more padded tokens saves no more for
backward, packed or not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from torch.autograd.graph import saved_tensors_hooks

from bigbatch.cli import main
from bigbatch.recipes import tinylm
from bigbatch.tools.autotokens import choose_micro_batch_tokens
from bigbatch.tools.micro_setting import longest_rows
from bigbatch.train.configfile import validate
from bigbatch.train.trainer import Trainer

OPTIONS = {"max_digits": 2, "max_sums": 6, "num_train_samples": 200, "d_model": 16}


def saved_bytes(model, batch):
    """Bytes autograd saves for backward in one forward (storages once, parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        tinylm.loss_fn(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize("packing", [False, True])
def test_a_micro_batch_of_fewer_padded_tokens_saves_no_more_than_the_probed_rows(packing):
    recipe = tinylm.build({"seed": 0, "recipe_options": OPTIONS})
    data, model = recipe.train_dataset, recipe.model
    lengths = np.array(data.lengths)
    longest = int(lengths.max())
    make_rows = longest_rows(
        data, lengths, tinylm.collate, tinylm.collate_packed if packing else None
    )
    probed = saved_bytes(model, make_rows(4))  # a micro-batch of 4 x longest padded tokens
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = rng.permutation(len(data))
        if packing:  # rows of up to `longest` tokens, at most 4 of them
            rows, row, fill = [], [], 0
            for index in order:
                if fill + lengths[index] > longest:
                    rows.append(row)
                    row, fill = [], 0
                    if len(rows) == 4:
                        break
                row.append(data[int(index)])
                fill += lengths[index]
            batch = tinylm.collate_packed(rows)
        else:
            samples, budget = [], 4 * longest
            for index in order:  # rows x longest row within 4 x longest
                candidate = [*samples, data[int(index)]]
                if len(candidate) * max(len(s) - 1 for s in candidate) > budget:
                    break
                samples = candidate
            batch = tinylm.collate(samples)
        assert batch[0].numel() <= 4 * longest
        assert saved_bytes(model, batch) <= probed


def test_the_choice_is_whole_rows_of_the_longest_sample_within_the_budget():
    recipe = tinylm.build({"seed": 0, "recipe_options": OPTIONS})
    lengths = np.array(recipe.train_dataset.lengths)
    longest = int(lengths.max())
    make_rows = longest_rows(recipe.train_dataset, lengths, tinylm.collate)
    one_row = saved_bytes(recipe.model, make_rows(1))
    budget = int(2e6)
    choice = choose_micro_batch_tokens(
        recipe.model,
        tinylm.loss_fn,
        make_rows,
        row_tokens=longest,
        max_micro_batch_tokens=100 * longest,
        memory_budget_bytes=budget,
        optimizer=recipe.build_optimizer(recipe.model, 1e-3),
    )
    assert choice.unit == "tokens" and choice.row_tokens == longest
    assert choice.value == choice.micro_batch_size * longest
    row = {r.micro_batch_size: r for r in choice.probe.rows}[choice.micro_batch_size]
    assert row.memory_bytes * 1.1 <= budget
    assert choice.bytes_per_token == pytest.approx(one_row / longest, rel=0.2)
    capped = choose_micro_batch_tokens(
        recipe.model,
        tinylm.loss_fn,
        make_rows,
        row_tokens=longest,
        max_micro_batch_tokens=3 * longest + 1,
        memory_budget_bytes=budget,
    )
    assert capped.value == 3 * longest


def test_auto_micro_batch_tokens_is_kept_on_resume(tmp_path, caplog):
    recipe = tinylm.build({"seed": 0, "recipe_options": OPTIONS})

    def run(resume, max_steps, memory_budget):
        config = validate(
            {
                "global_batch_tokens": 400,
                "micro_batch_tokens": "auto",
                "memory_budget": memory_budget,
                "max_steps": max_steps,
                "checkpoint_every": 1,
            }
        )
        trainer = Trainer(
            recipe.model,
            recipe.build_optimizer(recipe.model, 1e-3),
            recipe.loss_fn,
            recipe.train_dataset,
            config,
            collate_fn=recipe.collate_fn,
            run_dir=tmp_path,
            progress=False,
        )
        trainer.fit(resume=resume)
        return trainer.planner.unit.micro

    with caplog.at_level("INFO", logger="bigbatch"):
        chosen = run(False, 1, "3MB")
        assert re.search(r"micro_batch_tokens auto: (\d+)", caplog.text) is not None
        caplog.clear()
        # the checkpoint's choice, not a new probe's (a smaller budget would choose less)
        assert run(True, 2, "0.8MB") == chosen
    assert "micro_batch_tokens auto" not in caplog.text  # no second memory probe
    assert "resumed from" in caplog.text
    assert chosen % max(recipe.train_dataset.lengths) == 0


def test_the_budget_plan_loads_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "from bigbatch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', '--global-batch-tokens', '4096', '--world-size', '2']) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_plan_command_with_and_without_a_recipe(capsys):
    args = ["plan", "--global-batch-tokens", "4096", "--micro-batch-tokens", "512"]
    assert main([*args, "--world-size", "2"]) == 0
    assert "ceil(2048 / 512) = 4 micro-steps" in capsys.readouterr().out
    assert main([*args, "--world-size", "2", "--recipe", "tinylm", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    first = result["first_step"]
    assert first["num_tokens"] >= 4096 and first["world_size"] == 2
    assert all(
        rows * length <= 512 for rank in first["micro_batch_shapes"] for rows, length in rank
    )
    assert 0 <= result["padding_fraction"] < 0.2
    assert main(["plan", "--global-batch-tokens", "64", "--micro-batch-size", "4"]) == 2
    assert "--micro-batch-tokens" in capsys.readouterr().err
