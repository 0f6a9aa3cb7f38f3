"""The training entry point of the memory probe (`bigbatch.tools.micro_setting`), in both units.

The choice in tokens is the choice in rows of the longest sample times its length; over ranks,
every rank runs rank 0's choice even where its own measurements would differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigbatch.recipes import tinylm
from bigbatch.tools import memory
from bigbatch.tools.micro_setting import planned_layout, probe_micro_setting, probe_rows
from bigbatch.tools.rank_memory import Layout
from tests.distributed_helpers import run_processes
from tests.tools.test_memory import make_mlp, mlp_loss

OPTIONS = {"max_digits": 2, "max_sums": 6, "num_train_samples": 200, "d_model": 16}


def mlp_dataset() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=generator)
    return torch.utils.data.TensorDataset(x, torch.randn(40, 3, dtype=torch.float64))


def largest_fitting(model, loss_fn, make_rows, budget: int, max_rows: int) -> int:
    """Independent of the search: the largest measured rows whose memory x 1.1 fits."""
    measured = memory.probe(model, loss_fn, make_rows, range(1, max_rows + 1), repetitions=1)
    return max(r.micro_batch_size for r in measured.rows if r.memory_bytes * 1.1 <= budget)


def test_samples_are_the_first_samples_and_the_value_is_rows() -> None:
    make_rows, row_tokens = probe_rows(mlp_dataset(), None)
    assert row_tokens is None
    assert torch.equal(make_rows(3)[0], mlp_dataset().tensors[0][:3])
    budget = 20_000
    choice = probe_micro_setting(
        make_mlp(), mlp_loss, make_rows, row_tokens=None, max_rows=32, memory_budget=budget,
        optimize="memory", optimizer=None, device="cpu",
    )  # fmt: skip
    assert choice.unit == "samples" and choice.value == choice.micro_batch_size
    assert choice.value == largest_fitting(make_mlp(), mlp_loss, make_rows, budget, 32)
    assert choice.gradient_sync is None


@pytest.mark.parametrize("packing", [False, True])
def test_tokens_are_rows_of_the_longest_sample_times_its_length(packing: bool) -> None:
    recipe = tinylm.build({"seed": 0, "recipe_options": OPTIONS})
    lengths = np.array(recipe.train_dataset.lengths)
    make_rows, row_tokens = probe_rows(
        recipe.train_dataset,
        tinylm.collate,
        lengths=lengths,
        collate_packed=tinylm.collate_packed if packing else None,
    )
    assert row_tokens == int(lengths.max())
    budget = int(1.5e6)
    choice = probe_micro_setting(
        recipe.model, tinylm.loss_fn, make_rows, row_tokens=row_tokens, max_rows=24,
        memory_budget=budget, optimize="memory", optimizer=None, device="cpu",
    )  # fmt: skip
    rows = largest_fitting(recipe.model, tinylm.loss_fn, make_rows, budget, 24)
    assert choice.unit == "tokens" and choice.micro_batch_size == rows
    assert choice.value == rows * row_tokens
    assert choice.reason.startswith(f"{rows} rows x {row_tokens} tokens (the longest sample)")
    assert choice.to_dict()["micro_batch_tokens"] == choice.value


def test_auto_budget_on_a_cpu_asks_for_one() -> None:
    with pytest.raises(ValueError, match="memory_budget is required on cpu"):
        probe_micro_setting(
            make_mlp(), mlp_loss, probe_rows(mlp_dataset(), None)[0], row_tokens=None,
            max_rows=8, memory_budget="auto", optimize="memory", optimizer=None, device="cpu",
        )  # fmt: skip


def _chosen(rank: int, world: int) -> tuple[int, int, str | None]:
    model = make_mlp()
    budget = 12_000 if rank == 0 else 30_000  # rank 1 alone would choose more
    choice = probe_micro_setting(
        model, mlp_loss, probe_rows(mlp_dataset(), None)[0], row_tokens=None, max_rows=64,
        memory_budget=budget, optimize="memory", optimizer=None, device="cpu",
        **planned_layout(model, world, "auto"),
    )  # fmt: skip
    return choice.value, choice.memory_budget_bytes, choice.gradient_sync


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_rank_runs_rank_0s_choice() -> None:
    chosen = run_processes(_chosen, 2)
    assert chosen[0] == chosen[1]
    assert chosen[0][1] == 12_000 and chosen[0][2] is None  # DDP: no sync mode to choose


def test_planned_layout_of_an_unsharded_model_is_ddp_without_agreement() -> None:
    layout = planned_layout(make_mlp(), 4, "auto")
    assert layout == {"layout": Layout("ddp", 4, "auto"), "agree": None}
