"""Sharded accumulation: per-rank memory, collectives and step time, and bf16 accumulation error.

Table 1: 1, 2 and 4 CPU processes over gloo train the tinylm recipe's model (its loss_fn,
collate_fn and dataset; FSDP2 shards each transformer block, the recipe's shard units, then the
root) with `bigbatch.Accumulator` and the recipe's AdamW, under DDP, FSDP2 `every_micro_batch`
and FSDP2 `step_end`. Every step is the same global batch, cut by global index: each rank gets
its own share of it, in micro-batches. Per rank: the most gradient memory held after any
backward (sharded `.grad` plus FSDP's unsharded accumulated gradients, read from the tensors
themselves), the parameters and AdamW state it holds (local shards), gradient collectives per
step (reduce-scatters patched with a counter; DDP's all-reduces through a comm hook) and the step
time, also relative to DDP on as many ranks. The three modes run interleaved, step by step, in
the same processes.

Table 2: bf16 parameters, one global batch of 256 rows split into 1, 4, 16 and 64 micro-batches:
the relative error of the applied gradient against float64, accumulating in bf16 `.grad`, in
an fp32 buffer (bigbatch's default), and one bf16 full-batch backward (an MLP).

    python benchmarks/sharded.py            # writes benchmarks/results/sharded.md
    python benchmarks/sharded.py --smoke    # tiny sizes, 1, 2 and 4 ranks, writes nothing
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import bigbatch
from bigbatch import recipes
from bigbatch.core import sharding

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

MODES = ("DDP", "FSDP2 every_micro_batch", "FSDP2 step_end")


@dataclass(frozen=True)
class Sizes:
    """One run of table 1: the tinylm model, the global batch and how long to measure."""

    d_model: int
    num_layers: int
    global_batch_size: int
    micro_batch_size: int
    steps: int  # timed steps, after one untimed warm-up step
    timeout_s: float  # per rank count: a deadlock fails instead of hanging

    def recipe_options(self) -> dict[str, int]:
        return {
            "d_model": self.d_model,
            "num_layers": self.num_layers,
            "num_heads": 4,
            "num_train_samples": (self.steps + 1) * self.global_batch_size,
            "num_eval_samples": 1,
        }


FULL = Sizes(
    d_model=384, num_layers=6, global_batch_size=64, micro_batch_size=4, steps=7, timeout_s=900
)
SMOKE = Sizes(
    d_model=64, num_layers=2, global_batch_size=16, micro_batch_size=2, steps=2, timeout_s=180
)


def tinylm(sizes: Sizes) -> recipes.Recipe:
    return recipes.build("tinylm", {"seed": 0, "recipe_options": sizes.recipe_options()})


def windows(recipe: recipes.Recipe, sizes: Sizes, rank: int, world: int) -> list[list[Any]]:
    """This rank's window of every step: its share of the global batch, by global index."""
    share, micro = sizes.global_batch_size // world, sizes.micro_batch_size  # both divide evenly
    result = []
    for step in range(sizes.steps + 1):
        first = step * sizes.global_batch_size + rank * share
        samples = [recipe.train_dataset[i] for i in range(first, first + share)]
        result.append([recipe.collate_fn(samples[s : s + micro]) for s in range(0, share, micro)])
    return result


def mlp(width: int, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for index in range(4):
        layers.append(torch.nn.Linear(width if index else 16, width))
        layers.append(torch.nn.Tanh())
    layers.append(torch.nn.Linear(width, 4))
    return torch.nn.Sequential(*layers).to(dtype)


def mlp_loss_fn(model, micro_batch):
    x, y = micro_batch
    return (model(x) - y).pow(2).mean(dim=1).sum(), x.shape[0]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of a tensor: its local shard for a DTensor."""
    local = sharding.local(tensor)
    return local.numel() * local.element_size()


def held_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient tensors this rank holds now: local shards and unsharded FSDP grads."""
    total = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    return total + sum(tensor_bytes(grad) for grad in sharding.unsharded_gradients(model))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (AdamW: two moments and a step)."""
    tensors = list(model.parameters()) + [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]
    return sum(tensor_bytes(tensor) for tensor in tensors)


class Arm:
    """One mode on this rank: its model, optimizer and Accumulator, and what was measured."""

    def __init__(
        self, mode: str, recipe: recipes.Recipe, world: int, calls: dict[str, int]
    ) -> None:
        model: torch.nn.Module = copy.deepcopy(recipe.model)
        if mode == "DDP":

            def hook(state, bucket):
                calls["n"] += 1
                return default_hooks.allreduce_hook(None, bucket)

            # one bucket; .grad a view of it, so that the bucket is no second gradient copy
            model = DistributedDataParallel(model, bucket_cap_mb=1000, gradient_as_bucket_view=True)
            model.register_comm_hook(None, hook)
            sync = "step_end"
        else:
            units = recipe.shard_units(model)
            model = sharding.shard_model(model, units, world_size=world, device_type="cpu")
            sync = mode.split()[-1]
        self.model = model
        self.optimizer = recipe.build_optimizer(model, lr=1e-3)
        self.accumulator = bigbatch.Accumulator(model, self.optimizer, gradient_sync=sync)
        self.peak_gradient_bytes = 0
        self.times_s: list[float] = []
        self.calls_per_step: list[int] = []
        backward = self.accumulator._backward

        def measured_backward(*args):
            backward(*args)
            self.peak_gradient_bytes = max(self.peak_gradient_bytes, held_gradient_bytes(model))

        self.accumulator._backward = measured_backward  # type: ignore[method-assign]


def _rank(rank: int, world: int, sizes: Sizes, out_dir: str) -> None:
    torch.set_num_threads(1)
    # The logits are a view (Linear on 3-D input); tinylm's loss_fn changes nothing in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        calls = {"n": 0}
        original = dist.reduce_scatter_single

        def counting(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        dist.reduce_scatter_single = counting  # type: ignore[assignment]
        recipe = tinylm(sizes)
        arms = {mode: Arm(mode, recipe, world, calls) for mode in MODES}
        for step, window in enumerate(windows(recipe, sizes, rank, world)):
            for arm in arms.values():  # interleaved: drift in machine speed hits every mode
                before = calls["n"]
                start = time.perf_counter()
                arm.accumulator.step(window, recipe.loss_fn)
                if step:  # the first step builds AdamW's state and FSDP's lazy state
                    arm.times_s.append(time.perf_counter() - start)
                arm.calls_per_step.append(calls["n"] - before)
        results = {
            mode: {
                "peak": arm.peak_gradient_bytes,
                "state": state_bytes(arm.model, arm.optimizer),
                "calls": arm.calls_per_step[-1],
                "step_s": statistics.median(arm.times_s),
            }
            for mode, arm in arms.items()
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # every collective done before teardown (gloo threads, callbacks)
    finally:
        dist.destroy_process_group()


def spawn(world: int, sizes: Sizes, out_dir: str) -> None:
    """Run `_rank` on `world` processes; kill them and fail if they outlast `sizes.timeout_s`."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    context = mp.spawn(_rank, args=(world, sizes, out_dir), nprocs=world, join=False)
    deadline = time.monotonic() + sizes.timeout_s
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(
                f"{world} ranks did not finish within {sizes.timeout_s:.0f} s: a deadlock?"
            )


def predicted(sizes: Sizes, world: int, mode: str) -> tuple[float, float]:
    """`bigbatch.tools.rank_memory`'s (peak gradient, parameters + AdamW state) per rank, in MB.

    DDP runs with `gradient_as_bucket_view`, so its buckets are the gradient, not a copy."""
    from bigbatch.tools.rank_memory import Layout, model_sizes, rank_memory

    recipe = tinylm(sizes)
    optimizer = recipe.build_optimizer(recipe.model, lr=1e-3)
    whole = model_sizes(recipe.model, optimizer, recipe.shard_units)
    parallelism = "ddp" if mode == "DDP" else "fsdp"
    memory = rank_memory(whole, Layout(parallelism, world, mode.split()[-1]), activation_bytes=0)
    return (
        (memory.gradients + memory.unsharded_gradient) / 1e6,
        (memory.parameters + memory.optimizer) / 1e6,
    )


def measure_sharded(worlds: list[int], sizes: Sizes) -> list[list[str]]:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as out_dir:
            spawn(world, sizes, out_dir)
            results = [torch.load(f"{out_dir}/rank{r}.pt") for r in range(world)]
        ddp_s = max(r["DDP"]["step_s"] for r in results)
        for mode in MODES:
            step_s = max(r[mode]["step_s"] for r in results)  # the slowest rank
            gradient, state = predicted(sizes, world, mode)
            rows.append(
                [
                    str(world),
                    mode,
                    f"{max(r[mode]['peak'] for r in results) / 1e6:.2f}",
                    f"{gradient:.2f}",
                    f"{max(r[mode]['state'] for r in results) / 1e6:.2f}",
                    f"{state:.2f}",
                    str(results[0][mode]["calls"]),
                    f"{step_s * 1e3:.0f}",
                    f"{step_s / ddp_s:.2f}",
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
            window, mlp_loss_fn
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
    sizes = SMOKE if args.smoke else FULL
    worlds = [1, 2, 4]
    sharded = measure_sharded(worlds, sizes)
    errors = measure_bf16([1, 4, 16, 64])
    text = (
        table(
            [
                "ranks",
                "mode",
                "peak gradient MB per rank",
                "predicted",
                "parameters + AdamW state MB per rank",
                "predicted",
                "gradient collectives per step",
                "step ms",
                "step time vs DDP",
            ],
            sharded,
        )
        + "\n\n"
        + table(
            ["micro-batches", "bf16 .grad", "fp32 buffer (default)", "one bf16 full batch"],
            errors,
        )
    )
    model = tinylm(sizes).model
    parameters = sum(p.numel() for p in model.parameters())
    micro_steps = ", ".join(
        str(sizes.global_batch_size // (world * sizes.micro_batch_size)) for world in worlds
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shared = [world for world in worlds if world > (cores or 1)]
    note = (
        f"CPU, gloo, 1 torch thread per process, {cores} CPU cores"
        + (
            f" (the {shared[0]}-process run shares them, so its step times include waiting for "
            "a core). "
            if shared
            else ". "
        )
        + f"tinylm (d_model {sizes.d_model}, {sizes.num_layers} blocks, "
        f"{parameters / 1e6:.2f}M float32 parameters), AdamW; every step the same global batch of "
        f"{sizes.global_batch_size} samples in micro-batches of {sizes.micro_batch_size}: "
        f"{micro_steps} micro-steps per rank on {', '.join(map(str, worlds))} ranks. "
        f"Median of {sizes.steps} steps after a warm-up step, the slowest rank; memory and state: "
        "the largest rank. Collectives: DDP all-reduces (one bucket, `gradient_as_bucket_view`), "
        f"FSDP2 reduce-scatters (one per unit: {sizes.num_layers} blocks and the root; none on "
        "one rank); FSDP2's parameter all-gathers are not counted. "
        "bf16 table: relative error of the applied gradient against float64, an MLP of 5 Linear "
        "layers (width 64), 256 rows."
    )
    publish("sharded", text, note, smoke=args.smoke)


if __name__ == "__main__":
    main()
