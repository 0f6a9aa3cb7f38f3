"""The training loop: split-invariant windows -> exact steps, evaluation, metrics and checkpoints.

`Trainer` runs anyone's model, optimizer, loss_fn and datasets under a `Config`; `fit(config)`
builds them from a recipe (what the CLI calls). Everything counts optimizer steps. A run resumed
from its newest valid checkpoint ends bitwise equal to an uninterrupted one (CPU, same world size):
weights, optimizer, engine state, data position and every RNG stream are restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from bigbatch import batches, distributed, recipes
from bigbatch import checkpoint as checkpoints
from bigbatch import metrics as run_metrics
from bigbatch import report as run_report
from bigbatch.config import Config, config_to_yaml, with_recipe_defaults
from bigbatch.data import WindowLoader, count_steps, eval_batches
from bigbatch.engine import Accumulator, LossFn, StepResult
from bigbatch.plan import BatchSizeSchedule, Plan, plan, scale_learning_rate
from bigbatch.recipes import EvalFn

logger = logging.getLogger(__name__)

FINAL_WEIGHTS = "final.safetensors"
PLOT_FILE = "curves.png"
# What a run writes, and all that --overwrite deletes.
RUN_FILES = (FINAL_WEIGHTS, "metrics.jsonl", "config.yaml", "report.md", PLOT_FILE)
RUN_DIRS = ("checkpoints", "tensorboard")


class NonFiniteError(RuntimeError):
    """The loss or the gradients were not finite for too many steps in a row."""


@dataclass
class RunSummary:
    """What a run achieved; `to_dict()` is what `report.format_summary` and reports read."""

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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The schedule's multiplier of the learning rate at a 0-based step.

    Linear warm-up to 1 over warmup_steps, then constant, or a cosine / linear decay that would
    reach 0 one step after the run's last.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a model by optimizer steps under a Config, with exact accumulation and resume.

    The optimizer's own learning rate is the base: each step sets every group's lr to
    base x lr_scaling(global batch of the step) x warm-up/decay factor.

    Args:
        model: the module (on any device; moved to the config's device, wrapped in DDP when
            world_size > 1).
        optimizer: over the model's parameters.
        loss_fn: ``loss_fn(model, micro_batch) -> (loss_sum, num_items)`` or a scalar mean.
        train_dataset: a map-style dataset.
        config: the run's configuration (global_batch_size and max_steps or epochs set).
        eval_dataset: evaluated every eval_every steps and at the end; None: no evaluation.
        collate_fn: list of samples -> micro-batch.
        eval_fn: ``eval_fn(model, micro_batch) -> {metric: (sum, count)}``.
        run_dir: where metrics, checkpoints and weights go; None: nothing is written.
        progress: show a progress bar (rank 0).
        name: the task's name, for reports.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        train_dataset: Dataset[Any],
        config: Config,
        *,
        eval_dataset: Dataset[Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_fn: EvalFn | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
        name: str | None = None,
    ) -> None:
        if config.global_batch_size is None:
            raise ValueError("global_batch_size: not set by the config nor the recipe; set it")
        if config.max_steps is None and config.epochs is None:
            raise ValueError("max_steps: set max_steps or epochs (neither is set)")
        self.config = config
        self.loss_fn, self.eval_fn, self.collate_fn = loss_fn, eval_fn, collate_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress, self.name = progress, name
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.device = resolve_device(config.device)
        self.module = distributed.unwrap(model).to(self.device)
        self.model: torch.nn.Module = model if distributed.is_ddp(model) else self.module
        if self.world_size > 1 and not distributed.is_ddp(model):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        self.accumulator = Accumulator(
            self.model, optimizer, max_grad_norm=config.max_grad_norm, precision=config.precision
        )
        stages = list(config.batch_size_schedule or [])
        if not stages or stages[0][0] != 0:
            stages.insert(0, (0, config.global_batch_size))
        self.schedule = BatchSizeSchedule.from_value([list(stage) for stage in stages])
        self.first_global_batch_size = self.schedule.at(0)
        self._plans: dict[int, Plan] = {}
        self._micro_batch_size: int | None = None

    # -- plans and learning rate ---------------------------------------------------------------

    def plan_for(self, global_batch_size: int) -> Plan:
        """The plan of a global batch: the run's micro-batch size, accumulation follows."""
        if global_batch_size not in self._plans:
            config, share = self.config, math.ceil(global_batch_size / self.world_size)
            steps = config.gradient_accumulation_steps
            if global_batch_size == self.first_global_batch_size and isinstance(steps, int):
                micro = (
                    config.micro_batch_size if isinstance(config.micro_batch_size, int) else None
                )
                self._plans[global_batch_size] = plan(
                    global_batch_size, self.world_size, micro, gradient_accumulation_steps=steps
                )
            else:
                micro = min(self.micro_batch_size, share)
                self._plans[global_batch_size] = plan(global_batch_size, self.world_size, micro)
        return self._plans[global_batch_size]

    @property
    def micro_batch_size(self) -> int:
        """The micro-batch size of every plan (chosen once: given, derived or probed)."""
        if self._micro_batch_size is None:
            config, first = self.config, self.first_global_batch_size
            if isinstance(config.micro_batch_size, int):
                self._micro_batch_size = config.micro_batch_size
            elif config.micro_batch_size == "auto":
                self._micro_batch_size = self._probe_micro_batch_size()
            elif isinstance(config.gradient_accumulation_steps, int):
                self._micro_batch_size = self.plan_for(first).micro_batch_size
            else:
                self._micro_batch_size = math.ceil(first / self.world_size)
        return self._micro_batch_size

    def _probe_micro_batch_size(self) -> int:
        from bigbatch.autobatch import choose_micro_batch_size

        collate = self.collate_fn or torch.utils.data.default_collate
        dataset, length = self.train_dataset, len(self.train_dataset)  # type: ignore[arg-type]
        budget = self.config.memory_budget
        choice = choose_micro_batch_size(
            self.module,
            self.loss_fn,
            lambda n: collate([dataset[i % length] for i in range(n)]),
            max_micro_batch_size=math.ceil(self.first_global_batch_size / self.world_size),
            memory_budget_bytes=None if budget == "auto" else budget,
            optimize=self.config.optimize,
            optimizer=self.optimizer,
            device=self.device,
        )
        chosen = [choice.micro_batch_size]
        if distributed.is_initialized():
            dist.broadcast_object_list(chosen, src=0)  # every rank must run the same plan
        logger.info("micro_batch_size auto: %d (%s)", chosen[0], choice.reason)
        return int(chosen[0])

    def _set_lr(self, step: int, total: int) -> float:
        config, global_batch_size = self.config, self.schedule.at(step)
        base = config.lr_scaling.base_batch_size
        base_batch_size = self.first_global_batch_size if base == "auto" else base
        factor = lr_factor(step, total, config.warmup_steps, config.lr_schedule)
        for group in self.optimizer.param_groups:
            scaled = scale_learning_rate(
                group["initial_lr"], global_batch_size, base_batch_size, config.lr_scaling.rule
            )
            group["lr"] = scaled * factor
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the loop ------------------------------------------------------------------------------

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (max_steps, or what `epochs` passes take)."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        assert self.config.epochs is not None
        num_samples = len(self.train_dataset)  # type: ignore[arg-type]
        return count_steps(
            num_samples, self.config.epochs, self.schedule.at, drop_last=self.config.drop_last
        )

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> RunSummary:
        """Train to the last step; with resume, continue from the newest valid checkpoint."""
        start_time, total = time.perf_counter(), self.total_steps()
        first_plan = self.plan_for(self.first_global_batch_size)  # probes memory once if auto
        writes = self.run_dir is not None and distributed.is_main_process()
        if self.run_dir is not None:
            prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            if distributed.is_initialized():
                dist.barrier()  # every rank has checked the directory before rank 0 writes
        loader = WindowLoader(
            self.train_dataset,
            plan_for=self.plan_for,
            global_batch_size_at=self.schedule.at,
            seed=self.config.seed,
            rank=self.rank,
            collate_fn=self.collate_fn,
            drop_last=self.config.drop_last,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        # Training draws (dropout, ...) from a stream of its own per rank, reproducible on resume.
        _seed_everything(self.config.seed + 1_000_003 * self.rank)
        counters = {"skipped_steps": 0, "nonfinite_in_row": 0}
        restored = self._restore(loader, counters) if resume else None
        if writes:
            assert self.run_dir is not None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
        logger.info("plan of the first step:\n%s", first_plan)
        logger_ = run_metrics.MetricsLogger(
            self.run_dir or Path("."), enabled=writes, resume_step=restored
        )
        bar = run_metrics.ProgressBar(total, initial=loader.step, enabled=self.progress and writes)
        figures: dict[str, Any] = {"samples": 0, "items": 0, "time_s": 0.0, "final_loss": None}
        try:
            self._loop(loader, total, counters, logger_, bar, figures)
            eval_metrics = self.evaluate()
            if eval_metrics:
                logger_.log_eval(loader.step, eval_metrics)
            if self.run_dir is not None:
                self._save_checkpoint(loader, counters)
        finally:
            bar.close()
            logger_.close()
        time_s = max(figures["time_s"], 1e-12)
        summary = RunSummary(
            steps=loader.step,
            final_loss=figures["final_loss"],
            eval_metrics=eval_metrics,
            samples_per_s=figures["samples"] / time_s,
            items_per_s=figures["items"] / time_s,
            peak_memory_bytes=peak_memory_bytes(self.device),
            skipped_steps=counters["skipped_steps"],
            plan=first_plan.to_dict(),
            run_dir=self.run_dir,
            global_batch_size=self.first_global_batch_size,
            wall_time_s=time.perf_counter() - start_time,
            recipe=self.name,
        )
        if writes:
            self._finish_run_dir(summary)
        return summary

    def _loop(
        self,
        loader: WindowLoader,
        total: int,
        counters: dict[str, int],
        logger_: run_metrics.MetricsLogger,
        bar: run_metrics.ProgressBar,
        figures: dict[str, Any],
    ) -> None:
        """Steps from the loader's position to `total`, with logs, evaluations and checkpoints."""
        if loader.step >= total:
            return
        self.model.train()
        windows: Iterator[Any] = iter(loader)
        tick = time.perf_counter()
        try:
            for window in windows:
                learning_rate = self._set_lr(window.step, total)
                micro_batches = [batches.to_device(m, self.device) for m in window.micro_batches]
                result = self.accumulator.step(micro_batches, self.loss_fn)
                step_time_s, tick = time.perf_counter() - tick, time.perf_counter()
                self._count(result, window.step, counters)
                figures["samples"] += window.num_samples
                figures["items"] += result.num_items
                figures["time_s"] += step_time_s
                if not result.skipped:
                    figures["final_loss"] = result.loss
                record = {
                    "loss": result.loss,
                    "lr": learning_rate,
                    "grad_norm": result.grad_norm,
                    "num_items": result.num_items,
                    "global_batch_size": self.schedule.at(window.step),
                    "num_samples": window.num_samples,
                    "micro_batches": result.micro_batches,
                    "samples_per_s": window.num_samples / step_time_s,
                    "items_per_s": result.num_items / step_time_s,
                    "step_time_s": step_time_s,
                    "peak_memory_bytes": peak_memory_bytes(self.device),
                    "skipped": int(result.skipped),
                    "skipped_steps": counters["skipped_steps"],
                    "epoch": window.epoch,
                }
                logger_.log_step(loader.step, record)
                bar.update(loader.step, record)
                every_eval, every_save = self.config.eval_every, self.config.checkpoint_every
                if loader.step < total and every_eval and loader.step % every_eval == 0:
                    logger_.log_eval(loader.step, self.evaluate())
                due = every_save and loader.step % every_save == 0 and loader.step < total
                if due and self.run_dir is not None:
                    self._save_checkpoint(loader, counters)
                if loader.step >= total:
                    break
                tick = time.perf_counter()
        finally:
            windows.close()  # type: ignore[attr-defined]

    def _count(self, result: StepResult, step: int, counters: dict[str, int]) -> None:
        """Count skipped steps; stop after too many non-finite ones in a row (on_nonfinite stop)."""
        counters["skipped_steps"] += int(result.skipped)
        nonfinite = result.skipped and (result.skip_reason or "").startswith("non-finite")
        counters["nonfinite_in_row"] = counters["nonfinite_in_row"] + 1 if nonfinite else 0
        limit = self.config.max_nonfinite_in_row
        if self.config.on_nonfinite == "stop" and counters["nonfinite_in_row"] >= limit:
            raise NonFiniteError(
                f"{result.skip_reason} for {limit} optimizer steps in a row (last: step "
                f"{step + 1}); weights were not updated with it. Check: the learning rate (lr "
                f"{self.optimizer.param_groups[0]['lr']:.3g} after lr_scaling), NaN/Inf in the "
                "data, max_grad_norm, and precision (fp16 overflows: try bf16)"
            )

    def evaluate(self) -> dict[str, float]:
        """Loss (loss_fn sums / items) and eval_fn metrics on the eval set, over every rank."""
        if self.eval_dataset is None:
            return {}
        sums: dict[str, list[float]] = {}
        autocast: Any = contextlib.nullcontext()
        if self.config.precision != "fp32":
            dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
            autocast = torch.autocast(self.device.type, dtype=dtype)
        self.module.eval()
        with torch.no_grad(), autocast:
            for micro_batch in eval_batches(
                self.eval_dataset,
                micro_batch_size=self.plan_for(self.first_global_batch_size).micro_batch_size,
                rank=self.rank,
                world_size=self.world_size,
                collate_fn=self.collate_fn,
            ):
                micro_batch = batches.to_device(micro_batch, self.device)
                output = self.loss_fn(self.module, micro_batch)
                if isinstance(output, (tuple, list)):
                    values = {"loss": (float(output[0]), float(output[1]))}
                else:
                    rows = batches.num_rows(micro_batch)
                    values = {"loss": (float(output) * rows, float(rows))}
                if self.eval_fn is not None:
                    values.update(self.eval_fn(self.module, micro_batch))
                for key, (total, count) in values.items():
                    entry = sums.setdefault(key, [0.0, 0.0])
                    entry[0] += float(total)
                    entry[1] += float(count)
        self.module.train()
        keys = [sorted(sums)]
        if distributed.is_initialized():
            dist.broadcast_object_list(keys, src=0)  # rank 0 always has eval items
        reduced = torch.tensor(
            [sums.get(key, [0.0, 0.0]) for key in keys[0]], dtype=torch.float64, device=self.device
        )
        distributed.all_reduce_sum(reduced)
        return {key: float(s / c) if c else math.nan for key, (s, c) in zip(keys[0], reduced)}

    # -- checkpoints and the run directory -----------------------------------------------------

    def _save_checkpoint(self, loader: WindowLoader, counters: dict[str, int]) -> None:
        rng = [checkpoints.capture_rng_state()]
        if distributed.is_initialized() and self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if not distributed.is_main_process():
            return
        assert self.run_dir is not None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "accumulator": self.accumulator.state_dict(),
            "data": loader.state_dict(),
            "rng": rng,
            "plan": self.plan_for(self.schedule.at(max(0, loader.step - 1))).to_dict(),
            "micro_batch_size": self.micro_batch_size,
            "config": self.config.model_dump(mode="json"),
            "counters": dict(counters),
            "world_size": self.world_size,
        }
        checkpoints.save_checkpoint(
            self.run_dir / "checkpoints",
            loader.step,
            self.module.state_dict(),
            state,
            keep=self.config.keep_checkpoints,
        )

    def _restore(self, loader: WindowLoader, counters: dict[str, int]) -> int | None:
        """Load the newest valid checkpoint into everything; returns its step (None: none)."""
        found = None
        if self.run_dir is not None:
            found = checkpoints.load_latest_checkpoint(self.run_dir / "checkpoints")
        if found is None:
            logger.warning("resume: no valid checkpoint under %s: starting at step 0", self.run_dir)
            return None
        state = found.training_state
        self.module.load_state_dict(found.model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.accumulator.load_state_dict(state["accumulator"])
        loader.load_state_dict(state["data"])
        counters.update({key: int(value) for key, value in state["counters"].items()})
        if self.config.micro_batch_size == "auto":
            self._micro_batch_size = int(state["micro_batch_size"])  # no second memory probe
        rng = state["rng"]
        checkpoints.restore_rng_state(rng[self.rank] if len(rng) == self.world_size else rng[0])
        if state.get("world_size") != self.world_size:
            logger.warning(
                "resume: world_size %s -> %d: same sample order; RNG streams of rank 0 restored",
                state.get("world_size"),
                self.world_size,
            )
        logger.info("resumed from %s at step %d", found.path, found.step)
        return found.step

    def _finish_run_dir(self, summary: RunSummary) -> None:
        assert self.run_dir is not None
        temporary = self.run_dir / (FINAL_WEIGHTS + ".tmp")
        save_model(self.module, str(temporary))
        temporary.replace(self.run_dir / FINAL_WEIGHTS)
        records = run_metrics.read_metrics(self.run_dir / "metrics.jsonl")
        plot = run_report.plot_run(records, self.run_dir / PLOT_FILE)
        run_report.write_report(self.run_dir, summary.to_dict(), records, plot)


def fit(
    config: Config,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Train the config's recipe: what `bigbatch train` runs, alone or under torchrun.

    The recipe's defaults fill what the config leaves unset; the run directory defaults to
    ``runs/<recipe>-<time>`` (pass out_dir to resume).
    """
    distributed.setup_process_group()
    _seed_everything(config.seed)  # the model's initialisation, the same on every rank
    recipe = recipes.build(config.recipe, config.model_dump())
    config = with_recipe_defaults(config, recipe.defaults)
    if out_dir is None:
        name = [f"runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if distributed.is_initialized():
            dist.broadcast_object_list(name, src=0)  # every rank writes to / reads from one place
        out_dir = Path(name[0])
    optimizer = build_optimizer(recipe.optimizer, recipe.model, config.lr, config.weight_decay)
    trainer = Trainer(
        recipe.model,
        optimizer,
        recipe.loss_fn,
        recipe.train_dataset,
        config,
        eval_dataset=recipe.eval_dataset,
        collate_fn=recipe.collate_fn,
        eval_fn=recipe.eval_fn,
        run_dir=out_dir,
        progress=progress,
        name=recipe.name,
    )
    return trainer.fit(resume=resume, overwrite=overwrite)
