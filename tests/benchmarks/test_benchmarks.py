"""The benchmark scripts in smoke mode (exit 0, print a table) and their measuring helpers.

The figures themselves are not tested (they are timings); what is checked against a formula is
what the tables are made of: the live saved-tensor count, the GPT-2 small parameter count, and
that digits' activation memory falls exactly as micro / global.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def run_smoke(*args: str, timeout: float = 120) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / args[0]), *args[1:], "--smoke"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def table_rows(output: str) -> list[list[str]]:
    """The body rows of the markdown tables in the output, as lists of cells."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert any(set(line) <= set("|-: ") for line in lines), f"no markdown table in:\n{output}"
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines
        if not set(line) <= set("|-: ")
    ][1:]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "script",
    [
        "plan_quality.py",
        "gpu.py",
        "alternatives.py",
        "threads.py",
        "compile.py",
        "shard_save_cpu.py",
    ],
)
def test_smoke_prints_a_table(script: str) -> None:
    assert table_rows(run_smoke(script))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hf_trainer_gpt2_error_is_the_unshifted_count_and_bigbatch_is_exact() -> None:
    """The README's claim: GPT-2's Trainer error is 1 - shifted/unshifted labels (where that is
    not 0), the direction exact; bigbatch on GPT-2 at float64 rounding."""
    rows = table_rows(run_smoke("hf_trainer.py"))
    gpt2 = [row for row in rows if row[0] == "GPT2LMHeadModel"]
    assert len(gpt2) == 2
    for _, _, trainer, cosine, shortfall, exact in gpt2:
        if float(shortfall) > 0:
            assert float(trainer) == pytest.approx(float(shortfall), rel=1e-2)
        assert float(trainer) < 1e-6 or float(shortfall) > 0
        assert float(cosine) > 1 - 1e-9 and float(exact) < 1e-13


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_smoke_prints_a_table() -> None:
    assert table_rows(run_smoke("ddp.py"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_token_batches_smoke_prints_the_three_arms() -> None:
    rows = table_rows(run_smoke("token_batches.py", timeout=240))
    assert [row[0] for row in rows] == ["samples", "tokens", "tokens + packing"]
    padding = [float(row[2].rstrip("%")) for row in rows]
    assert padding[2] < padding[0]  # packing pads less than fixed-size sample micro-batches


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sharded_smoke_counts_collectives_per_sync_mode() -> None:
    sharded = load("sharded")
    sizes = sharded.SMOKE
    rows = {(row[0], row[1]): row for row in table_rows(run_smoke("sharded.py", timeout=300))}
    units = sizes.num_layers + 1  # FSDP units: tinylm's blocks, then the root
    for world in (1, 2, 4):
        ddp, every, step_end = (rows[(str(world), mode)] for mode in sharded.MODES)
        # columns: ranks, mode, peak gradient MB, predicted, parameters + AdamW state MB,
        # predicted, collectives, step ms, vs DDP
        assert ddp[6] == "1"  # one bucket all-reduced once per step
        if world > 1:  # one rank reduce-scatters nothing
            micro_steps = sizes.global_batch_size // (world * sizes.micro_batch_size)
            assert every[6] == str(micro_steps * units)
            assert step_end[6] == str(units)
            # every_micro_batch holds sharded gradients only, step_end an unsharded one
            assert float(every[2]) < float(step_end[2]) == float(ddp[2])
        # FSDP holds 1 / world of the parameters and AdamW state, DDP all of it on every rank
        whole = float(rows[("1", "DDP")][4])
        assert float(ddp[4]) == whole
        for fsdp in (every, step_end):
            assert float(fsdp[4]) == pytest.approx(whole / world, rel=0.05)
        # bigbatch.tools.rank_memory's prediction against the tensors each rank held
        for row in (ddp, every, step_end):
            assert float(row[2]) == pytest.approx(float(row[3]), abs=0.011)
            assert float(row[4]) == pytest.approx(float(row[5]), rel=0.01, abs=0.011)


def test_run_all_passes_smoke_through() -> None:
    output = run_smoke("run_all.py", "gpu")
    assert "== gpu" in output and "failed" not in output
    assert table_rows(output)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_smoke_table_digits_activations_fall_as_micro_over_global() -> None:
    rows = [row for row in table_rows(run_smoke("memory.py")) if row[0] == "digits"]
    assert len(rows) >= 3
    for row in rows:
        micro, accumulation = (int(part) for part in row[1].split()[:3:2])
        global_batch_size = micro * accumulation
        # digits' inputs have a fixed size, so activations are exactly proportional to samples
        assert float(row[4]) == pytest.approx(micro / global_batch_size, abs=2e-3)


def test_live_saved_bytes_counts_what_backward_needs() -> None:
    memory = load("memory")
    samples, width_in, width_out = 5, 7, 3
    linear = torch.nn.Linear(width_in, width_out, bias=False)
    tracker = memory.LiveSavedBytes(list(linear.parameters()))
    inputs = torch.randn(samples, width_in)
    with tracker.tracking():
        # linear saves its input (for the weight gradient), relu its output; the weight is excluded
        loss = torch.relu(linear(inputs)).sum()
    assert tracker.live == tracker.peak == 4 * samples * (width_in + width_out)
    loss.backward()
    del loss
    assert tracker.live == 0


def test_gpt2_small_has_the_published_parameter_count() -> None:
    gpu = load("gpu")
    config = gpu.GPTConfig()
    vocab, context, width, layers = 50257, 1024, 768, 12
    assert (config.vocab_size, config.context, config.d_model, config.num_layers) == (
        vocab,
        context,
        width,
        layers,
    )
    # embeddings + per layer (qkv, proj, 4x MLP weights and biases, two LayerNorms) + final norm;
    # the head is tied to the token embedding
    expected = vocab * width + context * width + layers * (12 * width**2 + 13 * width) + 2 * width
    with torch.device("meta"):
        model = gpu.GPT(config)
    assert gpu.num_parameters(model) == expected == 124_439_808


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_without_cuda_skips_cleanly() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full run would start")
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu.py")], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0
    assert completed.stdout.strip() == "no CUDA device: skipped"


def test_feasible_plans_one_per_distinct_accumulation_count() -> None:
    plan_quality = load("plan_quality")
    global_batch_size, largest = 20, 7
    # by hand: micro 1..7 give 20, 10, 7, 5, 4, 4, 3 micro-batches -> largest micro 1, 2, 3, 4, 5, 7
    assert plan_quality.feasible_plans(global_batch_size, largest) == [1, 2, 3, 4, 5, 7]
