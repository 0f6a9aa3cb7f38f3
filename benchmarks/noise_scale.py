"""Gradient noise scale: items and steps to a target eval loss, and what measuring costs.

For `digits` and a small `tinylm`, three `bigbatch.fit` runs each, built the way `bigbatch train
--set ...` builds them: a fixed small global batch, a fixed large one, and `batch_size_schedule:
adaptive` bounded by the two. All measure the noise scale (`noise_scale: true`), so every run
draws its critical batch; the table gives the samples, loss items and optimizer steps each needed
to reach a target eval loss. Then the measuring overhead: interleaved `Accumulator.step`s with
`measure_noise_scale` on vs off on identical models, median per-pair time ratio (target <= 1.03
at micro-batch >= 16).

    python benchmarks/noise_scale.py            # writes benchmarks/results/noise_scale.{md,png}
    python benchmarks/noise_scale.py --smoke    # a few steps of each code path, prints (CI)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bigbatch
from bigbatch import recipes
from bigbatch.core import batches
from bigbatch.tools.bench import loss_fn as mlp_loss_fn
from bigbatch.tools.bench import mlp
from bigbatch.train.metrics import read_metrics

try:  # the config loading functions moved from config.py to configfile.py
    from bigbatch.train.configfile import load_config
except ImportError:  # pragma: no cover - an older tree
    from bigbatch.train.config import load_config  # type: ignore[attr-defined,no-redef]

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

ARMS = ("small", "large", "adaptive")
OVERHEAD_TARGET = 1.03


@dataclass(frozen=True)
class Task:
    """One recipe's three runs: sizes, lengths, the target and how often to evaluate.

    Attributes:
        recipe: the recipe name.
        overrides: `--set` strings shared by the three runs (recipe_options, lr, ...).
        micro_batch_size: the micro-batch of every run (the adaptive one changes accumulation).
        small: the fixed small global batch (also the adaptive run's start and minimum).
        large: the fixed large global batch (also the adaptive run's maximum).
        epochs: the length of each run, by arm.
        target_loss: the eval loss every run should reach.
        eval_samples: about how many samples between evaluations (sets eval_every per arm).
        warmup_samples: the learning-rate warm-up, the same in samples for every arm.
    """

    recipe: str
    overrides: tuple[str, ...]
    micro_batch_size: int
    small: int
    large: int
    epochs: dict[str, int]
    target_loss: float
    eval_samples: int
    warmup_samples: int = 0

    def eval_every(self, arm: str) -> int:
        """Steps between evaluations: about eval_samples (adaptive: at its smallest batch x 2)."""
        batch = {"small": self.small, "large": self.large}.get(arm, 2 * self.small)
        return max(1, round(self.eval_samples / batch))


TINYLM_OPTIONS = (
    "recipe_options={max_digits: 2, num_train_samples: 4000, num_eval_samples: 300, d_model: 32}"
)
TASKS = (
    Task(
        "digits",
        ("lr=0.003",),
        micro_batch_size=16,
        small=32,
        large=512,
        epochs={"small": 5, "large": 20, "adaptive": 8},
        target_loss=0.2,
        eval_samples=160,
    ),
    Task(
        "tinylm",
        (TINYLM_OPTIONS, "lr=0.002", "max_grad_norm=1.0"),
        micro_batch_size=16,
        small=32,
        large=512,
        epochs={"small": 2, "large": 10, "adaptive": 4},
        target_loss=1.3,
        eval_samples=320,
        warmup_samples=960,
    ),
)
SMOKE_TASKS = (
    Task(
        "digits",
        ("lr=0.003",),
        micro_batch_size=64,
        small=128,
        large=256,
        epochs={"small": 1, "large": 1, "adaptive": 1},
        target_loss=3.0,
        eval_samples=512,
    ),
    Task(
        "tinylm",
        (
            "recipe_options={max_digits: 1, num_train_samples: 96, num_eval_samples: 16, "
            "d_model: 8, num_layers: 1, num_heads: 2}",
        ),
        micro_batch_size=8,
        small=16,
        large=32,
        epochs={"small": 1, "large": 1, "adaptive": 1},
        target_loss=5.0,
        eval_samples=32,
    ),
)


@dataclass(frozen=True)
class ArmResult:
    """One run's per-step records, its evaluations, and when it first reached the target.

    Attributes:
        task: the task's recipe name.
        arm: "small", "large" or "adaptive".
        train: metrics.jsonl's train records, each with cumulative "samples_seen", "items_seen".
        evals: (step, samples seen, eval loss) after each evaluation.
        target_loss: the task's target.
        time_s: wall time of the whole fit.
    """

    task: str
    arm: str
    train: list[dict[str, Any]]
    evals: list[tuple[int, int, float]]
    target_loss: float
    time_s: float

    @property
    def reached(self) -> dict[str, Any] | None:
        """The train record of the first evaluated step at or below the target (None: never)."""
        step = next((s for s, _, loss in self.evals if loss <= self.target_loss), None)
        return None if step is None else self.train[step - 1]

    @property
    def items_per_sample(self) -> float:
        """Loss items per sample over the run (1 for digits, answer tokens for tinylm)."""
        return self.train[-1]["items_seen"] / max(1, self.train[-1]["samples_seen"])

    @property
    def final_global_batch_size(self) -> int:
        return int(self.train[-1]["global_batch_size"])


def build_config(task: Task, arm: str, *, smoothing_steps: int = 50, adapt_every: int = 10) -> Any:
    """The run's Config from `--set` strings, as the CLI builds it (recipe defaults come in fit)."""
    size = {"small": task.small, "large": task.large, "adaptive": task.small}[arm]
    overrides = [
        f"recipe={task.recipe}",
        *task.overrides,
        f"global_batch_size={size}",
        f"micro_batch_size={task.micro_batch_size}",
        f"epochs={task.epochs[arm]}",
        f"warmup_steps={math.ceil(task.warmup_samples / size)}",
        # Adam: sqrt scaling from the small batch, the same rule for every arm
        "lr_scaling.rule=sqrt",
        f"lr_scaling.base_batch_size={task.small}",
        "noise_scale=true",
        f"noise_smoothing_steps={smoothing_steps}",
        f"eval_every={task.eval_every(arm)}",
        "checkpoint_every=0",
        "device=cpu",
        "seed=0",
    ]
    if arm == "adaptive":
        overrides += [
            "batch_size_schedule=adaptive",
            f"min_global_batch_size={task.small}",
            f"max_global_batch_size={task.large}",
            f"adapt_every={adapt_every}",
        ]
    return load_config(None, overrides)


def run_arm(task: Task, arm: str, out_root: Path, **settings: int) -> ArmResult:
    """One `bigbatch.fit` (progress bar off) and its metrics.jsonl."""
    out_dir = out_root / f"{task.recipe}-{arm}"
    start = time.perf_counter()
    bigbatch.fit(build_config(task, arm, **settings), out_dir=out_dir, progress=False)
    time_s = time.perf_counter() - start
    records = read_metrics(out_dir / "metrics.jsonl")
    train, evals, samples, items = [], [], 0, 0
    for record in records:
        if record.get("kind", "train") == "train":
            samples += int(record["num_samples"])
            items += int(record["num_items"])
            train.append({**record, "samples_seen": samples, "items_seen": items})
        elif record["step"] <= len(train):  # the last evaluation may repeat the last step
            evals.append((int(record["step"]), samples, float(record["eval/loss"])))
    return ArmResult(task.recipe, arm, train, evals, task.target_loss, time_s)


def implied_noise_scale(small: ArmResult, large: ArmResult) -> float | None:
    """B_noise (in samples) from the steps to target at two fixed batches, by the paper's model.

    S(B) = S_min (1 + B_noise / B) at two batches B1 < B2 gives
    B_noise = (S1 - S2) / (S2 / B1 - S1 / B2). None when either missed the target or the
    model does not fit (a non-positive result).
    """
    first, second = small.reached, large.reached
    if first is None or second is None:
        return None
    s1, s2 = first["step"], second["step"]
    b1, b2 = small.train[0]["global_batch_size"], large.train[0]["global_batch_size"]
    denominator = s2 / b1 - s1 / b2
    value = (s1 - s2) / denominator if denominator else math.nan
    return value if value > 0 else None


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def results_table(arms: Sequence[ArmResult]) -> str:
    """Samples, items and steps to the target, the global batch, and the critical batch there."""
    lines = [
        "| task | global batch | target eval loss | samples to target | items to target "
        "| steps to target | B_crit at target (items) | run: steps, final eval loss, time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for arm in arms:
        first = arm.train[0]["global_batch_size"]
        batch = (
            f"adaptive {first} -> {arm.final_global_batch_size}"
            if arm.arm == "adaptive"
            else f"{arm.arm} {first}"
        )
        reached = arm.reached
        if reached is None:
            to_target = ["not reached"] * 3 + ["-"]
        else:
            to_target = [
                f"{reached['samples_seen']:,}",
                f"{reached['items_seen']:,}",
                str(reached["step"]),
                _cell(reached.get("critical_batch_size")),
            ]
        final = arm.evals[-1][2] if arm.evals else math.nan
        lines.append(
            f"| {arm.task} | {batch} | {arm.target_loss:g} | {' | '.join(to_target)} "
            f"| {len(arm.train)}, {final:.3f}, {arm.time_s:.0f} s |"
        )
    return "\n".join(lines)


def adaptive_stages(arm: ArmResult) -> str:
    """The global batch from each step on where it changed, e.g. "32 (step 0), 96 (step 20)"."""
    stages, current = [], None
    for index, record in enumerate(arm.train):
        size = record["global_batch_size"]
        if size != current:
            stages.append(f"{size} (step {index})")
            current = size
    return ", ".join(stages)


def model_check(arms: Sequence[ArmResult]) -> str:
    """Per task: B_noise implied by the two fixed runs' steps vs the measured critical batch."""
    lines = []
    for task in dict.fromkeys(arm.task for arm in arms):
        by_arm = {arm.arm: arm for arm in arms if arm.task == task}
        implied = implied_noise_scale(by_arm["small"], by_arm["large"])
        reached = by_arm["small"].reached
        measured = None if reached is None else reached.get("critical_batch_size")
        per_sample = by_arm["small"].items_per_sample
        stages = adaptive_stages(by_arm["adaptive"])
        lines.append(
            f"- {task}: the adaptive run's global batch (samples) by step: {stages}; "
            f"{per_sample:.2f} loss items per sample; steps to target at the two "
            f"fixed batches imply B_noise = {_cell(implied)} samples "
            f"({_cell(None if implied is None else implied * per_sample)} items) by "
            f"S = S_min (1 + B_noise / B); measured B_crit at the small run's target: "
            f"{_cell(measured)} items ({_cell(None if measured is None else measured / per_sample)}"
            " samples)."
        )
    return "\n".join(lines)


# -- overhead --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadRow:
    """Median step times with the noise scale off and on, and the median per-pair ratio."""

    model: str
    num_parameters: int
    num_tensors: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    pairs: int
    off_s: float
    on_s: float
    ratio: float


def time_overhead(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], Any],
    window: list[Any],
    *,
    pairs: int,
    warmup: int,
) -> OverheadRow:
    """Interleaved `Accumulator.step`s, measuring off and on, alternating which goes first."""
    model_off, model_on = copy.deepcopy(model), copy.deepcopy(model)
    accumulators = {
        measure: bigbatch.Accumulator(
            copy_, torch.optim.AdamW(copy_.parameters(), lr=1e-4), measure_noise_scale=measure
        )
        for measure, copy_ in ((False, model_off), (True, model_on))
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    for index in range(warmup + pairs):
        for measure in (False, True) if index % 2 == 0 else (True, False):
            start = time.perf_counter()
            accumulators[measure].step(window, loss_fn)
            if index >= warmup:
                times[measure].append(time.perf_counter() - start)
    parameters = [p for p in model.parameters() if p.requires_grad]
    return OverheadRow(
        model=name,
        num_parameters=sum(p.numel() for p in parameters),
        num_tensors=len(parameters),
        micro_batch_size=int(batches.num_rows(window[0])),
        gradient_accumulation_steps=len(window),
        pairs=pairs,
        off_s=statistics.median(times[False]),
        on_s=statistics.median(times[True]),
        ratio=statistics.median(on / off for on, off in zip(times[True], times[False])),
    )


def measure_overheads(*, smoke: bool) -> list[OverheadRow]:
    """The recipes' models at micro-batch 16 and 64, and bench's 4M-parameter MLP, k = 4."""
    pairs, warmup, accumulation = (2, 1, 2) if smoke else (60, 5, 4)
    rows = []
    for recipe_name, micros in (("digits", (16, 64)), ("tinylm", (16, 64))):
        recipe = recipes.build(recipe_name, {"seed": 0})
        collate = recipe.collate_fn or torch.utils.data.default_collate
        dataset = recipe.train_dataset
        for micro in micros[:1] if smoke else micros:
            window = [
                collate([dataset[i * micro + j] for j in range(micro)]) for i in range(accumulation)
            ]
            rows.append(
                time_overhead(
                    recipe_name, recipe.model, recipe.loss_fn, window, pairs=pairs, warmup=warmup
                )
            )
    if not smoke:
        generator = torch.Generator().manual_seed(0)
        window = [
            (torch.randn(32, 1024, generator=generator), torch.randint(0, 10, (32,)))
            for _ in range(accumulation)
        ]
        rows.append(time_overhead("MLP", mlp(), mlp_loss_fn, window, pairs=25, warmup=3))
    return rows


def overhead_table(rows: Sequence[OverheadRow]) -> str:
    """A Markdown table of the overhead rows."""
    lines = [
        "| model | params (tensors) | micro x k | step, off | step, on | median ratio on/off |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        mark = "" if row.ratio <= OVERHEAD_TARGET else " (above target)"
        lines.append(
            f"| {row.model} | {row.num_parameters / 1e3:,.0f}k ({row.num_tensors}) "
            f"| {row.micro_batch_size} x {row.gradient_accumulation_steps} "
            f"| {row.off_s * 1e3:.1f} ms | {row.on_s * 1e3:.1f} ms | {row.ratio:.3f}{mark} |"
        )
    return "\n".join(lines)


# -- plot --------------------------------------------------------------------------------------


def plot(arms: Sequence[ArmResult], path: Path) -> None:
    """Per task: eval loss vs samples (with the target), and critical vs global batch in items."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(arm.task for arm in arms))
    figure = Figure(figsize=(6.0 * len(tasks), 7.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(tasks), squeeze=False, sharex="col")
    colours = {"small": "tab:blue", "large": "tab:orange", "adaptive": "tab:green"}
    for column, task in enumerate(tasks):
        loss_ax, batch_ax = axes[0][column], axes[1][column]
        for arm in (arm for arm in arms if arm.task == task):
            colour, label = colours[arm.arm], f"{arm.arm} ({arm.train[0]['global_batch_size']})"
            loss_ax.plot(
                [s for _, s, _ in arm.evals], [v for *_, v in arm.evals], color=colour, label=label
            )
            seen, per_sample = [r["samples_seen"] for r in arm.train], arm.items_per_sample
            batch_ax.plot(
                seen,
                [r["global_batch_size"] * per_sample for r in arm.train],
                color=colour,
                drawstyle="steps-post",
                alpha=0.5,
                linewidth=1,
            )
            points = [
                (r["samples_seen"], r["critical_batch_size"])
                for r in arm.train
                if r.get("critical_batch_size")
            ]
            batch_ax.plot(*zip(*points), color=colour, linestyle="--", label=f"{label} B_crit")
            if arm.reached is not None:
                loss_ax.plot(arm.reached["samples_seen"], arm.target_loss, "o", color=colour)
        loss_ax.axhline(_target(arms, task), color="grey")
        loss_ax.set_title(f"{task}: eval loss (grey: target)")
        loss_ax.set_yscale("log")
        loss_ax.legend(fontsize="small")
        batch_ax.set_title(f"{task}: global batch (solid), measured B_crit (dashed), items")
        batch_ax.set_yscale("log", base=2)
        batch_ax.set_xlabel("samples seen")
        batch_ax.legend(fontsize="small")
        for ax in (loss_ax, batch_ax):
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _target(arms: Sequence[ArmResult], task: str) -> float:
    return next(arm.target_loss for arm in arms if arm.task == task)


def machine() -> str:
    """Processor, cores, load, threads and torch version, for the record next to the figures."""
    processor = platform.processor() or platform.machine()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{processor}, {os.cpu_count()} cores (load average {load} at the start), "
        f"{torch.get_num_threads()} torch thread, torch {torch.__version__}"
    )


def main() -> None:
    parser = argument_parser(__doc__, "a few steps of each path (CI)")
    parser.add_argument("--skip-overhead", action="store_true", help="training runs only")
    parser.add_argument(
        "--smoothing-steps", type=int, default=50, help="noise_smoothing_steps of every run"
    )
    parser.add_argument("--adapt-every", type=int, default=10, help="adaptive: adapt_every")
    args = parser.parse_args()
    # One thread: on the shared 2-core machine two threads per process oversubscribe the cores
    # and these small models ran about 5x slower; the figures compare runs, not threads.
    torch.set_num_threads(1)
    logging.getLogger("bigbatch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)  # early warnings, small BatchNorm...
    where = machine()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bigbatch-noise-") as out_root:
        tasks = SMOKE_TASKS if args.smoke else TASKS
        settings = {"smoothing_steps": args.smoothing_steps, "adapt_every": args.adapt_every}
        arms = [run_arm(task, arm, Path(out_root), **settings) for task in tasks for arm in ARMS]
        if args.smoke:  # the plot's code path, thrown away with the directory
            plot(arms, Path(out_root) / "noise_scale.png")
    train_s = time.perf_counter() - start
    rows = [] if args.skip_overhead else measure_overheads(smoke=args.smoke)
    total_s = time.perf_counter() - start
    text = "\n\n".join(
        [
            "## Items and steps to a target eval loss",
            results_table(arms),
            model_check(arms),
            "## Measuring overhead",
            overhead_table(rows),
            f"{len(arms)} runs in {train_s:.0f} s, {total_s:.0f} s in all, on {where}.",
        ]
    )
    publish("noise_scale", text, smoke=args.smoke, plot=lambda path: plot(arms, path))


if __name__ == "__main__":
    main()
