"""Step time of `Accumulator.step` against the hand-written accumulation loop.

A thin script over `bigbatch.tools.bench` (which `bigbatch bench` also runs): same model, same
micro-batches, interleaved steps, median of per-pair time ratios. Target: ratio <= 1.01.

    python benchmarks/overhead.py              # full run, writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --smoke      # a few steps, for CI
"""

from __future__ import annotations

import sys
from pathlib import Path

from bigbatch.tools.bench import format_rows, measure_overhead

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402


def main() -> None:
    parser = argument_parser(__doc__, "a few steps only (CI)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=8)
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.smoke else (args.steps, 5)
    row = measure_overhead(
        steps=steps,
        warmup=warmup,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.accumulation,
    )
    table = format_rows([row])
    publish("overhead", table, smoke=args.smoke)


if __name__ == "__main__":
    main()
