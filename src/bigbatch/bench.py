"""`bigbatch bench`: the step time of `Accumulator.step` against the hand-written loop.

Same model, same micro-batches, same optimizer and clipping; the two run interleaved (A B A B ...)
so drift in machine speed hits both alike, and the figure is the median of per-pair time ratios.
The target is a ratio <= 1.01: exactness should cost nothing measurable.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigbatch.engine import Accumulator

Window = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BenchRow:
    """One benchmark configuration and its median timings.

    Attributes:
        model: what was trained.
        num_parameters: its parameter count.
        micro_batch_size: samples per micro-batch.
        gradient_accumulation_steps: micro-batches per step.
        steps: timed (interleaved) steps after the warm-up.
        hand_written_s: median step time of the textbook loop.
        bigbatch_s: median step time of `Accumulator.step`.
        ratio: median of the per-pair ratios bigbatch / hand-written.
    """

    model: str
    num_parameters: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    steps: int
    hand_written_s: float
    bigbatch_s: float
    ratio: float


def mlp(width: int = 1024, seed: int = 0) -> torch.nn.Module:
    """About 4M parameters: big enough that the step, not Python, dominates."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width),
            torch.nn.GELU(),
            torch.nn.Linear(2 * width, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, 10),
        )


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of one micro-batch (the form the textbook loop uses)."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def hand_written_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Window, max_grad_norm: float
) -> float:
    """The textbook loop: loss / k, backward each micro-batch, clip and step once."""
    total = 0.0
    for micro_batch in window:
        loss = loss_fn(model, micro_batch) / len(window)
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _window(micro_batch_size: int, accumulation: int, width: int) -> Window:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(micro_batch_size, width, generator=generator),
            torch.randint(0, 10, (micro_batch_size,), generator=generator),
        )
        for _ in range(accumulation)
    ]


def measure_overhead(
    *,
    steps: int = 40,
    warmup: int = 5,
    micro_batch_size: int = 32,
    gradient_accumulation_steps: int = 8,
    width: int = 1024,
) -> BenchRow:
    """Time interleaved steps of both loops on the same model and micro-batches.

    Raises:
        ValueError: a count that is not positive.
    """
    for name, value in (
        ("steps", steps),
        ("micro_batch_size", micro_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("width", width),
    ):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    window = _window(micro_batch_size, gradient_accumulation_steps, width)
    reference_model = mlp(width)
    bigbatch_model = copy.deepcopy(reference_model)
    reference_optimizer = torch.optim.AdamW(reference_model.parameters(), lr=1e-4)
    accumulator = Accumulator(
        bigbatch_model, torch.optim.AdamW(bigbatch_model.parameters(), lr=1e-4), max_grad_norm=1.0
    )
    ratios, bigbatch_times, hand_times = [], [], []
    for step in range(max(warmup, 0) + steps):
        start = time.perf_counter()
        hand_written_step(reference_model, reference_optimizer, window, 1.0)
        hand_s = time.perf_counter() - start
        start = time.perf_counter()
        accumulator.step(window, loss_fn)
        bigbatch_s = time.perf_counter() - start
        if step >= warmup:
            ratios.append(bigbatch_s / hand_s)
            bigbatch_times.append(bigbatch_s)
            hand_times.append(hand_s)
    return BenchRow(
        model="MLP",
        num_parameters=sum(p.numel() for p in reference_model.parameters()),
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps=steps,
        hand_written_s=statistics.median(hand_times),
        bigbatch_s=statistics.median(bigbatch_times),
        ratio=statistics.median(ratios),
    )


def machine_description() -> str:
    """Processor, torch threads and torch version, for the record next to the figures."""
    processor = platform.processor() or platform.machine()
    return f"{processor}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def format_rows(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the rows, then how they were measured."""
    lines = [
        "| model | params | micro x k | hand-written step | Accumulator.step | median ratio |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.num_parameters / 1e6:.1f}M "
            f"| {row.micro_batch_size} x {row.gradient_accumulation_steps} "
            f"| {row.hand_written_s * 1e3:.1f} ms | {row.bigbatch_s * 1e3:.1f} ms "
            f"| {row.ratio:.3f} |"
        )
    steps = ", ".join(sorted({str(row.steps) for row in rows}))
    lines.append("")
    lines.append(
        f"{steps} interleaved steps after warm-up; {machine_description()}; target ratio <= 1.01"
    )
    return "\n".join(lines)
