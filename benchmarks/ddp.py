"""Gradient all-reduces per step and step time under DDP: bigbatch vs syncing every micro-batch.

Two CPU processes over gloo train the same MLP on the same micro-batches. "sync every micro-batch"
is the naive DDP accumulation loop (no `no_sync`): DDP all-reduces the gradients after every
backward. bigbatch syncs once per optimizer step. All-reduces are counted with a DDP comm hook.

    python benchmarks/ddp.py            # k = 1, 4, 16; writes benchmarks/results/ddp.{md,png}
    python benchmarks/ddp.py --smoke    # k = 1, 2 and two steps, for CI
"""

from __future__ import annotations

import sys
from pathlib import Path

from bigbatch.tools.bench import DdpRow, format_ddp, measure_ddp, mlp

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

WIDTH = 1024  # the MLP of overhead.py: 4.2M parameters


def main() -> None:
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    ks, steps, width = ([1, 2], 2, 256) if args.smoke else ([1, 4, 16], 10, WIDTH)
    rows = measure_ddp(ks, steps=steps, width=width)
    note = (
        f"2 processes over gloo on one CPU machine (1 torch thread each), MLP of "
        f"{sum(p.numel() for p in mlp(width).parameters()) / 1e6:.2f}M parameters, micro-batch "
        f"16 per rank, median of {steps} steps; one gradient bucket, all-reduces counted by a "
        "DDP comm hook."
    )
    publish("ddp", format_ddp(rows), note, smoke=args.smoke, plot=lambda path: plot(rows, path))


def plot(rows: list[DdpRow], path: Path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for method, colour in (("sync every micro-batch", "#c44"), ("bigbatch", "#4a4")):
        mine = [row for row in rows if row.method == method]
        ks = [row.gradient_accumulation_steps for row in mine]
        left.plot(ks, [row.all_reduces_per_step for row in mine], "o-", color=colour, label=method)
        right.plot(ks, [row.step_s * 1e3 for row in mine], "o-", color=colour, label=method)
    left.set_xlabel("accumulation steps k")
    left.set_ylabel("gradient all-reduces per step")
    right.set_xlabel("accumulation steps k")
    right.set_ylabel("step time (ms)")
    left.legend()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
