"""Step time of `Accumulator.step` against the hand-written accumulation loop.

Same model, same micro-batches, same optimizer and clipping; the two run interleaved (A B A B ...)
so drift in machine speed hits both alike, and the figure is the median of per-pair time ratios.
Target: ratio <= 1.01.

    python benchmarks/overhead.py              # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --smoke      # a few steps, for CI
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

import bigbatch

RESULTS = Path(__file__).parent / "results"


def mlp(width: int = 1024) -> torch.nn.Module:
    """About 5M parameters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width),
        torch.nn.GELU(),
        torch.nn.Linear(2 * width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 10),
    )


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def hand_written_step(model, optimizer, window, max_grad_norm: float) -> float:
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


def measure(steps: int, warmup: int, micro: int, accumulation: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    window = [
        (
            torch.randn(micro, 1024, generator=generator),
            torch.randint(0, 10, (micro,), generator=generator),
        )
        for _ in range(accumulation)
    ]
    reference_model = mlp()
    bigbatch_model = copy.deepcopy(reference_model)
    reference_optimizer = torch.optim.AdamW(reference_model.parameters(), lr=1e-4)
    accumulator = bigbatch.Accumulator(
        bigbatch_model, torch.optim.AdamW(bigbatch_model.parameters(), lr=1e-4), max_grad_norm=1.0
    )
    ratios, bigbatch_times, hand_times = [], [], []
    for step in range(warmup + steps):
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
    return {
        "parameters": sum(p.numel() for p in reference_model.parameters()),
        "hand_s": statistics.median(hand_times),
        "bigbatch_s": statistics.median(bigbatch_times),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=8)
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.smoke else (args.steps, 5)
    figures = measure(steps, warmup, args.micro_batch_size, args.accumulation)
    table = "\n".join(
        [
            "| model | params | micro x k | hand-written step | Accumulator.step | median ratio |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
            f"| MLP | {figures['parameters'] / 1e6:.1f}M "
            f"| {args.micro_batch_size} x {args.accumulation} "
            f"| {figures['hand_s'] * 1e3:.1f} ms | {figures['bigbatch_s'] * 1e3:.1f} ms "
            f"| {figures['ratio']:.3f} |",
        ]
    )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(table)
    print(f"\n{steps} interleaved steps after {warmup} warm-up; {machine}; target ratio <= 1.01")
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "overhead.md").write_text(f"{table}\n\n{steps} interleaved steps; {machine}\n")


if __name__ == "__main__":
    main()
