"""`bigbatch bench`: quick versions of the engine overhead, DDP sync and memory benchmarks.

Overhead: `Accumulator.step` against two hand-written loops on the same model and micro-batches:
the textbook loop (loss / k, clip, step) and one doing the same math as the engine (backward of
loss sums, one item count, one total norm, one rescale folding normalisation and clipping, step).
The three run interleaved in rounds that go through every order in turn, so drift in machine
speed and the cost of going first hit all alike; the figures are medians of per-round time ratios,
with their interquartile range. Targets: <= 1.02 x the same-math loop, <= 1.01 x the textbook
loop. DDP: gradient all-reduces per step and step time, two gloo processes, bigbatch against
syncing every micro-batch. Memory: activation memory per micro-batch size at a fixed global batch,
against the full batch (it should fall as micro / global). `benchmarks/` runs the full versions.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bigbatch.core import replication
from bigbatch.core.engine import Accumulator
from bigbatch.planning import plan

Window = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Ratio:
    """A per-round time ratio over the timed rounds: median and interquartile range."""

    median: float
    low: float  # first quartile
    high: float  # third quartile

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio:
        """The median and quartiles of the ratios (all three the value, for one ratio)."""
        if len(ratios) < 2:
            return cls(ratios[0], ratios[0], ratios[0])
        low, median, high = statistics.quantiles(ratios, n=4)
        return cls(median, low, high)

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class BenchRow:
    """One benchmark configuration and its timings.

    Attributes:
        model: what was trained.
        num_parameters: its parameter count.
        micro_batch_size: samples per micro-batch.
        gradient_accumulation_steps: micro-batches per step.
        steps: timed (interleaved) rounds after the warm-up.
        clock: ``"wall"`` or ``"thread CPU"`` (one torch thread on a CPU: time the OS gives
            other processes counts for no loop).
        textbook_s: median step time of the textbook loop.
        same_math_s: median step time of the hand-written loop doing the engine's math.
        bigbatch_s: median step time of `Accumulator.step`.
        ratio_to_same_math: per-round ratios bigbatch / same-math loop.
        ratio_to_textbook: per-round ratios bigbatch / textbook loop.
    """

    model: str
    num_parameters: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    steps: int
    clock: str
    textbook_s: float
    same_math_s: float
    bigbatch_s: float
    ratio_to_same_math: Ratio
    ratio_to_textbook: Ratio


SMALL_STEP = {"width": 576, "micro_batch_size": 64, "gradient_accumulation_steps": 8}
"""The small-step case: a 1.3M-parameter MLP, 8 micro-batches of 64 (about 40 ms a step on two
CPU cores), where the engine's fixed cost per step and per micro-step shows most."""


def mlp(width: int = 1024, seed: int = 0) -> torch.nn.Module:
    """4 x width^2 parameters, about 4.2M at 1024: big enough that the step, not Python,
    dominates; 1.3M at 576 (`SMALL_STEP`)."""
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


def same_math_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Window, max_grad_norm: float
) -> float:
    """The engine's math by hand: backward of loss sums, one total norm, one rescale, step."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss_sums, num_items = [], 0
    for micro_batch in window:
        rows = len(micro_batch[1])
        loss_sum = loss_fn(model, micro_batch) * rows
        loss_sum.backward()
        loss_sums.append(loss_sum.detach())
        num_items += rows
    gradients = [p.grad for p in parameters if p.grad is not None]
    grad_norm = float(torch.nn.utils.get_total_norm(gradients)) / num_items
    # Normalisation by the items and torch's clip coefficient, in one pass over the gradients.
    torch._foreach_mul_(gradients, min(1.0, max_grad_norm / (grad_norm + 1e-6)) / num_items)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(torch.stack(loss_sums).sum()) / num_items


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
    """Time interleaved steps of the three loops on the same model and micro-batches.

    Each round runs the textbook loop, the same-math loop and `Accumulator.step` once, in the
    next of the six orders, so each loop goes first, second and third equally often.

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
    models = {name: mlp(width) for name in ("textbook", "same math", "bigbatch")}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    accumulator = Accumulator(models["bigbatch"], optimizers["bigbatch"], max_grad_norm=1.0)
    loops: dict[str, Callable[[], object]] = {
        "textbook": lambda: hand_written_step(
            models["textbook"], optimizers["textbook"], window, 1.0
        ),
        "same math": lambda: same_math_step(
            models["same math"], optimizers["same math"], window, 1.0
        ),
        "bigbatch": lambda: accumulator.step(window, loss_fn),
    }
    one_cpu_thread = torch.get_num_threads() == 1
    clock = time.thread_time if one_cpu_thread else time.perf_counter
    orders = list(itertools.permutations(loops))
    times: dict[str, list[float]] = {name: [] for name in loops}
    for round_ in range(max(warmup, 0) + steps):
        for name in orders[round_ % len(orders)]:
            start = clock()
            loops[name]()
            if round_ >= warmup:
                times[name].append(clock() - start)
    bigbatch = times["bigbatch"]
    return BenchRow(
        model="MLP",
        num_parameters=sum(p.numel() for p in models["bigbatch"].parameters()),
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps=steps,
        clock="thread CPU" if one_cpu_thread else "wall",
        textbook_s=statistics.median(times["textbook"]),
        same_math_s=statistics.median(times["same math"]),
        bigbatch_s=statistics.median(bigbatch),
        ratio_to_same_math=Ratio.of([b / s for b, s in zip(bigbatch, times["same math"])]),
        ratio_to_textbook=Ratio.of([b / t for b, t in zip(bigbatch, times["textbook"])]),
    )


def machine_description() -> str:
    """Processor, torch threads and torch version, for the record next to the figures."""
    processor = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    plural = "" if threads == 1 else "s"
    return f"{processor}, {threads} thread{plural}, torch {torch.__version__}"


def format_rows(rows: Sequence[BenchRow]) -> str:
    """A Markdown table of the rows, then how they were measured."""
    lines = [
        "| model | params | micro x k | textbook loop | same-math loop | Accumulator.step "
        "| median ratio (IQR) vs same-math | vs textbook |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.num_parameters / 1e6:.1f}M "
            f"| {row.micro_batch_size} x {row.gradient_accumulation_steps} "
            f"| {row.textbook_s * 1e3:.1f} ms | {row.same_math_s * 1e3:.1f} ms "
            f"| {row.bigbatch_s * 1e3:.1f} ms | {row.ratio_to_same_math} "
            f"| {row.ratio_to_textbook} |"
        )
    steps = ", ".join(str(steps) for steps in sorted({row.steps for row in rows}))
    clocks = " and ".join(sorted({row.clock for row in rows}))
    lines.append("")
    lines.append(
        f"{steps} interleaved rounds after warm-up, {clocks} clock; {machine_description()}; "
        "target ratios <= 1.02 (same-math loop), <= 1.01 (textbook loop)"
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
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    # a collective that never completes fails in minutes, not after gloo's 30-minute default
    timeout = datetime.timedelta(minutes=5)
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=2, timeout=timeout
    )
    rows = _ddp_rows(accumulations, steps, width)
    # The DDP models are gone with _ddp_rows; collected now, their reducers release the process
    # group while the default group still holds it. A reducer freed after destroy_process_group
    # would destroy the group itself, holding the GIL while it joins a gloo thread that waits for
    # the GIL: a hang at exit.
    gc.collect()
    if rank == 0:
        torch.save([row.__dict__ for row in rows], out)
    # The comm hook's callback runs on a gloo thread, which then frees it (taking the GIL) after
    # the step has gone on. Exiting before that thread is done aborts the process ("terminate
    # called without an active exception": it touches Python while the interpreter shuts down).
    # A barrier waits for every earlier collective of this group, callbacks included; it comes
    # after rank 0's file, so that no rank tears its group down while another still works.
    dist.barrier()
    dist.destroy_process_group()


def _ddp_rows(accumulations: Sequence[int], steps: int, width: int) -> list[DdpRow]:
    """Each loop's all-reduces per step and median step time, on this rank."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    rows = []
    for accumulation in accumulations:
        window = _window(16, accumulation, width)
        for method in ("sync every micro-batch", "bigbatch"):
            # wrapped as `bigbatch train` wraps (gradients as bucket views), in one bucket
            model = replication.replicate(mlp(width), bucket_cap_mb=1024)
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
            accumulator.close()
            rows.append(DdpRow(accumulation, method, calls[0], statistics.median(times)))
    return rows


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


def quick_report(
    *, smoke: bool, steps: int, micro_batch_size: int, gradient_accumulation_steps: int
) -> str:
    """What `bigbatch bench` prints: engine overhead, DDP all-reduces, activation memory."""
    steps, warmup = (3, 1) if smoke else (steps, 5)
    row = measure_overhead(
        steps=steps,
        warmup=warmup,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    size = sum(p.numel() for p in mlp(256).parameters()) / 1e6
    return "\n".join(
        [
            "Engine overhead: Accumulator.step vs the hand-written loop\n",
            format_rows([row]),
            f"\nDDP: 2 gloo processes on this machine, MLP {size:.2f}M, micro-batch 16 per rank\n",
            format_ddp(measure_ddp((1, 4), steps=2 if smoke else 5)),
            "\nMemory: digits, global batch 256, tensors saved for backward (the memory probe)\n",
            format_memory(measure_memory()),
        ]
    )
