"""The typed state of a run: what the training loop counts, and what a finished run achieved.

`TrainState` holds the counters the loop updates every step and checkpoints for an exact resume
(skipped steps, non-finite steps in a row, samples and loss items so far); `RunSummary` is what
`Trainer.fit` returns and the report reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """The loop's counters over the whole run (a resumed run continues them).

    Attributes:
        skipped_steps: optimizer steps not applied (non-finite, or no loss items).
        nonfinite_in_row: the latest run of consecutive non-finite steps.
        samples_done: samples of every global batch so far.
        items_done: loss items of every global batch so far.
        tokens_done: input tokens of every global batch so far (runs in tokens; else 0).
        wall_time_s: seconds the run had run before this session (earlier sessions of a
            resumed run); `state_dict` adds this session's.
    """

    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    samples_done: int = 0
    items_done: int = 0
    tokens_done: int = 0
    wall_time_s: float = 0.0
    session_start: float = field(default_factory=time.perf_counter, compare=False, repr=False)

    @property
    def run_time_s(self) -> float:
        """Seconds the run has run so far, over every session."""
        return self.wall_time_s + time.perf_counter() - self.session_start

    @property
    def items_per_sample(self) -> float:
        """Loss items per sample so far (tokens per sequence; 1 for a per-sample loss)."""
        if self.samples_done and self.items_done:
            return self.items_done / self.samples_done
        return 1.0

    @property
    def items_per_token(self) -> float:
        """Loss items per input token so far (a run in tokens; 1 before the first step)."""
        if self.tokens_done and self.items_done:
            return self.items_done / self.tokens_done
        return 1.0

    def progress(self, unit: str) -> tuple[int, float]:
        """Progress so far and loss items per unit, in the unit of the global batch
        (``"samples"`` or ``"tokens"``)."""
        if unit == "tokens":
            return self.tokens_done, self.items_per_token
        return self.samples_done, self.items_per_sample

    def state_dict(self) -> dict[str, int | float]:
        """Plain numbers, for checkpoints; the wall time is the run's up to now."""
        state = asdict(self)
        del state["session_start"]
        state["wall_time_s"] = self.run_time_s
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned (a checkpoint without the wall time: 0).

        Raises:
            KeyError: a counter is missing.
        """
        for key in asdict(self):
            if key == "session_start":
                continue
            if key == "wall_time_s":
                self.wall_time_s = float(state.get(key, 0.0))
            else:
                setattr(self, key, int(state.get(key, 0)))  # 0: a counter older checkpoints lack


@dataclass
class SessionFigures:
    """What this process ran since it started (a resumed run counts from its resume).

    Attributes:
        samples: samples of the steps run.
        items: loss items of the steps run.
        time_s: seconds spent in those steps.
        final_loss: the loss of the last applied step.
        tokens: input tokens of the steps run (runs in tokens).
        padded_tokens: padded tokens of their micro-batches (runs in tokens).
    """

    samples: int = 0
    items: int = 0
    time_s: float = 0.0
    final_loss: float | None = None
    tokens: int = 0
    padded_tokens: int = 0

    def add(self, window: Any, result: Any, step_time_s: float) -> None:
        """Count one step (a `Window` and the engine's `StepResult`)."""
        self.samples += window.num_samples
        self.items += result.num_items
        self.time_s += step_time_s
        self.tokens += window.num_tokens or 0
        self.padded_tokens += window.num_padded_tokens or 0
        if not result.skipped:
            self.final_loss = result.loss

    def token_summary(self, steps: int, global_batch_tokens: int) -> dict[str, Any]:
        """tokens/s, padding and samples per step for the run summary ({} for a run in samples)."""
        if not self.padded_tokens:
            return {}
        return {
            "global_batch_tokens": global_batch_tokens,
            "tokens_per_s": self.tokens / max(self.time_s, 1e-12),
            "padding_fraction": 1.0 - self.tokens / self.padded_tokens,
            # A token run's global batch in samples varies: the mean of the steps run.
            "global_batch_size": round(self.samples / max(1, steps)),
        }


@dataclass
class RunSummary:
    """What a run achieved; `to_dict()` is what `metrics.format_summary` and reports read."""

    steps: int
    final_loss: float | None
    eval_metrics: dict[str, float]
    samples_per_s: float
    items_per_s: float
    peak_memory_bytes: int
    skipped_steps: int
    plan: dict[str, Any]
    run_dir: Path | None
    global_batch_size: int
    wall_time_s: float
    recipe: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat figures: final_eval_loss / final_eval_accuracy from eval_metrics."""
        summary = {k: v for k, v in asdict(self).items() if k not in ("eval_metrics", "extra")}
        summary.update({f"final_eval_{k}": v for k, v in self.eval_metrics.items()})
        summary["run_dir"] = str(self.run_dir) if self.run_dir else None
        return {**summary, **self.extra}
