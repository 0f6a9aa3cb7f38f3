"""Step time of `Accumulator.step` against two hand-written accumulation loops.

A thin script over `bigbatch.tools.bench` (which `bigbatch bench` also runs): same model, same
micro-batches, the textbook loop (loss / k) and a loop doing the engine's math by hand (loss sums,
one norm, one rescale), interleaved rounds in every order, medians of per-round time ratios with
their interquartile range. Two cases: the 4.2M-parameter MLP at 32 x 8, and the small step, a
1.3M-parameter MLP at 64 x 8 (about 40 ms on two cores), where the engine's fixed cost per step
shows most. Targets: ratio <= 1.02 against the same-math loop, <= 1.01 against the textbook loop.
With one torch thread (--threads 1) the clock is the thread's CPU time, which a busy machine
disturbs less.

    python benchmarks/overhead.py              # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --smoke      # a few steps, for CI
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bigbatch.tools.bench import SMALL_STEP, format_rows, measure_overhead

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

LARGE_STEP = {"width": 1024, "micro_batch_size": 32, "gradient_accumulation_steps": 8}
ROUNDS = {"large": 40, "small": 120}  # the small step's ratio is noisier: more rounds


def main() -> None:
    parser = argument_parser(__doc__, "a few steps only (CI)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for name, case in (("large", LARGE_STEP), ("small", SMALL_STEP)):
        steps, warmup = (3, 1) if args.smoke else (args.steps or ROUNDS[name], 6)
        rows.append(measure_overhead(steps=steps, warmup=warmup, **case))
    publish("overhead", format_rows(rows), smoke=args.smoke)


if __name__ == "__main__":
    main()
