"""Sharded accumulation: gradient memory and collectives per step, and bf16 accumulation error.

Table 1: 1 and 2 CPU processes over gloo train the same MLP (each Linear a shard unit) with
`bigbatch.Accumulator` under DDP, FSDP2 `every_micro_batch` and FSDP2 `step_end`. Per rank:
the most gradient memory held after any backward (sharded `.grad` plus FSDP's unsharded
accumulated gradients, read from the tensors themselves), gradient collectives per step
(reduce-scatters patched with a counter; DDP's all-reduces through a comm hook) and step time.

Table 2: bf16 parameters, one global batch of 256 rows split into 1, 4, 16 and 64 micro-batches:
the relative error of the applied gradient against float64, accumulating in bf16 `.grad`, in
an fp32 buffer (bigbatch's default), and one bf16 full-batch backward.

    python benchmarks/sharded.py            # writes benchmarks/results/sharded.md
    python benchmarks/sharded.py --smoke    # tiny sizes, writes nothing
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bigbatch

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

MICRO_BATCHES = 4
ROWS = 8


def mlp(width: int, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for index in range(4):
        layers.append(torch.nn.Linear(width if index else 16, width))
        layers.append(torch.nn.Tanh())
    layers.append(torch.nn.Linear(width, 4))
    return torch.nn.Sequential(*layers).to(dtype)


def loss_fn(model, micro_batch):
    x, y = micro_batch
    return (model(x) - y).pow(2).mean(dim=1).sum(), x.shape[0]


def held_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient tensors this rank holds now: local shards and unsharded FSDP grads."""
    from bigbatch.core import sharding

    total = sum(
        sharding.local(p.grad).numel() * p.grad.element_size()
        for p in model.parameters()
        if p.grad is not None
    )
    for module in sharding.fsdp_modules(model):
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group else []:
            for grad in (
                getattr(fsdp_param, "unsharded_accumulated_grad", None),
                getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None),
            ):
                if grad is not None:
                    total += grad.numel() * grad.element_size()
    return total


def _rank(rank: int, world: int, mode: str, width: int, steps: int, out_dir: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        calls = {"n": 0}
        model: torch.nn.Module = mlp(width)
        if mode == "DDP":

            def hook(state, bucket):
                calls["n"] += 1
                return default_hooks.allreduce_hook(None, bucket)

            model = DistributedDataParallel(model, bucket_cap_mb=1000)
            model.register_comm_hook(None, hook)
            sync = "step_end"
        else:
            original = dist.reduce_scatter_single

            def counting(*args, **kwargs):
                calls["n"] += 1
                return original(*args, **kwargs)

            dist.reduce_scatter_single = counting  # type: ignore[assignment]
            mesh = init_device_mesh("cpu", (world,))
            for block in model:
                if isinstance(block, torch.nn.Linear):
                    fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            sync = mode.split()[-1]
        accumulator = bigbatch.Accumulator(
            model, torch.optim.SGD(model.parameters(), lr=0.01), gradient_sync=sync
        )
        peak = {"bytes": 0}
        backward = accumulator._backward

        def measured_backward(*args):
            backward(*args)
            peak["bytes"] = max(peak["bytes"], held_gradient_bytes(model))

        accumulator._backward = measured_backward  # type: ignore[method-assign]
        generator = torch.Generator().manual_seed(rank)
        times, per_step = [], []
        for _ in range(steps):
            window = [
                (
                    torch.randn(ROWS, 16, generator=generator),
                    torch.randn(ROWS, 4, generator=generator),
                )
                for _ in range(MICRO_BATCHES)
            ]
            before = calls["n"]
            start = time.perf_counter()
            accumulator.step(window, loss_fn)
            times.append(time.perf_counter() - start)
            per_step.append(calls["n"] - before)
        torch.save(
            {"peak": peak["bytes"], "calls": per_step[-1], "step_s": statistics.median(times)},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # every collective done before teardown (gloo threads, callbacks)
    finally:
        dist.destroy_process_group()


def measure_memory(worlds: list[int], width: int, steps: int) -> list[list[str]]:
    rows = []
    parameters = sum(p.numel() for p in mlp(width).parameters())
    for world in worlds:
        for mode in ("DDP", "FSDP2 every_micro_batch", "FSDP2 step_end"):
            with tempfile.TemporaryDirectory() as out_dir:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                mp.spawn(_rank, args=(world, mode, width, steps, out_dir), nprocs=world)
                results = [torch.load(f"{out_dir}/rank{r}.pt") for r in range(world)]
            rows.append(
                [
                    str(world),
                    mode,
                    f"{max(r['peak'] for r in results) / 1e6:.2f}",
                    f"{parameters * 4 / 1e6:.2f}",
                    str(results[0]["calls"]),
                    f"{max(r['step_s'] for r in results) * 1e3:.1f}",
                ]
            )
    return rows


class _Recorder(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.gradients: list[torch.Tensor] = []

    def step(self, closure=None):
        self.gradients = [p.grad.double() for g in self.param_groups for p in g["params"]]


def measure_bf16(splits: list[int], rows: int = 256, width: int = 64) -> list[list[str]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 16, generator=generator).to(torch.bfloat16)
    y = torch.randn(rows, 4, generator=generator).to(torch.bfloat16)
    reference = mlp(width, torch.bfloat16).double()
    (reference(x.double()) - y.double()).pow(2).mean(dim=1).mean().backward()
    expected = [p.grad for p in reference.parameters()]

    def error(gradients: list[torch.Tensor]) -> float:
        difference = sum(float((a - e).pow(2).sum()) for a, e in zip(gradients, expected))
        return (difference / sum(float(e.pow(2).sum()) for e in expected)) ** 0.5

    def engine(k: int, accumulation_dtype: str) -> float:
        model = mlp(width, torch.bfloat16)
        optimizer = _Recorder(model.parameters())
        window = list(zip(x.chunk(k), y.chunk(k)))
        bigbatch.Accumulator(model, optimizer, accumulation_dtype=accumulation_dtype).step(
            window, loss_fn
        )
        return error(optimizer.gradients)

    full = mlp(width, torch.bfloat16)
    (full(x) - y).pow(2).mean(dim=1).mean().backward()
    full_error = error([p.grad.double() for p in full.parameters()])
    return [
        [str(k), f"{engine(k, 'param'):.3e}", f"{engine(k, 'fp32'):.3e}", f"{full_error:.3e}"]
        for k in splits
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main() -> None:
    args = argument_parser(__doc__).parse_args()
    width, steps = (64, 2) if args.smoke else (512, 5)
    memory = measure_memory([1, 2], width, steps)
    errors = measure_bf16([1, 4, 16, 64])
    text = (
        table(
            [
                "ranks",
                "mode",
                "peak gradient MB per rank",
                "full gradient MB",
                "gradient collectives per step",
                "step ms",
            ],
            memory,
        )
        + "\n\n"
        + table(
            ["micro-batches", "bf16 .grad", "fp32 buffer (default)", "one bf16 full batch"],
            errors,
        )
    )
    note = (
        f"CPU, gloo, 1 torch thread per process; MLP of 5 Linear layers (width {width}, float32), "
        f"{MICRO_BATCHES} micro-batches of {ROWS} rows per rank, median of {steps} steps. "
        "Collectives: DDP all-reduces (one bucket), FSDP2 reduce-scatters (one per Linear). "
        "bf16 table: relative error of the applied gradient against float64, 256 rows."
    )
    publish("sharded", text, note, smoke=args.smoke)


if __name__ == "__main__":
    main()
