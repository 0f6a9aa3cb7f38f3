"""What a checkpoint after every step costs: step time with checkpoint_every 1 vs no checkpoints.

The tinylm recipe with its defaults (global batch 128, micro-batch 32, AdamW) trains through
`bigbatch.fit`, plain (1 process) and sharded (2 gloo processes, `parallelism: fsdp`), in three
arms: no checkpoints but the final one (`checkpoint_every: 0`), a checkpoint after every step
written synchronously (`checkpoint_async: false`) and one written in the background
(`checkpoint_async: true`, the default). A step's time is the wall time from the end of one step
boundary to the end of the next on rank 0 (data, the step, metrics and the checkpoint's share of
the boundary, everything the run waits for), read by wrapping the last hook; the first steps of
each run are left out (warm-up, the writer process's start included). Each arm runs once per
round, the arms in turn, and the table gives each arm's median step time over every round and
its cost relative to no checkpoints.
Checkpoints go to the system's temporary directory, fsynced (on a tmpfs fsync costs nothing:
set TMPDIR to a directory on the disk that checkpoints go to).

    python benchmarks/checkpoint_cost.py            # writes benchmarks/results/checkpoint_cost.md
    python benchmarks/checkpoint_cost.py --smoke    # 1 round of a few steps, writes nothing
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import bigbatch
from bigbatch.core import distributed
from bigbatch.train import hooks
from bigbatch.train.configfile import load_config

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, join_as_rank, publish  # noqa: E402

ARMS = {
    "no checkpoints": ["checkpoint_every=0"],
    "every step, synchronous": ["checkpoint_every=1", "checkpoint_async=false"],
    "every step, background": ["checkpoint_every=1", "checkpoint_async=true"],
}
LAYOUTS = {"plain, 1 process": 1, "sharded, 2 processes (fsdp)": 2}


@dataclass(frozen=True)
class Sizes:
    """How long each run is, and how much of it is measured."""

    steps: int  # steps per run
    warmup_steps: int  # of those, left out of the timing
    rounds: int  # runs of each arm


# 70 warm-up steps: a plain run's writer process starts with it (torch's import, about 2 s;
# its saves go to a thread meanwhile), and the steady state after is what is measured.
FULL = Sizes(steps=120, warmup_steps=70, rounds=3)
SMOKE = Sizes(steps=4, warmup_steps=1, rounds=1)


def train(run_dir: Path, overrides: list[str], steps: int, world_size: int) -> list[float]:
    """One tinylm run; rank 0's wall time of every step (the others return [])."""
    boundaries: list[float] = []
    stop_hook = hooks.StopHook.after_step

    def timed(self: hooks.StopHook, report: Any) -> int | None:
        result = stop_hook(self, report)
        boundaries.append(time.perf_counter())
        return result

    hooks.StopHook.after_step = timed  # type: ignore[method-assign]
    parallelism = "fsdp" if world_size > 1 else "ddp"
    config = load_config(
        None,
        [
            "recipe=tinylm",
            f"max_steps={steps}",
            f"parallelism={parallelism}",
            "trackers=[]",
            "stop_signals=[]",
            *(["warmup_steps=0"] if steps < 30 else []),  # smoke runs are shorter than it
            *overrides,
        ],
    )
    try:
        bigbatch.fit(config, out_dir=run_dir, progress=False)
    finally:
        hooks.StopHook.after_step = stop_hook  # type: ignore[method-assign]
    times = [later - earlier for earlier, later in zip(boundaries, boundaries[1:], strict=False)]
    return times if distributed.is_main_process() else []


def _rank(rank: int, world_size: int, port: int, run_dir: str, overrides: list[str], steps: int):
    join_as_rank(rank, world_size, port)
    times = train(Path(run_dir), overrides, steps, world_size)
    if rank == 0:
        torch.save(times, Path(run_dir) / "step_times.pt")
    distributed.teardown_process_group(wait_for_all=True)


def step_times(overrides: list[str], steps: int, world_size: int, where: Path) -> list[float]:
    """Rank 0's step times of one run in a fresh directory under ``where``."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=where))
    if world_size == 1:
        return train(run_dir, overrides, steps, 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (world_size, port, str(run_dir), overrides, steps)
    mp.spawn(_rank, args=args, nprocs=world_size, join=True)
    return torch.load(run_dir / "step_times.pt")


def measure(sizes: Sizes, where: Path) -> dict[tuple[str, str], list[float]]:
    """Every layout x arm: the measured step times of every round, pooled."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(sizes.rounds):
        for layout, world_size in LAYOUTS.items():
            for arm, overrides in ARMS.items():
                run = step_times(overrides, sizes.steps, world_size, where)
                times.setdefault((layout, arm), []).extend(run[sizes.warmup_steps - 1 :])
    return times


def table(times: dict[tuple[str, str], list[float]]) -> str:
    rows = [
        "| layout | checkpoints | steps timed | median step time (ms) | interquartile (ms) | "
        "cost vs no checkpoints |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for layout in LAYOUTS:
        base = statistics.median(times[(layout, "no checkpoints")])
        for arm in ARMS:
            measured = times[(layout, arm)]
            median = statistics.median(measured)
            quartiles = statistics.quantiles(measured, n=4) if len(measured) > 1 else [median] * 3
            cost = "--" if arm == "no checkpoints" else f"{(median / base - 1) * 100:+.1f}%"
            rows.append(
                f"| {layout} | {arm} | {len(measured)} | {median * 1e3:.1f} | "
                f"{quartiles[0] * 1e3:.1f}-{quartiles[2] * 1e3:.1f} | {cost} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argument_parser(__doc__, "1 round of 4 steps per arm, writes nothing")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as where:
        times = measure(sizes, Path(where))
    note = (
        f"tinylm recipe defaults, {sizes.steps} steps per run ({sizes.warmup_steps} left out), "
        f"{sizes.rounds} rounds of the arms in turn, torch {torch.__version__}, 1 thread per "
        f"process, {os.cpu_count()} CPU cores, gloo; {time.perf_counter() - start:.0f} s. "
        "Timings on a shared machine are noisy (10-30% between runs); the interquartile range "
        "shows how much within one."
    )
    publish("checkpoint_cost", table(times), note, smoke=args.smoke)


if __name__ == "__main__":
    main()
