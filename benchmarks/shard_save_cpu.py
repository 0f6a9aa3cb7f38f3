"""Where a sharded checkpoint's CPU goes, per rank: tinylm under FSDP2 on 2 gloo processes.

tinylm's model (recipe defaults: d_model 64, 2 layers) is sharded as `parallelism: fsdp` shards
it and trained 2 AdamW steps; then each rank saves the same checkpoint many times through
`Checkpointer`, synchronously and in the background (each background save waited for before the
next), with nothing else running. Figures are CPU time, not wall time: CPU time is robust to the
load of a shared machine, wall time is not (its waits for fsync and for the other rank are left
out here; `checkpoint_cost.py` measures step times). Per save and rank, the median of the saves:
the whole process (every thread: the writer thread, gloo's), the training thread alone (what a
background save costs the step boundary), then the parts, each the CPU time of the thread it ran
on inside that function (inclusive; indented rows are inside the row above), averaged over a
second round of saves with the functions wrapped.

    python benchmarks/shard_save_cpu.py          # writes benchmarks/results/shard_save_cpu.md
    python benchmarks/shard_save_cpu.py --smoke  # 2 saves of each kind, writes nothing
"""

from __future__ import annotations

import importlib
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bigbatch.core import distributed, sharding
from bigbatch.recipes import tinylm
from bigbatch.train.checkpointer import Checkpointer

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, join_as_rank, publish  # noqa: E402

DCP = "torch.distributed.checkpoint"
# Each part: the functions whose CPU time it is, as (module, class or None, function).
PARTS: dict[str, list[tuple[str, str | None, str]]] = {
    "gather_rng_states": [("bigbatch.train.checkpointer", None, "gather_rng_states")],
    "get_state_dict": [(f"{DCP}.state_dict", None, "get_state_dict")],
    "background copy (`ShardedWeights.stage`, with get_state_dict)": [
        ("bigbatch.train.checkpoint_weights", "ShardedWeights", "stage")
    ],
    "DCP save": [(f"{DCP}.state_dict_saver", None, "_save_state_dict")],
    "- plan: local plans, gathered, global plan, scattered": [
        (f"{DCP}.utils", "_DistWrapper", "reduce_scatter")
    ],
    "- - local plan": [(f"{DCP}.default_planner", "DefaultSavePlanner", "create_local_plan")],
    "- - global plan (rank 0)": [
        (f"{DCP}.default_planner", "DefaultSavePlanner", "create_global_plan")
    ],
    "- write: every item, results gathered, metadata": [
        (f"{DCP}.utils", "_DistWrapper", "all_reduce")
    ],
    "- - write_data: torch.save of every item, fsync": [
        (f"{DCP}.filesystem", "_FileSystemWriter", "write_data")
    ],
    "- - .metadata (rank 0)": [(f"{DCP}.filesystem", "_FileSystemWriter", "finish")],
    "finish_checkpoint (rank 0: state.pt, fsyncs, sha256, rename)": [
        ("bigbatch.train.checkpoint", None, "finish_checkpoint"),
        ("bigbatch.train.checkpoint_async", None, "finish_checkpoint"),
    ],
}
ARMS = ("synchronous", "background")


def sharded_tinylm(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """tinylm's model sharded as `parallelism: fsdp` shards it, after 2 AdamW steps."""
    recipe = tinylm.build({})
    model = recipe.model
    before = {id(parameter): name for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002)
    units = tinylm.shard_units(model)
    sharding.shard_model(model, units, world_size=world_size, device_type="cpu")
    sharding.rebind_optimizer(optimizer, before, model)
    batch = tinylm.collate([recipe.train_dataset[i] for i in range(8)])
    for _ in range(2):
        optimizer.zero_grad()
        loss_sum, _ = recipe.loss_fn(model, batch)
        loss_sum.backward()
        optimizer.step()
    return model, optimizer


def cpu_per_save(checkpointer: Checkpointer, saves: int, arm: str) -> tuple[float, float]:
    """The median CPU time of a save: the process's, and this (the training) thread's."""
    process, thread = [], []
    for step in range(saves):
        start_process, start_thread = time.process_time(), time.thread_time()
        if arm == "background":
            checkpointer.save_in_background(step)
            checkpointer.wait()
        else:
            checkpointer.save(step)
        process.append(time.process_time() - start_process)
        thread.append(time.thread_time() - start_thread)
    return statistics.median(process), statistics.median(thread)


def wrap_parts() -> dict[str, float]:
    """Wrap every function of PARTS to add its thread's CPU time in it to its part's total."""
    totals = dict.fromkeys(PARTS, 0.0)
    for part, targets in PARTS.items():
        for module_name, class_name, function_name in targets:
            owner: Any = importlib.import_module(module_name)
            if class_name is not None:
                owner = getattr(owner, class_name)
            original = getattr(owner, function_name)

            def timed(*args: Any, _part: str = part, _original: Any = original, **kwargs: Any):
                start = time.thread_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    totals[_part] += time.thread_time() - start

            setattr(owner, function_name, timed)
    return totals


def measure(directory: str, saves: int) -> dict[str, dict[str, float]]:
    """This rank's figures (ms per save) by arm: process, training thread, and every part."""
    torch.manual_seed(0)
    model, optimizer = sharded_tinylm(distributed.get_world_size())
    checkpointer = Checkpointer(Path(directory), model=model, optimizer=optimizer, sharded=True)
    for arm in ARMS:  # warm-up
        cpu_per_save(checkpointer, 2, arm)
    figures: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        process, thread = cpu_per_save(checkpointer, saves, arm)
        figures[arm] = {"process": process * 1e3, "training thread": thread * 1e3}
    totals = wrap_parts()
    for arm in ARMS:
        for part in totals:
            totals[part] = 0.0
        cpu_per_save(checkpointer, saves, arm)
        figures[arm].update({part: total / saves * 1e3 for part, total in totals.items()})
    return figures


def _rank(rank: int, world_size: int, port: int, directory: str, saves: int) -> None:
    join_as_rank(rank, world_size, port)
    distributed.setup_process_group()
    figures = measure(directory, saves)
    torch.save(figures, Path(directory) / f"figures-{rank}.pt")
    distributed.teardown_process_group(wait_for_all=True)


def table(ranks: list[dict[str, dict[str, float]]]) -> str:
    columns = [(arm, rank) for arm in ARMS for rank in range(len(ranks))]
    rows = [
        "| CPU ms per save | " + " | ".join(f"{arm}, rank {rank}" for arm, rank in columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for name in ("process", "training thread", *PARTS):
        cells = (ranks[rank][arm][name] for arm, rank in columns)
        label = f"whole save, {name}" if name in ("process", "training thread") else name
        rows.append(f"| {label} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argument_parser(__doc__, "2 saves of each kind, writes nothing")
    parser.add_argument("--saves", type=int, default=30, help="saves of each kind (default 30)")
    args = parser.parse_args()
    saves = 2 if args.smoke else args.saves
    start = time.perf_counter()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="shard-save-cpu-") as directory:
        mp.spawn(_rank, args=(2, port, directory, saves), nprocs=2, join=True)
        ranks = [torch.load(Path(directory) / f"figures-{rank}.pt") for rank in range(2)]
    note = (
        f"tinylm recipe defaults (0.1M parameters) under FSDP2 on 2 gloo processes, {saves} "
        f"saves of each kind, medians; torch {torch.__version__}, 1 thread per process, "
        f"{os.cpu_count()} CPU cores; {time.perf_counter() - start:.0f} s. CPU time moves by "
        "a few ms between runs on a loaded machine (caches shared with other processes)."
    )
    publish("shard_save_cpu", table(ranks), note, smoke=args.smoke)


if __name__ == "__main__":
    main()
