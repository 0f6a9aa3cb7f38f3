"""What the benchmark scripts share: publishing their table and drawing their plot, and the
gradient an optimizer step applied (the scripts that compare accumulation loops).

Each script measures something, formats a markdown table (and usually a note on how it was
measured), and hands both to `publish`: printed always; unless --smoke, also written to
results/<name>.md, with the plot drawn into results/<name>.png. Plots draw with `pyplot()` and
end with `save_figure`; `argument_parser` starts each script's command line with its --smoke.

The scripts run as `python benchmarks/<name>.py`, which puts this folder on sys.path; the tests
load some of them by file path instead, so each script puts its own folder there first:

    sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
    from common import argument_parser, publish, pyplot, save_figure  # noqa: E402
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

RESULTS = Path(__file__).parent / "results"
"""benchmarks/results/: the committed tables and plots."""


def join_as_rank(rank: int, world_size: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world_size`` on localhost:``port`` (the
    environment torch.distributed reads), with one torch thread, as the scripts measure."""
    import os

    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def applied_gradient(
    step: Callable[[torch.nn.Module, torch.optim.Optimizer], None], model: torch.nn.Module
) -> torch.Tensor:
    """One optimizer step with SGD(lr=1) on a copy of ``model``: the gradient it applied is
    before - after, whatever the loop did to scale or accumulate it."""
    import copy

    import torch

    model = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step(model, torch.optim.SGD(model.parameters(), lr=1.0))
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def argument_parser(
    description: str | None, smoke_help: str | None = None
) -> argparse.ArgumentParser:
    """A parser whose --help shows `description` (the script's docstring) as written, with the
    `--smoke` flag every script has: tiny sizes that run each code path and write nothing."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser


def publish(
    name: str,
    table: str,
    note: str | None = None,
    *,
    smoke: bool,
    plot: Callable[[Path], None] | None = None,
    results_dir: Path = RESULTS,
) -> None:
    """Print `table` and `note` (a blank line between); unless `smoke`, keep them and the plot.

    Kept means `results_dir/<name>.md` holds the printed text plus a final newline and, given
    `plot`, `plot(results_dir / "<name>.png")` draws the figure. A smoke run writes nothing.
    """
    text = table if note is None else f"{table}\n\n{note}"
    print(text)
    if smoke:
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(text + "\n")
    if plot is not None:
        plot(results_dir / f"{name}.png")


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (files only, no display needed).

    Imported only when a plot is drawn: runs that draw nothing never load matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Figure, path: Path, dpi: int = 120) -> None:
    """Lay `figure` out tightly, write it to `path` at `dpi` and close it (pyplot keeps it open)."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
