"""What a run leaves behind when it ends: ``report.md``, the curves and the closing summary.

Everything is computed from the records of ``metrics.jsonl`` (see `bigbatch.train.metrics`), so a
report can be rebuilt from any run directory; steps are optimizer steps (docs/design.md, invariant
4). Only rank 0 calls these.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.core import distributed
from bigbatch.train.state import RunSummary
from bigbatch.units import format_bytes, format_number

logger = logging.getLogger(__name__)


REPORT_FILE = "report.md"


def summarize_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The end-of-run figures found in the records: final losses, accuracy, speed, memory.

    Keys (only those found): ``steps``, ``final_loss``, ``final_eval_loss``,
    ``final_eval_accuracy``, ``samples_per_s`` (mean over steps after the first, which pays for
    warm-up), ``items_per_s``, ``tokens_per_s`` and ``padding_fraction`` (runs in tokens),
    ``peak_memory_bytes`` (max) and ``skipped_steps``.
    """
    train = [r for r in metrics if r.get("kind", "train") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    summary: dict[str, Any] = {}
    if train:
        summary["steps"] = max(int(r["step"]) for r in train)
        losses = [r["loss"] for r in train if r.get("loss") is not None]
        if losses:
            summary["final_loss"] = losses[-1]
    for key, target in (("eval/loss", "final_eval_loss"), ("eval/accuracy", "final_eval_accuracy")):
        values = [r[key] for r in evals if r.get(key) is not None]
        if values:
            summary[target] = values[-1]
    for key in ("samples_per_s", "items_per_s", "tokens_per_s"):
        values = [r[key] for r in train[1:] or train if r.get(key) is not None]
        if values:
            summary[key] = sum(values) / len(values)
    padded = sum(r.get("num_padded_tokens") or 0 for r in train)
    if padded:  # a run in tokens: the padding of all its micro-batches together
        summary["padding_fraction"] = 1.0 - sum(r.get("num_tokens") or 0 for r in train) / padded
    memory = [r["peak_memory_bytes"] for r in train if r.get("peak_memory_bytes") is not None]
    if memory:
        summary["peak_memory_bytes"] = max(memory)
    if any("skipped_steps" in r for r in train):
        summary["skipped_steps"] = max(int(r.get("skipped_steps") or 0) for r in train)
    elif any("skipped" in r for r in train):
        summary["skipped_steps"] = sum(bool(r.get("skipped")) for r in train)
    return summary


def whole_run(summary: RunSummary, metrics: list[dict[str, Any]]) -> RunSummary:
    """A resumed run's summary with figures over every session, from its ``metrics.jsonl``.

    Speed is the samples (items) of every step over the time of every step, as for a run that
    never stopped; the final loss, the last evaluation and the peak memory come from the records
    when this session has none of its own.
    """
    train = [r for r in metrics if r.get("kind", "train") == "train"]
    time_s = sum(float(r.get("step_time_s") or 0.0) for r in train)
    changes: dict[str, Any] = {}
    if train and time_s > 0:
        changes["samples_per_s"] = sum(int(r.get("num_samples") or 0) for r in train) / time_s
        changes["items_per_s"] = sum(int(r.get("num_items") or 0) for r in train) / time_s
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    if summary.final_loss is None and losses:
        changes["final_loss"] = losses[-1]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    if not summary.eval_metrics and evals:
        last = evals[-1]
        changes["eval_metrics"] = {
            key.removeprefix("eval/"): value
            for key, value in last.items()
            if key.startswith("eval/")
        }
    memory = [int(r["peak_memory_bytes"]) for r in train if r.get("peak_memory_bytes") is not None]
    changes["peak_memory_bytes"] = max([summary.peak_memory_bytes, *memory])
    return dataclasses.replace(summary, **changes)


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    metrics: list[dict[str, Any]],
    plot: Path | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> Path:
    """Write ``run_dir/report.md``: what ran, where, when, the figures, sections and the plot.

    Figures missing from ``summary`` are taken from ``metrics`` (see `summarize_metrics`).
    ``summary["plan"]`` is ``Plan.to_dict()`` or text; ``summary["sections"]`` maps titles to
    markdown that other features add. Other scalar entries of ``summary`` are listed too. With
    ``config`` the report states its seed and the whole resolved config; it always states the
    date, the library versions and, when given, the device.
    """
    merged = {**summarize_metrics(metrics), **provenance(config, device), **summary}
    rows = [
        (label, _format_value(key, merged[key])) for key, label in _REPORT_ROWS if key in merged
    ]
    known = {key for key, _ in _REPORT_ROWS} | {"plan", "sections"}
    for key, value in merged.items():
        if key not in known and isinstance(value, str | int | float | bool):
            rows.append((key, _format_value(key, value)))
    lines = ["# bigbatch run report", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    if "plan" in merged:
        lines += ["", "## Plan", "", "```", _format_plan(merged["plan"]), "```"]
    if plot is not None:
        target = os.path.relpath(Path(plot), Path(run_dir))
        lines += ["", "## Curves", "", f"![training curves]({Path(target).as_posix()})"]
    for title, text in dict(merged.get("sections") or {}).items():
        lines += ["", f"## {title}", "", str(text).strip()]
    if config is not None:
        import yaml

        text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)
        lines += ["", "## Config", "", "```yaml", text.strip(), "```"]
    path = Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def format_summary(summary: Mapping[str, Any]) -> str:
    """The few lines the CLI prints when a run ends.

    >>> print(format_summary({"steps": 100, "final_loss": 0.5, "samples_per_s": 1234.4}))
    done: 100 steps, loss 0.5, 1,234 samples/s
    """
    figures = [f"{summary['steps']} steps" if "steps" in summary else None]
    for key, label in (("final_loss", "loss"), ("final_eval_loss", "eval loss")):
        if summary.get(key) is not None:
            figures.append(f"{label} {format_number(summary[key])}")
    labels = dict(_REPORT_ROWS)
    for key in (
        "final_eval_accuracy",
        "samples_per_s",
        "tokens_per_s",
        "padding_fraction",
        "peak_memory_bytes",
        "skipped_steps",
    ):
        if summary.get(key) is not None:
            label = labels[key].removeprefix("final ")
            figures.append(f"{_format_value(key, summary[key])} {label}")
    lines = ["done: " + ", ".join(f for f in figures if f)]
    unit = "tokens" if summary.get("critical_batch_tokens") is not None else "samples"
    critical = summary.get(f"critical_batch_{unit}", summary.get("critical_batch_size"))
    if critical is not None:
        global_batch = summary.get("final_global_batch_size", summary.get("global_batch_size"))
        if unit == "tokens":
            global_batch = summary.get(
                "final_global_batch_size", summary.get("global_batch_tokens")
            )
        lines.append(
            f"critical batch size: about {float(critical):.0f} {unit} (global batch "
            f"{global_batch}); see the report for what it means for this run"
        )
    for key in ("report", "run_dir"):
        if summary.get(key):
            lines.append(f"{key.replace('_', ' ')}: {summary[key]}")
    return "\n".join(lines)


def provenance(config: Mapping[str, Any] | None, device: str | None) -> dict[str, Any]:
    """When, where and with what a run ran: date (UTC), device, seed and library versions."""
    import datetime
    import importlib.metadata
    import platform

    import torch

    # The version's one home is pyproject.toml; the installed package's metadata carries it.
    try:
        version = importlib.metadata.version("bigbatch")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, never installed
        version = "(not installed)"
    versions = f"bigbatch {version}, torch {torch.__version__}, python {platform.python_version()}"
    found: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "versions": versions,
    }
    if device is not None:
        found["device"] = device
    if config is not None and "seed" in config:
        found["seed"] = config["seed"]
    return found


_REPORT_ROWS = (
    ("recipe", "recipe"),
    ("steps", "steps"),
    ("final_loss", "final train loss"),
    ("final_eval_loss", "final eval loss"),
    ("final_eval_accuracy", "final eval accuracy"),
    ("global_batch_size", "global batch size"),
    ("global_batch_tokens", "global batch tokens"),
    ("samples_per_s", "samples/s"),
    ("items_per_s", "items/s"),
    ("tokens_per_s", "tokens/s"),
    ("padding_fraction", "padding"),
    ("peak_memory_bytes", "peak memory"),
    ("skipped_steps", "skipped steps"),
    ("wall_time_s", "wall time"),
    ("seed", "seed"),
    ("device", "device"),
    ("versions", "versions"),
    ("date", "date"),
)


def _format_value(key: str, value: Any) -> str:
    """A figure as a person reads it: bytes in GiB, rates with separators, accuracy in percent."""
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        return format_bytes(value)
    if (key.endswith("accuracy") or key == "padding_fraction") and isinstance(value, float):
        return f"{100 * value:.2f}%"
    if key.endswith("_per_s"):
        return f"{value:,.0f}"
    if key == "wall_time_s":
        minutes, seconds = divmod(float(value), 60)
        return f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    return format_number(value) if isinstance(value, float) else str(value)


def _format_plan(plan: Any) -> str:
    """``Plan.to_dict()`` as ``key: value`` lines, or the plan's text as given."""
    if isinstance(plan, Mapping):
        return "\n".join(f"{key}: {value}" for key, value in plan.items())
    return str(plan)


def noise_scale_summary(
    critical_batch_size: float | None,
    global_batch_size: int,
    items_per_sample: float,
    *,
    adaptive: bool,
    unit: str = "samples",
) -> dict[str, Any]:
    """The run summary's noise-scale entries: the estimate and the advice as a report section.

    ``unit`` is the global batch's ("samples", or "tokens" for a run in tokens, where
    items_per_sample is then loss items per token).
    """
    critical_samples = (
        None if critical_batch_size is None else critical_batch_size / items_per_sample
    )
    advice = noise_scale_advice(
        global_batch_size,
        critical_samples,
        adaptive=adaptive,
        items_per_sample=items_per_sample,
        unit=unit,
    )
    if distributed.is_main_process():
        logger.info("gradient noise scale: %s", " ".join(advice.split()))
    summary: dict[str, Any] = {
        "critical_batch_size": critical_batch_size,
        f"critical_batch_{unit}": critical_samples,
        "sections": {"Gradient noise scale": advice},
    }
    if adaptive:
        summary["final_global_batch_size"] = global_batch_size
    return summary


def noise_scale_advice(
    global_batch_size: int,
    critical_batch_size: float | None,
    *,
    adaptive: bool = False,
    items_per_sample: float = 1.0,
    unit: str = "samples",
) -> str:
    """B versus the measured B_crit, its cost by McCandlish et al.'s model, and a recommendation.

    Both in samples, the unit of the global batch (or in ``unit``: tokens for a run in tokens,
    items_per_sample then being loss items per token); ``items_per_sample`` > 1 (tokens per
    sequence) also states B_crit in the loss items it was measured in.

    Their model (arXiv:1812.06162): a run at global batch B needs about (1 + B_crit / B) x the
    minimum number of optimizer steps and (1 + B / B_crit) x the minimum number of items.

    Example:
        >>> print(noise_scale_advice(1024, 256.0).splitlines()[2][:60])
        By McCandlish et al.'s model the run used about 5.0x the min
    """
    if critical_batch_size is None or not critical_batch_size > 0:
        return (
            f"Global batch B = {global_batch_size}; no critical batch size was measured (a step "
            "needs 2 or more micro-batches over all ranks, and enough steps to smooth over)."
        )
    ratio = global_batch_size / critical_batch_size
    items, steps = 1.0 + ratio, 1.0 + 1.0 / ratio
    which = "last global batch" if adaptive else "global batch"
    in_items = (
        f" {unit}, {critical_batch_size * items_per_sample:.0f} loss items"
        if items_per_sample != 1.0
        else ""
    )
    lines = [
        f"{which} B = {global_batch_size}, measured critical batch size B_crit = "
        f"{critical_batch_size:.0f}{in_items} (B / B_crit = {ratio:.2f}).",
        f"By McCandlish et al.'s model the run used about {items:.1f}x the minimum items and "
        f"{steps:.1f}x the minimum steps.",
    ]
    if ratio > 2.0:
        lines.append(
            f"Recommendation: the global batch is well above B_crit, so most extra items are "
            f"wasted; a global batch near {critical_batch_size:.0f} would need far fewer items "
            "for a few more steps (fewer accumulation steps or ranks)."
        )
    elif ratio < 0.5:
        lines.append(
            f"Recommendation: the global batch is well below B_crit; a larger one, up to about "
            f"{critical_batch_size:.0f} (more accumulation steps or ranks), would cut the "
            "optimizer steps almost proportionally for few extra items."
        )
    else:
        lines.append(
            "Recommendation: the global batch is near B_crit, the usual sweet spot between "
            "steps and items; keep it."
        )
    lines[0] = lines[0][0].upper() + lines[0][1:]
    return "\n\n".join(lines)
