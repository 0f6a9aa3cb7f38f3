"""Gradient all-reduces per step and step time under DDP: bigbatch vs syncing every micro-batch.

Two CPU processes over gloo train the same MLP on the same micro-batches. "sync every micro-batch"
is the naive DDP accumulation loop (no `no_sync`): DDP all-reduces the gradients after every
backward. bigbatch syncs once per optimizer step. All-reduces are counted with a DDP comm hook.

    python benchmarks/ddp.py            # k = 1, 4, 16; writes benchmarks/results/ddp.{md,png}
    python benchmarks/ddp.py --smoke    # k = 1, 2 and two steps, for CI
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import bigbatch

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

WIDTH = 1024


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(), torch.nn.Linear(2 * WIDTH, 10)
    )


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.cross_entropy(model(inputs), targets)


def _run(rank: int, world_size: int, port: int, ks: list[int], steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for k in ks:
        generator = torch.Generator().manual_seed(rank)
        window = [
            (
                torch.randn(16, WIDTH, generator=generator),
                torch.randint(0, 10, (16,), generator=generator),
            )
            for _ in range(k)
        ]
        for method in ("sync every micro-batch", "bigbatch"):
            model = DistributedDataParallel(mlp(), bucket_cap_mb=1024)  # one bucket
            calls = [0]

            def hook(state, bucket, calls=calls):
                calls[0] += 1
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(None, hook)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            accumulator = bigbatch.Accumulator(model, optimizer)
            times = []
            for step in range(steps + 1):
                calls[0] = 0
                dist.barrier()
                start = time.perf_counter()
                if method == "bigbatch":
                    accumulator.step(window, loss_fn)
                else:
                    for batch in window:
                        (loss_fn(model, batch) / k).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if step > 0:
                    times.append(time.perf_counter() - start)
            results[(k, method)] = (calls[0], statistics.median(times))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argument_parser(__doc__)
    args = parser.parse_args()
    ks, steps = ([1, 2], 2) if args.smoke else ([1, 4, 16], 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.spawn(_run, args=(2, port, ks, steps, out), nprocs=2, join=True)
        results = torch.load(out, weights_only=False)
    rows = [
        "| k | method | gradient all-reduces per step | step time | speed-up |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for k in ks:
        naive = results[(k, "sync every micro-batch")][1]
        for method in ("sync every micro-batch", "bigbatch"):
            syncs, seconds = results[(k, method)]
            rows.append(
                f"| {k} | {method} | {syncs:.0f} | {seconds * 1e3:.1f} ms | {naive / seconds:.2f} |"
            )
    table = "\n".join(rows)
    note = (
        f"2 processes over gloo on one CPU machine, MLP of "
        f"{sum(p.numel() for p in mlp().parameters()) / 1e6:.2f}M parameters, micro-batch 16 per "
        f"rank, median of {steps} steps; one gradient bucket, all-reduces counted by a comm hook."
    )
    publish("ddp", table, note, smoke=args.smoke, plot=lambda path: plot(results, ks, path))


def plot(results: dict, ks: list[int], path: Path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for method, colour in (("sync every micro-batch", "#c44"), ("bigbatch", "#4a4")):
        left.plot(ks, [results[(k, method)][0] for k in ks], "o-", color=colour, label=method)
        right.plot(
            ks, [results[(k, method)][1] * 1e3 for k in ks], "o-", color=colour, label=method
        )
    left.set_xlabel("accumulation steps k")
    left.set_ylabel("gradient all-reduces per step")
    right.set_xlabel("accumulation steps k")
    right.set_ylabel("step time (ms)")
    left.legend()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
