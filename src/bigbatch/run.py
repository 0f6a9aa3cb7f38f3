"""A run's bookkeeping around the training loop: directory, checkpoints, summary and warnings.

`prepare_run_dir` refuses to reuse a run's directory silently; `save_run_checkpoint` and
`load_run_checkpoint` carry everything an exact resume needs (DESIGN invariant 5); `RunSummary`
is what a run achieved; `EarlyWarning` watches the first steps for a diverging loss or a gradient
spike, and `noise_scale_advice` turns the measured critical batch into a plain recommendation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import shutil
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch.utils.data import Dataset

from bigbatch import batches, distributed
from bigbatch import batchnorm as batchnorm_policies
from bigbatch import checkpoint as checkpoints
from bigbatch.data import Window, eval_batches
from bigbatch.engine import LossFn, StepResult
from bigbatch.recipes import EvalFn

logger = logging.getLogger(__name__)

FINAL_WEIGHTS = "final.safetensors"
PLOT_FILE = "curves.png"
# What a run writes, and all that --overwrite deletes.
RUN_FILES = (FINAL_WEIGHTS, "metrics.jsonl", "config.yaml", "report.md", PLOT_FILE)
RUN_DIRS = ("checkpoints", "tensorboard")
_POLICY_MARK = "_bigbatch_batchnorm_policy"


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


def peak_memory_bytes(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU, else the process's peak resident memory (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def build_optimizer(
    name: str, model: torch.nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """A recipe's optimizer by name: "adamw" or "sgd" (momentum 0.9)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"recipe optimizer must be 'adamw' or 'sgd', got {name!r}")


def resolve_device(name: str) -> torch.device:
    """The config's device: auto picks this rank's GPU when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available; use auto")
    return torch.device("cpu") if name == "cpu" else distributed.local_device()


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def gather_rng_states(world_size: int) -> list[Any]:
    """Every rank's RNG states, on every rank (a collective under torch.distributed)."""
    rng = [checkpoints.capture_rng_state()]
    if distributed.is_initialized() and world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    return rng


def save_run_checkpoint(
    run_dir: Path, step: int, module: torch.nn.Module, state: dict[str, Any], keep: int
) -> None:
    """Write ``run_dir/checkpoints/step-N`` atomically (call on rank 0 only)."""
    checkpoints.save_checkpoint(
        run_dir / "checkpoints", step, module.state_dict(), state, keep=keep
    )


def load_run_checkpoint(run_dir: Path | None) -> checkpoints.Checkpoint | None:
    """The newest valid checkpoint of a run directory, or None (with a warning)."""
    found = None
    if run_dir is not None:
        found = checkpoints.load_latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        logger.warning("resume: no valid checkpoint under %s: starting at step 0", run_dir)
    return found


def restore_rng_states(rng: list[Any], rank: int, world_size: int, saved_world_size: Any) -> None:
    """This rank's RNG states from a checkpoint (rank 0's when the world size changed)."""
    checkpoints.restore_rng_state(rng[rank] if len(rng) == world_size else rng[0])
    if saved_world_size != world_size:
        logger.warning(
            "resume: world_size %s -> %d: same sample order; RNG streams of rank 0 restored",
            saved_world_size,
            world_size,
        )


def save_final_weights(run_dir: Path, module: torch.nn.Module) -> None:
    """``final.safetensors``, written to a temporary name first and renamed into place."""
    temporary = run_dir / (FINAL_WEIGHTS + ".tmp")
    save_model(module, str(temporary))
    temporary.replace(run_dir / FINAL_WEIGHTS)


class EarlyWarning:
    """Watches the first steps of a run and warns once when it starts to diverge.

    Two triggers, checked for ``window_steps`` steps: the mean loss of the last 3 steps rises
    above ``loss_factor`` x the mean of the first 3 (for a loss that starts positive), or the
    gradient norm exceeds ``grad_factor`` x the running median of the earlier steps' norms.
    Both usually mean a learning rate too high for this global batch or a warm-up too short;
    the warning says so with the figures. Non-finite values are left to the non-finite handling.

    Args:
        window_steps: how many steps from the start are watched.
        loss_factor: the loss rise that warns.
        grad_factor: the gradient-norm spike that warns.
    """

    def __init__(
        self, window_steps: int = 50, loss_factor: float = 1.5, grad_factor: float = 10.0
    ) -> None:
        self.window_steps, self.loss_factor, self.grad_factor = (
            window_steps,
            loss_factor,
            grad_factor,
        )
        self.first_losses: list[float] = []
        self.recent_losses: list[float] = []
        self.grad_norms: list[float] = []
        self.fired = False

    def observe(
        self, step: int, loss: float, grad_norm: float, lr: float, global_batch_size: int
    ) -> str | None:
        """Add one applied step (1-based ``step``); the warning's text when it fires, else None."""
        if self.fired or step > self.window_steps:
            return None
        reason = None
        if math.isfinite(loss):
            self.recent_losses = [*self.recent_losses[-2:], loss]
            start = sum(self.first_losses) / 3 if len(self.first_losses) == 3 else 0.0
            recent = sum(self.recent_losses) / len(self.recent_losses)
            if start > 0 and recent > self.loss_factor * start:
                reason = (
                    f"the loss rose to {recent:.4g} (mean of the last 3 steps), above "
                    f"{self.loss_factor:g} x its starting value {start:.4g} (mean of the first 3)"
                )
            if len(self.first_losses) < 3:
                self.first_losses.append(loss)
        if math.isfinite(grad_norm):
            median = statistics.median(self.grad_norms) if len(self.grad_norms) >= 3 else None
            if reason is None and median and grad_norm > self.grad_factor * median:
                reason = (
                    f"the gradient norm spiked to {grad_norm:.4g}, above {self.grad_factor:g} x "
                    f"its running median {median:.4g}"
                )
            self.grad_norms.append(grad_norm)
        if reason is None:
            return None
        self.fired = True
        message = (
            f"early warning at step {step}: {reason} (loss {loss:.4g}, grad norm "
            f"{grad_norm:.4g}, lr {lr:.3g}, global batch {global_batch_size}). Likely causes: "
            "the learning rate is too high for this global batch (check lr and lr_scaling), or "
            "the warm-up is too short (raise warmup_steps)"
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)
        return message

    def state_dict(self) -> dict[str, Any]:
        """Plain values for checkpoints, so a resumed run warns as the uninterrupted one."""
        return {
            "first_losses": list(self.first_losses),
            "recent_losses": list(self.recent_losses),
            "grad_norms": list(self.grad_norms),
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.first_losses = [float(v) for v in state["first_losses"]]
        self.recent_losses = [float(v) for v in state["recent_losses"]]
        self.grad_norms = [float(v) for v in state["grad_norms"]]
        self.fired = bool(state["fired"])


def noise_scale_summary(
    critical_batch_size: float | None,
    global_batch_size: int,
    items_per_sample: float,
    *,
    adaptive: bool,
) -> dict[str, Any]:
    """The run summary's noise-scale entries: the estimate and the advice as a report section."""
    critical_samples = (
        None if critical_batch_size is None else critical_batch_size / items_per_sample
    )
    advice = noise_scale_advice(
        global_batch_size, critical_samples, adaptive=adaptive, items_per_sample=items_per_sample
    )
    if distributed.is_main_process():
        logger.info("gradient noise scale: %s", " ".join(advice.split()))
    summary: dict[str, Any] = {
        "critical_batch_size": critical_batch_size,
        "critical_batch_samples": critical_samples,
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
) -> str:
    """B versus the measured B_crit, its cost by McCandlish et al.'s model, and a recommendation.

    Both in samples (the unit of the global batch); ``items_per_sample`` > 1 (tokens per
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
        f" samples, {critical_batch_size * items_per_sample:.0f} loss items"
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


def apply_batchnorm_policy(
    model: torch.nn.Module, policy: str, world_size: int, device_type: str
) -> torch.nn.Module:
    """`batchnorm.apply_policy` once per model: `fit` applies it before building the optimizer,
    the Trainer (for a model given directly) before DDP wrapping; a second call does nothing."""
    if getattr(distributed.unwrap(model), _POLICY_MARK, None) == policy:
        return model
    model = batchnorm_policies.apply_policy(
        model,
        policy,  # type: ignore[arg-type]
        world_size=world_size,
        device_type=device_type,
    )
    object.__setattr__(distributed.unwrap(model), _POLICY_MARK, policy)
    return model


def step_record(
    window: Window,
    result: StepResult,
    learning_rate: float,
    step_time_s: float,
    global_batch_size: int,
    items_per_sample: float = 1.0,
) -> dict[str, Any]:
    """The figures of one step for metrics.jsonl, TensorBoard and the progress bar.

    The critical batch size is measured in loss items; ``critical_batch_samples`` divides it by
    the run's items per sample, the unit of the global batch.
    """
    record: dict[str, Any] = {
        "loss": result.loss,
        "lr": learning_rate,
        "grad_norm": result.grad_norm,
        "num_items": result.num_items,
        "global_batch_size": global_batch_size,
        "num_samples": window.num_samples,
        "micro_batches": result.micro_batches,
        "samples_per_s": window.num_samples / step_time_s,
        "items_per_s": result.num_items / step_time_s,
        "step_time_s": step_time_s,
        "skipped": int(result.skipped),
        "epoch": window.epoch,
    }
    if result.noise_scale is not None:
        critical = result.noise_scale.critical_batch_size
        record["critical_batch_size"] = critical
        record["critical_batch_samples"] = None if critical is None else critical / items_per_sample
        record["gradient_sq_norm"] = result.noise_scale.gradient_sq_norm
        record["trace_covariance"] = result.noise_scale.trace_covariance
    return record


def evaluate(
    module: torch.nn.Module,
    loss_fn: LossFn,
    eval_fn: EvalFn | None,
    dataset: Dataset[Any],
    *,
    micro_batch_size: int,
    precision: str = "fp32",
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, float]:
    """Loss (loss_fn sums / items) and eval_fn metrics on this rank's share, reduced over ranks."""
    device = next(module.parameters()).device
    sums: dict[str, list[float]] = {}
    autocast: Any = contextlib.nullcontext()
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = torch.autocast(device.type, dtype=dtype)
    module.eval()
    with torch.no_grad(), autocast:
        for micro_batch in eval_batches(
            dataset,
            micro_batch_size=micro_batch_size,
            rank=distributed.get_rank(),
            world_size=distributed.get_world_size(),
            collate_fn=collate_fn,
        ):
            micro_batch = batches.to_device(micro_batch, device)
            output = loss_fn(module, micro_batch)
            if isinstance(output, (tuple, list)):
                values = {"loss": (float(output[0]), float(output[1]))}
            else:
                rows = batches.num_rows(micro_batch)
                values = {"loss": (float(output) * rows, float(rows))}
            if eval_fn is not None:
                values.update(eval_fn(module, micro_batch))
            for key, (total, count) in values.items():
                entry = sums.setdefault(key, [0.0, 0.0])
                entry[0] += float(total)
                entry[1] += float(count)
    module.train()
    keys = [sorted(sums)]
    if distributed.is_initialized():
        dist.broadcast_object_list(keys, src=0)  # rank 0 always has eval items
    reduced = torch.tensor(
        [sums.get(key, [0.0, 0.0]) for key in keys[0]], dtype=torch.float64, device=device
    )
    distributed.all_reduce_sum(reduced)
    return {key: float(s / c) if c else math.nan for key, (s, c) in zip(keys[0], reduced)}
