"""The run's curves, ``curves.png``: one panel per figure that varies, against optimizer steps.

Drawn from the records of ``metrics.jsonl`` (see `bigbatch.train.metrics`), so any run directory's
curves can be drawn again. The steps axis has integer ticks only (a step is never 2.5); the memory
panel starts at zero, so that a wobble of a MiB in 2 GiB reads as the flat line it is; two series
that are equal at every step (samples and items per second when every sample is one item) are one
line with both names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Series = tuple[list[dict[str, Any]], str, str]
"""One line of a panel: (records, key, label)."""

ZERO_BASED = ("peak memory (MiB)",)
"""Panels whose axis starts at zero: their changes are read against the whole."""


def plot_run(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the run's curves into a PNG; None without matplotlib or without anything to draw."""
    figure = draw_run(metrics)
    if figure is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def draw_run(metrics: list[dict[str, Any]]) -> Any:
    """The run's curves as a matplotlib ``Figure`` (panels: see `plot_panels`); None without
    matplotlib or without anything to draw."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, ScalarFormatter
    except ImportError as error:
        logger.warning("no plot: %s (pip install matplotlib)", error)
        return None
    panels = plot_panels(metrics)
    if not panels:
        return None
    evals = [r for r in metrics if r.get("kind") == "eval"]
    figure = Figure(figsize=(6.4, 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels):
        for records, key, label in series:
            steps, values = _points(records, key)
            marker = "o" if len(steps) <= 30 or records is evals else None
            style = "steps-post" if key.startswith("global_batch") else "default"
            ax.plot(steps, values, label=label, marker=marker, markersize=3, drawstyle=style)
        if title.startswith("batch size"):
            ax.set_yscale("log", base=2)  # batch sizes are mostly powers of two
            ax.yaxis.set_major_formatter(ScalarFormatter())
        if title in ZERO_BASED:
            ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    axes[-1].set_xlabel("step (optimizer steps)")
    return figure


def plot_panels(metrics: list[dict[str, Any]]) -> list[tuple[str, list[Series]]]:
    """The panels `plot_run` draws: (title, [(records, key, label), ...]), present and varying;
    series equal at every step drawn once."""
    train = [_with_memory_in_mib(r) for r in metrics if r.get("kind", "train") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    panels = [
        ("loss", [(train, "loss", "train"), (evals, "eval/loss", "eval")]),
        ("eval accuracy", [(evals, "eval/accuracy", "eval")]),
        ("learning rate", [(train, "lr", "lr"), (train, "learning_rate", "lr")]),
        ("gradient norm", [(train, "grad_norm", "before clipping")]),
        (
            "batch size (samples)",
            [
                (train, "global_batch_size", "global batch size"),
                (train, "critical_batch_samples", "critical batch size (estimate)"),
            ],
        ),
        (
            "throughput (per s)",
            [(train, "samples_per_s", "samples"), (train, "items_per_s", "items")],
        ),
        (
            "batch size (tokens)",
            [
                (train, "global_batch_tokens", "global batch tokens"),
                (train, "critical_batch_tokens", "critical batch size (estimate)"),
            ],
        ),
        ("tokens/s", [(train, "tokens_per_s", "tokens/s")]),
        ("padding fraction", [(train, "padding_fraction", "padding")]),
        ("peak memory (MiB)", [(train, "peak_memory_mib", "peak memory")]),
    ]
    panels = [(title, _once([s for s in series if _points(*s[:2])[0]])) for title, series in panels]
    return [panel for panel in panels if panel[1] and not _constant(panel[1])]


def _once(series: list[Series]) -> list[Series]:
    """The series with any that equals an earlier one at every step merged into it: one line,
    labelled with both names ("samples = items")."""
    kept: list[Series] = []
    for records, key, label in series:
        points = _points(records, key)
        same = next((i for i, s in enumerate(kept) if _points(*s[:2]) == points), None)
        if same is None:
            kept.append((records, key, label))
        else:
            merged = kept[same][2] if kept[same][2] == label else f"{kept[same][2]} = {label}"
            kept[same] = (*kept[same][:2], merged)
    return kept


def _with_memory_in_mib(record: dict[str, Any]) -> dict[str, Any]:
    memory = record.get("peak_memory_bytes")
    return record if memory is None else {**record, "peak_memory_mib": memory / 2**20}


def _constant(series: list[Series]) -> bool:
    """True when every value of every series of a panel is the same."""
    values = {value for records, key, _ in series for value in _points(records, key)[1]}
    return len(values) <= 1


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The (step, value) pairs of one series, skipping steps where it is missing or null."""
    pairs = [(int(r["step"]), float(r[key])) for r in records if r.get(key) is not None]
    return [step for step, _ in pairs], [value for _, value in pairs]
