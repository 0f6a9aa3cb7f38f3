"""BatchNorm under accumulation: micro-batch size x `batchnorm` policy on `digits-bn`.

Every cell is one `bigbatch.fit` of the `digits-bn` recipe (the digits convnet with BatchNorm2d
after each convolution) at global batch 256, built the way `bigbatch train --set ...` builds it,
with the same seed, steps and learning rate; only micro_batch_size (2, 4, 16, 64, and 256: no
accumulation, the reference) and batchnorm change. Reported:
the final test accuracy and the first optimizer step at which the test accuracy (evaluated every
few steps) reaches 95%. `sync` needs several processes (DDP: NCCL on GPUs, or gloo on CPUs) and
every cell here is one process, so it is not run.

    python benchmarks/batchnorm.py            # writes benchmarks/results/batchnorm.{md,png}
    python benchmarks/batchnorm.py --smoke    # a few steps of 2 cells, prints the table (CI)
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import bigbatch
from bigbatch.recipes.digits import load_datasets
from bigbatch.train.configfile import load_config
from bigbatch.train.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import RESULTS, argument_parser, publish, pyplot, save_figure  # noqa: E402

RECIPE = "digits-bn"
GLOBAL_BATCH_SIZE = 256
MICRO_BATCH_SIZES = (2, 4, 16, 64, 256)
"""256 is the reference: one micro-batch per step, BatchNorm sees the whole global batch."""
POLICIES = ("keep", "freeze", "groupnorm", "window")
TARGET_ACCURACY = 0.95


@dataclass(frozen=True)
class Cell:
    """One run: its settings, the test-accuracy curve [(step, accuracy)], the last step's
    training loss and the run's wall time."""

    micro_batch_size: int
    policy: str
    curve: tuple[tuple[int, float], ...]
    final_train_loss: float
    time_s: float

    @property
    def final_accuracy(self) -> float:
        return self.curve[-1][1]

    @property
    def steps_to_target(self) -> int | None:
        """The first evaluated step with test accuracy >= TARGET_ACCURACY (None: never)."""
        return next((step for step, acc in self.curve if acc >= TARGET_ACCURACY), None)


def run_cell(
    micro_batch_size: int,
    policy: str,
    *,
    steps: int,
    lr: float,
    eval_every: int,
    seed: int,
    out_root: Path,
) -> Cell:
    """Train one cell with `bigbatch.fit` as `bigbatch train --set ...` would; read its evals."""
    overrides = [
        f"recipe={RECIPE}",
        f"global_batch_size={GLOBAL_BATCH_SIZE}",
        f"micro_batch_size={micro_batch_size}",
        f"batchnorm={policy}",
        f"max_steps={steps}",
        f"lr={lr}",
        f"eval_every={eval_every}",
        "checkpoint_every=0",
        f"seed={seed}",
        "device=cpu",
    ]
    config = load_config(None, overrides)
    out_dir = out_root / f"{RECIPE}-micro{micro_batch_size}-{policy}"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-micro-batch warning is the point here
        summary = bigbatch.fit(config, out_dir=out_dir, progress=False)
    time_s = time.perf_counter() - start
    evals = read_metrics(out_dir / "metrics.jsonl", "eval")
    curve = tuple((int(record["step"]), float(record["eval/accuracy"])) for record in evals)
    cell = Cell(micro_batch_size, policy, curve, float(summary.final_loss), time_s)
    reached = cell.steps_to_target
    print(
        f"micro-batch {micro_batch_size:3d} {policy:9s}: test accuracy "
        f"{100 * cell.final_accuracy:.1f}%, 95% at step {'-' if reached is None else reached} "
        f"(train loss {cell.final_train_loss:.4f}, {time_s:.1f} s)",
        flush=True,
    )
    return cell


def table(cells: list[Cell]) -> str:
    """Markdown: one row per micro-batch size, per policy the final accuracy and steps to 95%."""
    policies = list(dict.fromkeys(cell.policy for cell in cells))
    micros = sorted({cell.micro_batch_size for cell in cells})
    by_key = {(cell.micro_batch_size, cell.policy): cell for cell in cells}
    header = ["micro-batch", "accumulation"] + [
        part for policy in policies for part in (f"{policy} acc", f"{policy} steps to 95%")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for micro in micros:
        row = [str(micro), str(GLOBAL_BATCH_SIZE // micro)]
        for policy in policies:
            cell = by_key.get((micro, policy))
            if cell is None:
                row += ["", ""]
                continue
            reached = cell.steps_to_target
            row += [f"{100 * cell.final_accuracy:.1f}%", "-" if reached is None else str(reached)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path) -> None:
    """Test accuracy vs step, one panel per micro-batch size, one line per policy."""
    plt = pyplot()
    micros = sorted({cell.micro_batch_size for cell in cells})
    figure, axes = plt.subplots(
        1, len(micros), figsize=(2.9 * len(micros), 3.1), sharey=True, squeeze=False
    )
    axes = axes[0]
    for axis, micro in zip(axes, micros):
        for cell in (c for c in cells if c.micro_batch_size == micro):
            steps, accuracies = zip(*cell.curve)
            axis.plot(steps, accuracies, marker=".", label=cell.policy)
        axis.axhline(TARGET_ACCURACY, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"micro-batch {micro} (x{GLOBAL_BATCH_SIZE // micro})")
        axis.set_xlabel("optimizer step")
        axis.set_ylim(0.5, 1.0)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(loc="lower right")
    figure.suptitle(f"{RECIPE}, global batch {GLOBAL_BATCH_SIZE}: batchnorm policy", fontsize=10)
    save_figure(figure, path, dpi=110)


def machine() -> str:
    """The CPU model and core count, e.g. "AMD EPYC, 2 cores" (the platform name elsewhere)."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        name = models[0].split(":", 1)[1].strip() if models else name
    return f"{name}, {os.cpu_count()} cores"


def main() -> None:
    parser = argument_parser(__doc__, "a few steps of 2 cells (CI)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per cell")
    parser.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=2, help="steps between test evals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=list(MICRO_BATCH_SIZES))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where batchnorm.{md,png} go"
    )
    args = parser.parse_args()
    # One thread: on a shared 2-core machine two threads per process oversubscribe the cores and
    # small micro-batches run several times slower; the figures compare cells, not threads.
    torch.set_num_threads(1)
    logging.getLogger("bigbatch").setLevel(logging.ERROR)
    micros, policies = tuple(args.micro_batch_sizes), tuple(args.policies)
    steps, eval_every = args.steps, args.eval_every
    if args.smoke:
        micros, policies, steps, eval_every = (64,), ("keep", "groupnorm"), 2, 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bigbatch-bn-") as out_root:
        cells = [
            run_cell(
                micro,
                policy,
                steps=steps,
                lr=args.lr,
                eval_every=eval_every,
                seed=args.seed,
                out_root=Path(out_root),
            )
            for micro in micros
            for policy in policies
        ]
    total_s = time.perf_counter() - start
    text = table(cells)
    num_test = len(load_datasets()[1])  # the recipe's fixed split
    note = (
        f"`{RECIPE}`, global batch {GLOBAL_BATCH_SIZE}, {steps} optimizer steps, AdamW lr "
        f"{args.lr:g}, seed {args.seed}, test accuracy on the {num_test} held-out digits every "
        f"{eval_every} steps; `sync` needs several processes (DDP, on GPUs or over gloo on CPUs) "
        f"and every run here is one process, so it is not run. {len(cells)} runs in "
        f"{total_s:.0f} s on {machine()}, "
        f"{torch.get_num_threads()} thread, torch {torch.__version__}."
    )
    publish(
        "batchnorm",
        text,
        note,
        smoke=args.smoke,
        plot=lambda path: plot(cells, path),
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
