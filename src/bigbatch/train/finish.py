"""The end of a run: what it achieved, and what it leaves in its directory.

`summarize` turns the run's counters and this session's figures into the `RunSummary` that
`Trainer.fit` returns (a resumed run's figures cover every session, read back from
metrics.jsonl); `finish_run_dir` writes the final weights, the report and its plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigbatch.core import sharding
from bigbatch.train import checkpoint, environment, rundir
from bigbatch.train import metrics as run_metrics
from bigbatch.train import report as run_report
from bigbatch.train.state import RunSummary, SessionFigures, TrainState


def summarize(
    *,
    steps: int,
    state: TrainState,
    figures: SessionFigures,
    first_plan: dict[str, Any],
    first_global_batch: int,
    eval_metrics: dict[str, float],
    device: torch.device,
    run_dir: Path | None,
    name: str | None,
    resumed: int | None,
    noise_scale: dict[str, Any],
    checkpointing: str = "",
) -> RunSummary:
    """What the run achieved; a resumed run's figures cover the whole run, every session.

    ``checkpointing``: the activation checkpointing the run applied, described in one line.
    """
    time_s = max(figures.time_s, 1e-12)
    summary = RunSummary(
        steps=steps,
        final_loss=figures.final_loss,
        eval_metrics=eval_metrics,
        samples_per_s=figures.samples / time_s,
        items_per_s=figures.items / time_s,
        peak_memory_bytes=environment.peak_memory_bytes(device),
        skipped_steps=state.skipped_steps,
        plan=first_plan,
        run_dir=run_dir,
        global_batch_size=first_global_batch,
        wall_time_s=state.run_time_s,
        recipe=name,
        extra={
            **({"activation_checkpointing": checkpointing} if checkpointing else {}),
            **noise_scale,
            **figures.token_summary(steps - (resumed or 0), first_global_batch),
        },
    )
    metrics_file = (run_dir or Path(".")) / run_metrics.METRICS_FILE
    if resumed is None or run_dir is None or not metrics_file.exists():
        return summary
    return run_report.whole_run(summary, run_metrics.read_metrics(metrics_file))


def noise_scale_summary(
    noise: Any, planner: Any, steps: int, items_per_unit: float, unit: str
) -> dict[str, Any]:
    """B versus the measured critical batch, for the report and the printed summary ({} when the
    noise scale is not measured)."""
    if noise is None:
        return {}
    return run_report.noise_scale_summary(
        noise.critical_batch_size,
        planner.at(max(0, steps - 1)),
        items_per_unit,
        adaptive=planner.adaptive is not None,
        unit=unit,
    )


def final_weights(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP the full weights, gathered once onto rank 0 (a collective: call on every
    rank); None otherwise (rank 0 has them)."""
    if not sharding.is_fsdp(module):
        return None
    return checkpoint.full_model_state(module)


def finish_run_dir(
    run_dir: Path,
    module: torch.nn.Module,
    summary: RunSummary,
    *,
    config: dict[str, Any],
    device: torch.device,
    final_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """final.safetensors, report.md and curves.png (rank 0)."""
    rundir.save_final_weights(run_dir, module, final_state)
    records = run_metrics.read_metrics(run_dir / run_metrics.METRICS_FILE)
    with rundir.storage_errors(f"write the report in {run_dir}"):
        plot = run_report.plot_run(records, run_dir / rundir.PLOT_FILE)
        run_report.write_report(
            run_dir,
            summary.to_dict(),
            records,
            plot,
            config=config,
            device=environment.describe_device(device),
        )
