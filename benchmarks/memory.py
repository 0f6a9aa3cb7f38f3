"""Peak memory vs micro-batch size at a fixed global batch, against one full batch.

For each micro-batch size the same global batch runs through one `Accumulator.step`. On CPU the
memory is counted: the storages autograd holds for backward (live, tracked with saved-tensor hooks
across the whole step, so a graph kept alive by mistake would show) plus parameters, gradients and
optimizer state; `bigbatch.tools.memory.probe`'s accounting of one micro-batch is shown beside
it. On CUDA it is the allocator's peak during the step. Activation memory should fall as
micro / global.

A second table measures one DDP rank's peak (2 gloo processes on CPU) with and without
``gradient_as_bucket_view``: the resident-set high-water mark of steps after warm-up, over the
parameters, in gradients (one gradient, not two).

    python benchmarks/memory.py            # writes benchmarks/results/memory.{md,png}
    python benchmarks/memory.py --smoke    # tiny global batch, prints the table only (CI)
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.parallel import DistributedDataParallel

import bigbatch
from bigbatch import recipes
from bigbatch.core import batches, replication
from bigbatch.tools.memory import optimizer_state_bytes, probe
from bigbatch.units import format_bytes

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

RECIPES = ("digits", "tinylm")


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, storage bytes): views of one storage share the key."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Held:
    """What autograd keeps instead of a saved tensor; tells the tracker when it is released."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, key: int, tracker: LiveSavedBytes) -> None:
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self) -> None:
        self.tracker.release(self.key)


class LiveSavedBytes:
    """Bytes of the distinct storages autograd holds for backward, now and at their peak.

    Parameters and buffers (passed as `exclude`) are not counted: they live anyway.
    """

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {storage_key(t)[0] for t in exclude}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        key, nbytes = storage_key(tensor)
        if key in self.exclude:
            return tensor
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(tensor, key, self)

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    @contextmanager
    def tracking(self) -> Iterator[LiveSavedBytes]:
        with saved_tensors_hooks(self.pack, self.unpack):
            yield self


@dataclass(frozen=True)
class Row:
    """One micro-batch size of one recipe."""

    recipe: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    peak_bytes: int
    activation_bytes: int
    probe_bytes: int


def recipe_window(recipe: recipes.Recipe, global_batch_size: int, micro: int) -> list[Any]:
    """The first global_batch_size training samples as one window of micro-batches of `micro`,
    collated (and, for tinylm, padded) per micro-batch as the trainer does."""
    collate = recipe.collate_fn or torch.utils.data.default_collate
    samples = [recipe.train_dataset[i] for i in range(global_batch_size)]
    sizes = bigbatch.plan(global_batch_size, micro_batch_size=micro).micro_batch_sizes(0)
    window, start = [], 0
    for size in sizes:
        window.append(collate(samples[start : start + size]))
        start += size
    return window


def model_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, one gradient per parameter, and the optimizer's state."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * parameters + optimizer_state_bytes(optimizer)


def step_memory(recipe: recipes.Recipe, window: list[Any], device: torch.device) -> tuple[int, int]:
    """(peak bytes, activation bytes) of one `Accumulator.step` over the window."""
    model = copy.deepcopy(recipe.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    accumulator = bigbatch.Accumulator(model, optimizer)
    window = [batches.to_device(micro_batch, device) for micro_batch in window]
    accumulator.step(window[:1], recipe.loss_fn)  # the optimizer state exists from now on
    resident = model_bytes(model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)  # parameters and optimizer state
        torch.cuda.reset_peak_memory_stats(device)
        accumulator.step(window, recipe.loss_fn)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        gradients = sum(p.numel() * p.element_size() for p in model.parameters())
        return peak, max(0, peak - before - gradients)
    tracker = LiveSavedBytes(list(model.parameters()) + list(model.buffers()))
    with tracker.tracking():
        accumulator.step(window, recipe.loss_fn)
    assert tracker.live == 0, "a graph outlived its step"
    return resident + tracker.peak, tracker.peak


def probe_bytes(recipe: recipes.Recipe, window: list[Any], device: torch.device) -> int:
    """`bigbatch.tools.memory.probe`'s memory of the window's largest micro-batch."""
    model = copy.deepcopy(recipe.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    largest = max(window, key=batches.num_rows)
    size = batches.num_rows(largest)
    make_batch: Callable[[int], Any] = lambda n: largest  # noqa: E731
    result = probe(model, recipe.loss_fn, make_batch, [size], optimizer=optimizer, device=device)
    return result.rows[0].memory_bytes


def build_recipe(name: str, global_batch_size: int) -> recipes.Recipe:
    """The recipe with only the training samples one global batch uses (tinylm builds fast)."""
    options = {"num_train_samples": global_batch_size, "num_eval_samples": 1}
    return recipes.build(name, {"seed": 0, "recipe_options": options if name == "tinylm" else {}})


def measure(name: str, global_batch_size: int, device: torch.device) -> list[Row]:
    recipe = build_recipe(name, global_batch_size)
    rows = []
    micro = 1
    sizes = []
    while micro < global_batch_size:
        sizes.append(micro)
        micro *= 2
    for micro in sizes + [global_batch_size]:
        window = recipe_window(recipe, global_batch_size, micro)
        peak, activations = step_memory(recipe, window, device)
        rows.append(
            Row(name, micro, len(window), peak, activations, probe_bytes(recipe, window, device))
        )
    return rows


def table(rows: list[Row], global_batch_size: int) -> str:
    lines = [
        "| recipe | micro x k | peak memory | activations | activations / full batch "
        "| micro / global | probe (one micro-batch) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        full = next(
            r for r in rows if r.recipe == row.recipe and r.gradient_accumulation_steps == 1
        )
        label = " (full batch)" if row.gradient_accumulation_steps == 1 else ""
        lines.append(
            f"| {row.recipe} | {row.micro_batch_size} x {row.gradient_accumulation_steps}"
            f"{label} | {format_bytes(row.peak_bytes)} | {format_bytes(row.activation_bytes)} "
            f"| {row.activation_bytes / full.activation_bytes:.3f} "
            f"| {row.micro_batch_size / global_batch_size:.3f} "
            f"| {format_bytes(row.probe_bytes)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], global_batch_size: int, path: Path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, colour in zip(RECIPES, ("#36c", "#c63")):
        mine = [r for r in rows if r.recipe == name]
        if not mine:
            continue
        sizes = [r.micro_batch_size for r in mine]
        left.plot(sizes, [r.peak_bytes / 2**20 for r in mine], "o-", color=colour, label=name)
        full = mine[-1].activation_bytes
        right.plot(
            [s / global_batch_size for s in sizes],
            [r.activation_bytes / full for r in mine],
            "o-",
            color=colour,
            label=name,
        )
    ideal = [2.0**-i for i in range(12)]
    right.plot(ideal, ideal, "k--", lw=1, label="micro / global")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel(f"micro-batch size (global batch {global_batch_size})")
    left.set_ylabel("peak memory of one step (MiB)")
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xlim(1 / global_batch_size / 1.5, 1.5)
    right.set_ylim(1 / global_batch_size / 4, 1.5)
    right.set_xlabel("micro / global")
    right.set_ylabel("activations / full batch")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def _resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _ddp_rank(rank: int, bucket_view: bool, width: int, folder: str) -> None:
    """One rank: warm up (DDP rebuilds its buckets after the first step), reset the peak, run two
    steps of two micro-batches; write (peak - resident before the model - parameters, gradient
    bytes): gradients, DDP's buckets and the (tiny) activations."""
    torch.set_num_threads(1)
    rendezvous = f"file://{os.path.join(folder, 'rendezvous')}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    torch.manual_seed(0)
    base = _resident_bytes("VmRSS")
    # each weight above glibc's mmap threshold, so that a freed gradient leaves the resident set
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(3)))
    wrapped = replication.replicate(model) if bucket_view else DistributedDataParallel(model)
    accumulator = bigbatch.Accumulator(wrapped, torch.optim.SGD(model.parameters(), lr=1e-3))
    window = [torch.randn(8, width), torch.randn(8, width)]

    def loss_fn(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return m(x).pow(2).sum(), x.shape[0]

    for _ in range(3):
        accumulator.step(window, loss_fn)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    for _ in range(2):
        accumulator.step(window, loss_fn)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    held = _resident_bytes("VmHWM") - base - parameters
    torch.save((held, parameters), os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def ddp_gradient_table(width: int) -> str:
    """Per-rank peak of gradients under DDP, with and without gradient_as_bucket_view."""
    lines = [
        "| DDP, 2 ranks | one gradient | peak beyond parameters (per rank) | in gradients |",
        "| --- | ---: | ---: | ---: |",
    ]
    for bucket_view in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_ddp_rank, args=(bucket_view, width, folder), nprocs=2, join=True)
            ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]
        held, gradient = max(ranks)
        label = "gradient_as_bucket_view" if bucket_view else "default (.grad and buckets)"
        lines.append(
            f"| {label} | {format_bytes(gradient)} | {format_bytes(held)} | {held / gradient:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(__doc__, "tiny global batch (CI)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    args = parser.parse_args()
    global_batch_size = 8 if args.smoke else args.global_batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [row for name in RECIPES for row in measure(name, global_batch_size, device)]
    method = (
        f"CUDA allocator peak on {torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else "CPU: storages autograd holds for backward, tracked live with saved-tensor hooks "
        "through the whole step, + parameters, gradients and AdamW state"
    )
    text = table(rows, global_batch_size)
    note = (
        f"Global batch {global_batch_size}, one `Accumulator.step` per row (AdamW); memory: "
        f"{method}. Activations = peak - parameters, gradients and optimizer state. The peak is "
        "that of the window's heaviest micro-batch: tinylm pads per micro-batch, so a short "
        "micro-batch can need less than micro / global of the full batch's activations. "
        f"{platform.machine()}, torch {torch.__version__}."
    )
    width = 512 if args.smoke else 4096
    text += "\n\n" + ddp_gradient_table(width)
    note += (
        f"\n\nDDP: 2 gloo processes (1 torch thread each), 3 bias-free Linear({width}, {width}) "
        "layers, SGD, windows of 2 micro-batches of 8 rows; after 3 warm-up steps the resident "
        "set's high-water mark is reset (/proc/self/clear_refs) and 2 more steps run. Peak beyond "
        "parameters = that peak - the resident set before the model was built - the parameters: "
        "the gradients, DDP's buckets, the activations (a few KiB) and gloo's and the "
        "allocator's own memory, the same in both rows. bigbatch wraps DDP with "
        "`gradient_as_bucket_view=True`, which holds one gradient fewer."
    )
    publish(
        "memory",
        text,
        note,
        smoke=args.smoke,
        plot=lambda path: plot(rows, global_batch_size, path),
    )


if __name__ == "__main__":
    main()
