"""The joint plan: activation checkpointing x micro-batch under a memory budget (issue 21).

An 8-layer tinylm (d_model 128, sequences of up to 58 tokens: max_digits 18), global batch 128,
at three budgets. Per budget one joint probe (`bigbatch.tools.joint.choose_plan`) with
optimize memory gives the static rows (none, every_2, full: each policy's largest micro-batch
that fits) and auto's choice; a second with optimize throughput gives auto's fastest plan. Every
distinct plan then runs whole `Accumulator.step`s of the global batch:

- measured peak: one step under `LiveBytes` (every storage an op allocates, live until freed,
  beside the parameters, gradients and AdamW state there before: activations, recomputes and
  temporaries alike; a view or an in-place update allocates nothing), against the probe's
  predicted peak (its accounting of the chosen micro-batch, recompute added, at least the
  optimizer step's peak);
- items/s: samples per second of whole steps, best of the rounds, plans interleaved.

    python benchmarks/checkpointing.py            # writes benchmarks/results/checkpointing.md
    python benchmarks/checkpointing.py --smoke    # a 2-layer model, tiny batch (CI)
"""

from __future__ import annotations

import copy
import functools
import math
import platform
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bigbatch
from bigbatch import recipes
from bigbatch.core.checkpointing import apply_activation_checkpointing
from bigbatch.data.loader import first_samples
from bigbatch.tools.joint import CANDIDATES, JointChoice, choose_plan
from bigbatch.units import format_bytes, parse_memory_size

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

OPTIONS = {"num_layers": 8, "d_model": 128, "max_digits": 18, "num_train_samples": 2000}
SMOKE_OPTIONS = {"num_layers": 2, "d_model": 16, "max_digits": 18, "num_train_samples": 64}
BUDGETS = ("60MB", "45MB", "120MB")  # the acceptance budget first
SMOKE_BUDGETS = ("1MB",)
HEADROOM = 0.1


@dataclass(frozen=True)
class Row:
    """One plan at one budget: a static policy's, or auto's."""

    budget: str
    label: str
    policy: str
    micro_batch_size: int
    micro_steps: int
    predicted_bytes: float
    measured_bytes: int = 0
    items_per_s: float = 0.0


def build(options: dict[str, int]) -> recipes.Recipe:
    return recipes.build("tinylm", {"seed": 0, "recipe_options": options})


def joint(recipe: recipes.Recipe, budget: str, share: int, optimize: str) -> JointChoice:
    model = recipe.model
    return choose_plan(
        model, recipe.loss_fn, first_samples(recipe.train_dataset, recipe.collate_fn),
        max_rows=share, memory_budget_bytes=budget, optimize=optimize,  # type: ignore[arg-type]
        units=list(model.blocks), optimizer=torch.optim.AdamW(model.parameters()),
        device="cpu", headroom=HEADROOM,
    )  # fmt: skip


def rows_of(recipe: recipes.Recipe, budget: str, share: int) -> list[Row]:
    """The static rows and auto's two choices, from a memory and a throughput joint probe; the
    predicted peak is that of the plan's largest micro-batch (`bigbatch.plan` evens them out:
    micro-batch 98 of 128 runs as 2 x 64), from its policy's probe."""
    by_memory = joint(recipe, budget, share, "memory")
    by_speed = joint(recipe, budget, share, "throughput")
    picks = [(c.activation_checkpointing, by_memory, c) for c in by_memory.candidates if c.fits]
    for label, choice in (("auto (memory)", by_memory), ("auto (throughput)", by_speed)):
        chosen = next(
            c
            for c in choice.candidates
            if c.activation_checkpointing == choice.activation_checkpointing and c.chosen_sync
        )
        picks.append((label, choice, chosen))
    rows = []
    for label, choice, c in picks:
        largest = math.ceil(share / c.micro_steps)
        probe = choice.choices[c.activation_checkpointing].probe
        predicted = probe.peak(largest)
        rows.append(
            Row(budget, label, c.activation_checkpointing, c.micro_batch_size, c.micro_steps,
                predicted)
        )  # fmt: skip
    apply_activation_checkpointing(recipe.model, "none")
    return rows


def window(recipe: recipes.Recipe, share: int, micro: int) -> list[Any]:
    collate = recipe.collate_fn or torch.utils.data.default_collate
    samples = [recipe.train_dataset[i] for i in range(share)]
    sizes = bigbatch.plan(share, micro_batch_size=micro).micro_batch_sizes(0)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [collate(samples[o : o + s]) for o, s in zip(offsets, sizes)]


def accumulator(recipe: recipes.Recipe, policy: str) -> bigbatch.Accumulator:
    model = copy.deepcopy(recipe.model)
    apply_activation_checkpointing(model, policy, list(model.blocks))  # type: ignore[arg-type]
    return bigbatch.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-5))


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops allocate, live until freed (a weak reference tells), at peak.

    Independent of the probe: it sees every op's output, temporaries and recomputes included.
    An output on the storage of one of the op's inputs (a view such as a weight's transpose, an
    in-place update such as AdamW's of the parameters and its state) allocates nothing.
    """

    def __init__(self, resident: int) -> None:
        super().__init__()
        self.live = self.peak = resident
        self.refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}

    def _freed(self, key: int, nbytes: int, _: object) -> None:
        if self.refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in inputs and key not in self.refs:
                    self.refs[key] = weakref.ref(
                        storage, functools.partial(self._freed, key, nbytes)
                    )
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def measured_peak(recipe: recipes.Recipe, policy: str, steps: list[Any]) -> int:
    """Peak bytes of one whole step (after a first one: AdamW's state exists) under LiveBytes."""
    engine = accumulator(recipe, policy)
    engine.step(steps[:1], recipe.loss_fn)
    held = [*engine.model.parameters(), *(p.grad for p in engine.model.parameters())]
    held += [v for state in engine.optimizer.state.values() for v in state.values()]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in held
        if isinstance(t, torch.Tensor)
    }
    tracker = LiveBytes(sum(storages.values()))
    with tracker:
        engine.step(steps, recipe.loss_fn)
    return tracker.peak


def items_per_s(
    recipe: recipes.Recipe, plans: list[tuple[str, int]], share: int, rounds: int
) -> dict[tuple[str, int], float]:
    """Samples/s of whole steps per (policy, micro), best of the rounds after a warm-up."""
    engines = {plan: accumulator(recipe, plan[0]) for plan in plans}
    windows = {plan: window(recipe, share, plan[1]) for plan in plans}
    best = dict.fromkeys(plans, math.inf)
    for round_index in range(rounds + 1):
        for plan in plans:
            start = time.thread_time()
            engines[plan].step(windows[plan], recipe.loss_fn)
            if round_index:
                best[plan] = min(best[plan], time.thread_time() - start)
    return {plan: share / seconds for plan, seconds in best.items()}


def measure(
    options: dict[str, int], budgets: tuple[str, ...], share: int, rounds: int
) -> list[Row]:
    recipe = build(options)
    table_rows = []
    for budget in budgets:
        rows = rows_of(recipe, budget, share)
        plans = sorted({(r.policy, r.micro_batch_size) for r in rows})
        speeds = items_per_s(recipe, plans, share, rounds)
        peaks = {
            plan: measured_peak(recipe, plan[0], window(recipe, share, plan[1])) for plan in plans
        }
        done = [
            Row(**{**vars(r), "measured_bytes": peaks[(r.policy, r.micro_batch_size)],
                   "items_per_s": speeds[(r.policy, r.micro_batch_size)]})
            for r in rows
        ]  # fmt: skip
        print(table(done), file=sys.stderr, flush=True)  # each budget when done: a long run
        table_rows += done
    return table_rows


def table(rows: list[Row]) -> str:
    lines = [
        "| budget | plan | checkpointing | micro-batch | micro-steps | predicted peak "
        "| measured peak | predicted / measured | items/s |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {format_bytes(parse_memory_size(r.budget))} | {r.label} | {r.policy} "
            f"| {r.micro_batch_size} | {r.micro_steps} | {format_bytes(r.predicted_bytes)} "
            f"| {format_bytes(r.measured_bytes)} | {r.predicted_bytes / r.measured_bytes:.3f} "
            f"| {r.items_per_s:.1f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """Per budget: auto (memory)'s micro-steps against none's, auto (throughput) against the
    fastest static row."""
    lines = []
    for budget in dict.fromkeys(r.budget for r in rows):
        mine = {r.label: r for r in rows if r.budget == budget}
        static = [mine[p] for p in CANDIDATES if p in mine]
        fastest = max(static, key=lambda r: r.items_per_s)
        memory, speed = mine["auto (memory)"], mine["auto (throughput)"]
        none_steps = mine["none"].micro_steps if "none" in mine else None
        ratio = "" if none_steps is None else f" = {memory.micro_steps / none_steps:.2f} x none's"
        lines.append(
            f"- {format_bytes(parse_memory_size(budget))}: auto (memory) chose {memory.policy}, "
            f"{memory.micro_steps} micro-steps{ratio} ({none_steps}); auto (throughput) chose "
            f"{speed.policy} x {speed.micro_batch_size}, {speed.items_per_s:.1f} items/s = "
            f"{speed.items_per_s / fastest.items_per_s:.3f} x the fastest static row "
            f"({fastest.policy} x {fastest.micro_batch_size}, {fastest.items_per_s:.1f})"
        )
    return lines


def main() -> None:
    parser = argument_parser(__doc__, "a 2-layer model, global batch 16, one budget (CI)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per plan")
    args = parser.parse_args()
    torch.set_num_threads(1)
    smoke = args.smoke
    options, budgets = (SMOKE_OPTIONS, SMOKE_BUDGETS) if smoke else (OPTIONS, BUDGETS)
    share, rounds = (16, 1) if smoke else (128, args.rounds)
    rows = measure(options, budgets, share, rounds)
    note = (
        f"CPU, 1 torch thread, {platform.machine()}, torch {torch.__version__}; tinylm "
        f"{options}, global batch {share}, headroom {HEADROOM:.0%}, AdamW. Predicted peak: the "
        "probe's saved-tensor accounting at the plan's largest micro-batch (model, gradients, "
        "AdamW "
        "state, saved activations, and for a checkpointing policy the largest block's "
        "saved tensors x `recompute_factor`: 1.25 for full, 0.25 for every_2), at least the "
        "optimizer step's peak (model and AdamW's measured temporaries). Measured "
        "peak: every storage allocated during one whole step, live until "
        "freed (a dispatch mode, `LiveBytes`; a view or an in-place update allocates nothing), "
        "plus what was held before it. items/s: samples per "
        f"second of whole steps, this thread's CPU time, best of {rounds} rounds after a warm-up "
        "(noisy on a shared machine: differences under ~5% are noise).\n\n"
        + "\n".join(verdicts(rows))
    )
    publish("checkpointing", table(rows), note, smoke=smoke)


if __name__ == "__main__":
    main()
