"""Step time with the model compiled (torch.compile, inductor on CPU) against eager.

digits through `bigbatch.Accumulator`, global batch 256 in micro-batches of 16 and of 24 (the
last micro-batch uneven: 16 rows), the model compiled with
`bigbatch.core.compilation.compile_model`.
The table gives the compile time (the warm-up steps), the median step time after it, and the
graphs compiled after warm-up (0: no recompile for an uneven micro-batch).

    python benchmarks/compile.py            # writes benchmarks/results/compile.md
    python benchmarks/compile.py --smoke    # aot_eager, two steps, prints the table only (CI)
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bigbatch
from bigbatch import recipes
from bigbatch.core.compilation import compile_model

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402


class Counted:
    """A torch.compile backend that counts the graphs it compiles."""

    def __init__(self, backend: str) -> None:
        self.backend, self.graphs = backend, 0

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(graph, inputs)


def windows(recipe: recipes.Recipe, global_batch_size: int, micro: int) -> list[Any]:
    samples = [recipe.train_dataset[i] for i in range(global_batch_size)]
    return [
        torch.utils.data.default_collate(samples[start : start + micro])
        for start in range(0, global_batch_size, micro)
    ]


def run(backend: str | None, micro: int, global_batch_size: int, steps: int) -> dict[str, float]:
    """Warm-up steps (one per micro-batch layout), then `steps` timed ones."""
    torch._dynamo.reset()
    recipe = recipes.build("digits", {"seed": 0, "recipe_options": {}})
    model = recipe.model
    counted = Counted(backend) if backend else None
    if counted is not None:
        compile_model(model, backend=counted)
    accumulator = bigbatch.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    window = windows(recipe, global_batch_size, micro)
    start = time.perf_counter()
    accumulator.step(window, recipe.loss_fn)  # compiles
    warm_up_s = time.perf_counter() - start
    graphs = counted.graphs if counted else 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        accumulator.step(window, recipe.loss_fn)
        times.append(time.perf_counter() - start)
    return {
        "warm_up_s": warm_up_s,
        "step_s": statistics.median(times),
        "recompiles": (counted.graphs if counted else 0) - graphs,
    }


def main() -> None:
    parser = argument_parser(__doc__, "aot_eager, 2 steps of 40 samples, prints the table only")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    backend, global_batch_size, steps = (
        ("aot_eager", 40, 2) if args.smoke else ("inductor", 256, args.steps)
    )
    lines = [
        "| micro-batches | model | warm-up step | step (median) | vs eager "
        "| graphs after warm-up |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for micro in (16, 24):
        sizes = f"{micro} x {global_batch_size // micro}" + (
            f" + {global_batch_size % micro}" if global_batch_size % micro else ""
        )
        eager = run(None, micro, global_batch_size, steps)
        compiled = run(backend, micro, global_batch_size, steps)
        for name, row in (("eager", eager), (backend, compiled)):
            lines.append(
                f"| {sizes} | {name} | {row['warm_up_s']:.2f} s | {row['step_s'] * 1e3:.1f} ms "
                f"| {row['step_s'] / eager['step_s']:.2f} | {row['recompiles']:.0f} |"
            )
    note = (
        f"digits (about 90k parameters), AdamW, global batch {global_batch_size}; median of "
        f"{steps} steps after one warm-up step; 1 torch thread; {platform.machine()}, torch "
        f"{torch.__version__}. The machine was shared with other jobs: step times are noisy."
    )
    publish("compile", "\n".join(lines), note, smoke=args.smoke)


if __name__ == "__main__":
    main()
