"""Plan quality: the micro-batch `optimize: throughput` chooses vs the best of every feasible one.

For each recipe, `choose_micro_batch_size(optimize="throughput")` picks a micro-batch for a memory
budget (its probe is timed: that is its cost). Then a separate, longer timing pass runs whole
`Accumulator.step`s of the global batch for every distinct feasible plan: micro-batch sizes 1 up to
the largest that fits the budget give ceil(global / micro) micro-batches, and sizes that give the
same count give the same plan (`bigbatch.plan` spreads the items evenly). Target: the chosen plan's
samples/s >= 0.95 of the best; and the probe's cost as a share of a 1,000-step run.

    python benchmarks/plan_quality.py            # writes benchmarks/results/plan_quality.{md,png}
    python benchmarks/plan_quality.py --smoke    # tiny global batch, one round (CI)
"""

from __future__ import annotations

import copy
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import bigbatch
from bigbatch import recipes
from bigbatch.tools.autobatch import choose_micro_batch_size
from bigbatch.units import format_bytes, parse_memory_size

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish, pyplot, save_figure  # noqa: E402

# A budget under the full batch's need, so the memory cap binds (see memory.md for the bytes).
BUDGETS = {"digits": "4MiB", "tinylm": "12MiB"}
HEADROOM = 0.1
RUN_STEPS = 1000


@dataclass(frozen=True)
class Result:
    """The choice, its cost, and the measured throughput of every feasible plan."""

    recipe: str
    global_batch_size: int
    memory_budget: str
    chosen: int
    largest: int
    probe_s: float
    probe_sizes: list[int]
    samples_per_s: dict[int, float]  # by micro-batch size ceil(global / k), best of the rounds
    median_per_s: dict[int, float]  # the same plans, median of the rounds
    head_to_head: float  # chosen / best re-timed against each other only, best of more rounds

    def plan_micro(self, micro: int) -> int:
        """The largest micro-batch of the plan a micro_batch_size gives."""
        return math.ceil(self.global_batch_size / math.ceil(self.global_batch_size / micro))

    @property
    def best(self) -> int:
        return max(self.samples_per_s, key=lambda m: self.samples_per_s[m])

    @property
    def ratio(self) -> float:
        return self.samples_per_s[self.plan_micro(self.chosen)] / self.samples_per_s[self.best]

    @property
    def median_ratio(self) -> float:
        best = max(self.median_per_s.values())
        return self.median_per_s[self.plan_micro(self.chosen)] / best

    @property
    def probe_share(self) -> float:
        step_s = self.global_batch_size / self.samples_per_s[self.plan_micro(self.chosen)]
        return self.probe_s / (self.probe_s + RUN_STEPS * step_s)


def make_batch_fn(recipe: recipes.Recipe) -> Callable[[int], Any]:
    """make_batch(n): the first n training samples, collated as the trainer does."""
    collate = recipe.collate_fn or torch.utils.data.default_collate
    return lambda n: collate([recipe.train_dataset[i] for i in range(n)])


def feasible_plans(global_batch_size: int, largest: int) -> list[int]:
    """One micro-batch size per distinct plan with micro-batches of at most `largest` items."""
    counts = {math.ceil(global_batch_size / micro) for micro in range(1, largest + 1)}
    return sorted(math.ceil(global_batch_size / count) for count in counts)


def time_plans(
    recipe: recipes.Recipe, global_batch_size: int, micros: list[int], rounds: int
) -> tuple[dict[int, float], dict[int, float]]:
    """samples/s of whole `Accumulator.step`s per plan after a warm-up round: (best, median).

    Plans run in a new order each round, so drift spreads. On a shared CPU the best round is the
    least disturbed one; the median mostly measures the other jobs' load.
    """
    samples = [recipe.train_dataset[i] for i in range(global_batch_size)]
    collate = recipe.collate_fn or torch.utils.data.default_collate
    windows = {}
    for micro in micros:
        sizes = bigbatch.plan(global_batch_size, micro_batch_size=micro).micro_batch_sizes(0)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        windows[micro] = [collate(samples[o : o + s]) for o, s in zip(offsets, sizes)]
    model = copy.deepcopy(recipe.model)
    accumulator = bigbatch.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    times: dict[int, list[float]] = {micro: [] for micro in micros}
    order = random.Random(0)
    for round_index in range(rounds + 1):
        for micro in order.sample(micros, len(micros)):
            start = time.perf_counter()
            accumulator.step(windows[micro], recipe.loss_fn)
            if round_index > 0:  # round 0 warms up
                times[micro].append(time.perf_counter() - start)
    best = {micro: global_batch_size / min(t) for micro, t in times.items()}
    median = {micro: global_batch_size / statistics.median(t) for micro, t in times.items()}
    return best, median


def build_recipe(name: str, global_batch_size: int) -> recipes.Recipe:
    """The recipe with only the training samples one global batch uses (tinylm builds fast)."""
    options = {"num_train_samples": global_batch_size, "num_eval_samples": 1}
    return recipes.build(name, {"seed": 0, "recipe_options": options if name == "tinylm" else {}})


def measure(name: str, global_batch_size: int, budget: str, rounds: int) -> Result:
    recipe = build_recipe(name, global_batch_size)
    model = copy.deepcopy(recipe.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    choose = dict(
        max_micro_batch_size=global_batch_size,
        memory_budget_bytes=budget,
        optimizer=optimizer,
        headroom=HEADROOM,
    )
    start = time.perf_counter()
    choice = choose_micro_batch_size(
        model, recipe.loss_fn, make_batch_fn(recipe), optimize="throughput", **choose
    )
    probe_s = time.perf_counter() - start
    largest = choose_micro_batch_size(
        model, recipe.loss_fn, make_batch_fn(recipe), optimize="memory", **choose
    ).micro_batch_size
    micros = feasible_plans(global_batch_size, largest)
    best_per_s, median_per_s = time_plans(recipe, global_batch_size, micros, rounds)
    result = Result(
        name,
        global_batch_size,
        budget,
        choice.micro_batch_size,
        largest,
        probe_s,
        [row.micro_batch_size for row in choice.probe.rows],
        best_per_s,
        median_per_s,
        1.0,
    )
    # The best of ~30 noisy plans is biased upwards (the winner's curse): time the two again.
    pair = sorted({result.plan_micro(result.chosen), result.best})
    again, _ = time_plans(recipe, global_batch_size, pair, 3 * rounds)
    chosen = result.plan_micro(result.chosen)
    return replace(result, head_to_head=again[chosen] / again[result.best])


def table(results: list[Result]) -> str:
    lines = [
        "| recipe | global batch | memory_budget | largest that fits | chosen (throughput) "
        "| best measured | chosen / best | chosen / best, head to head | chosen / best, medians "
        "| probe time | probe share of 1,000 steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        chosen_plan = r.plan_micro(r.chosen)
        budget = format_bytes(parse_memory_size(r.memory_budget))
        lines.append(
            f"| {r.recipe} | {r.global_batch_size} | {budget} "
            f"| {r.largest} | {r.chosen} ({r.samples_per_s[chosen_plan]:.0f}/s) "
            f"| {r.best} ({r.samples_per_s[r.best]:.0f}/s) | {r.ratio:.3f} "
            f"| {r.head_to_head:.3f} | {r.median_ratio:.3f} "
            f"| {r.probe_s:.2f} s | {r.probe_share:.2%} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for axis, r in zip(axes[0], results):
        micros = sorted(r.samples_per_s)
        axis.plot(micros, [r.samples_per_s[m] for m in micros], "o-", color="#36c", ms=3)
        best = r.samples_per_s[r.best]
        axis.axhline(0.95 * best, color="#999", ls="--", lw=1, label="0.95 x best")
        axis.axvline(r.largest, color="#c63", ls=":", lw=1, label="largest that fits")
        chosen = r.plan_micro(r.chosen)
        axis.plot([chosen], [r.samples_per_s[chosen]], "*", color="#c33", ms=14, label="chosen")
        axis.plot([r.best], [best], "o", mfc="none", mec="k", ms=10, label="best measured")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("micro-batch size")
        axis.set_ylabel("samples / s (whole steps)")
        axis.set_title(f"{r.recipe}: global batch {r.global_batch_size}, budget {r.memory_budget}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, path)


def main() -> None:
    parser = argument_parser(__doc__, "tiny global batch, one round (CI)")
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per plan")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (stable timing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global_batch_size, rounds = (16, 1) if args.smoke else (args.global_batch_size, args.rounds)
    budgets = {"digits": "2MiB", "tinylm": "4MiB"} if args.smoke else BUDGETS
    results = [measure(name, global_batch_size, budgets[name], rounds) for name in budgets]
    text = table(results)
    probed = "; ".join(f"{r.recipe} probed {r.probe_sizes}" for r in results)
    note = (
        f"CPU, {args.threads} torch thread(s), {platform.machine()}, torch {torch.__version__}. "
        f"Headroom {HEADROOM:.0%}. 'best measured': the fastest of every distinct feasible plan "
        f"(micro-batch 1 up to the largest that fits), whole AdamW steps, best of {rounds} "
        f"rounds (plans in a new order each round) after a warm-up round; throughput in "
        f"samples/s. 'Head to head': the chosen and the best plan timed again against each "
        f"other only, best of {3 * rounds} rounds. 'Medians': both from the median of the "
        f"{rounds} rounds instead of the best. Probe share = probe time / (probe time + "
        f"{RUN_STEPS:,} steps at the chosen plan). {probed}."
    )
    curves = "\n".join(
        f"- {r.recipe}, samples/s by micro-batch: "
        + ", ".join(f"{m}: {r.samples_per_s[m]:.0f}" for m in sorted(r.samples_per_s))
        for r in results
    )
    note += "\n\n" + curves
    publish("plan_quality", text, note, smoke=args.smoke, plot=lambda path: plot(results, path))


if __name__ == "__main__":
    main()
