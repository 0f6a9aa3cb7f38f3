"""`bigbatch bench`: quick versions of the engine overhead, DDP sync and memory benchmarks.

Overhead: `Accumulator.step` against the hand-written loop on the same model and micro-batches,
interleaved in pairs whose order alternates (A B, B A, ...) so drift in machine speed and the cost
of going first hit both alike; the figure is the median of per-pair time ratios (target <= 1.01).
DDP: gradient all-reduces per step and step time, two gloo processes, bigbatch against syncing
every micro-batch. Memory: activation memory per micro-batch size at a fixed global batch, against
the full batch (it should fall as micro / global). `benchmarks/` runs the full versions.
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

from bigbatch.core.engine import Accumulator
from bigbatch.plan import plan

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

    def hand_written() -> None:
        hand_written_step(reference_model, reference_optimizer, window, 1.0)

    def with_bigbatch() -> None:
        accumulator.step(window, loss_fn)

    for step in range(max(warmup, 0) + steps):
        # The order alternates per pair, so whatever the first of a pair pays hits both alike.
        order = (hand_written, with_bigbatch) if step % 2 == 0 else (with_bigbatch, hand_written)
        seconds = {}
        for run in order:
            start = time.perf_counter()
            run()
            seconds[run] = time.perf_counter() - start
        hand_s, bigbatch_s = seconds[hand_written], seconds[with_bigbatch]
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


@dataclass(frozen=True)
class DdpRow:
    """Gradient all-reduces and median step time of one loop at one accumulation count."""

    gradient_accumulation_steps: int
    method: str
    all_reduces_per_step: float
    step_s: float


def _ddp_worker(
    rank: int, rendezvous: str, accumulations: Sequence[int], steps: int, width: int, out: str
) -> None:
    import datetime

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # a collective that never completes fails in minutes, not after gloo's 30-minute default
    timeout = datetime.timedelta(minutes=5)
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=2, timeout=timeout
    )
    rows = []
    for accumulation in accumulations:
        window = _window(16, accumulation, width)
        for method in ("sync every micro-batch", "bigbatch"):
            model = DistributedDataParallel(mlp(width), bucket_cap_mb=1024)  # one bucket
            calls = [0]

            # DDP checks the hook's annotations at run time: none, or the real GradBucket class.
            def count(state, bucket, calls=calls):  # type: ignore[no-untyped-def]
                calls[0] += 1
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(None, count)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            accumulator = Accumulator(model, optimizer)
            times = []
            for step in range(steps + 1):  # the first step warms up
                calls[0] = 0
                dist.barrier()
                start = time.perf_counter()
                if method == "bigbatch":
                    accumulator.step(window, loss_fn)
                else:
                    for micro_batch in window:
                        (loss_fn(model, micro_batch) / accumulation).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if step:
                    times.append(time.perf_counter() - start)
            rows.append(DdpRow(accumulation, method, calls[0], statistics.median(times)))
    # The comm hook's callback runs on a gloo thread, which then frees it (taking the GIL) after
    # the step has gone on. Exiting before that thread is done aborts the process ("terminate
    # called without an active exception": it touches Python while the interpreter shuts down).
    # A barrier waits for every earlier collective of this group, callbacks included.
    dist.barrier()
    if rank == 0:
        torch.save([row.__dict__ for row in rows], out)
    dist.destroy_process_group()


def measure_ddp(
    accumulations: Sequence[int] = (1, 4), *, steps: int = 3, width: int = 256
) -> list[DdpRow]:
    """Run two gloo processes on this machine and count each loop's gradient all-reduces."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        rendezvous, out = f"file://{folder}/rendezvous", f"{folder}/rows.pt"
        mp.spawn(_ddp_worker, args=(rendezvous, tuple(accumulations), steps, width, out), nprocs=2)
        return [DdpRow(**row) for row in torch.load(out, weights_only=True)]


def format_ddp(rows: Sequence[DdpRow]) -> str:
    """A Markdown table: all-reduces per step, step time and the speed-up over the naive loop."""
    naive = {r.gradient_accumulation_steps: r.step_s for r in rows if r.method != "bigbatch"}
    lines = [
        "| k | method | gradient all-reduces per step | step time | speed-up |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.gradient_accumulation_steps} | {row.method} | {row.all_reduces_per_step:.0f} "
            f"| {row.step_s * 1e3:.1f} ms "
            f"| {naive[row.gradient_accumulation_steps] / row.step_s:.2f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class MemoryRow:
    """Activation memory (tensors saved for backward) of one micro-batch size."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    activation_bytes: int
    full_batch_fraction: float


def measure_memory(
    global_batch_size: int = 256, micro_batch_sizes: Sequence[int] = (1, 16, 64, 256)
) -> list[MemoryRow]:
    """The digits recipe's activation memory per micro-batch size, by the memory probe."""
    from torch.utils.data import default_collate

    from bigbatch import recipes
    from bigbatch.tools import memory

    recipe = recipes.build("digits", {"seed": 0})
    dataset = recipe.train_dataset
    collate = recipe.collate_fn or default_collate
    sizes = sorted({*micro_batch_sizes, global_batch_size})
    probed = memory.probe(
        recipe.model,
        recipe.loss_fn,
        lambda n: collate([dataset[i] for i in range(n)]),
        sizes,
        repetitions=1,
    )
    saved = {row.micro_batch_size: row.saved_tensor_bytes for row in probed.rows}
    return [
        MemoryRow(
            size,
            plan(global_batch_size, micro_batch_size=size).gradient_accumulation_steps,
            saved[size],
            saved[size] / saved[global_batch_size],
        )
        for size in sorted(micro_batch_sizes)
    ]


def format_memory(rows: Sequence[MemoryRow], global_batch_size: int = 256) -> str:
    """A Markdown table: activations per micro-batch size against micro / global."""
    lines = [
        "| micro x k | activations | activations / full batch | micro / global |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.micro_batch_size} x {row.gradient_accumulation_steps} "
            f"| {row.activation_bytes / 1024:.0f} KiB | {row.full_batch_fraction:.3f} "
            f"| {row.micro_batch_size / global_batch_size:.3f} |"
        )
    return "\n".join(lines)
