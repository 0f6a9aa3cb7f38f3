"""The run directory: what a run writes there; a run is never overwritten silently.

`prepare_run_dir` refuses to reuse a directory that holds a run unless the caller resumes it or
asks to overwrite it (then only that run's own files are deleted); `save_final_weights` writes
``final.safetensors`` atomically (docs/design.md, invariant 6).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_model

from bigbatch.core import distributed

logger = logging.getLogger(__name__)

FINAL_WEIGHTS = "final.safetensors"
PLOT_FILE = "curves.png"
# What a run writes, and all that --overwrite deletes.
RUN_FILES = (FINAL_WEIGHTS, "metrics.jsonl", "config.yaml", "report.md", PLOT_FILE)
RUN_DIRS = ("checkpoints", "tensorboard")


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to reuse a run's directory silently; with overwrite delete only that run's files."""
    existing = [name for name in (*RUN_FILES, *RUN_DIRS) if (run_dir / name).exists()]
    if resume or not existing:
        return
    if not overwrite:
        state = "finished" if (run_dir / FINAL_WEIGHTS).exists() else "earlier"
        raise ValueError(
            f"run directory {str(run_dir)!r} holds an {state} run ({', '.join(existing)}): pass "
            "--resume to continue it, --overwrite to replace it, or choose another --out"
        )
    if distributed.is_main_process():
        for name in existing:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        logger.info("overwrite: removed %s from %s", ", ".join(existing), run_dir)


def save_final_weights(run_dir: Path, module: torch.nn.Module) -> None:
    """``final.safetensors``, written to a temporary name first and renamed into place."""
    temporary = run_dir / (FINAL_WEIGHTS + ".tmp")
    save_model(module, str(temporary))
    temporary.replace(run_dir / FINAL_WEIGHTS)
