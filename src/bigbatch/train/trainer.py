"""The training loop: split-invariant windows -> exact steps, evaluation, metrics and checkpoints.

`Trainer` runs anyone's model, optimizer, loss_fn and datasets under a `Config`; `fit(config)`
builds them from a recipe (what the CLI calls). Everything counts optimizer steps. A run resumed
from its newest valid checkpoint ends bitwise equal to an uninterrupted one (CPU, same world size):
weights, optimizer, engine state, data position, the adaptive batch and every RNG stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from bigbatch import recipes
from bigbatch.choices import GradientSync
from bigbatch.core import batches, distributed, sharding
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core.engine import Accumulator, LossFn, StepResult
from bigbatch.data.loader import Window, WindowLoader, first_samples
from bigbatch.data.token_loader import TokenWindow, TokenWindowLoader
from bigbatch.data.token_plan import TokenBudget
from bigbatch.data.tokens import sample_lengths
from bigbatch.plan import Plan
from bigbatch.recipes import EvalFn
from bigbatch.tools.autobatch import choose_micro_batch_size
from bigbatch.train import checkpoint, environment, evaluation, resume, rundir
from bigbatch.train import metrics as run_metrics
from bigbatch.train import report as run_report
from bigbatch.train.checkpointer import Checkpointer
from bigbatch.train.config import Config
from bigbatch.train.configfile import config_to_yaml, with_recipe_defaults
from bigbatch.train.early_warning import EarlyWarning
from bigbatch.train.preemption import RunStopped, StopSignals
from bigbatch.train.schedules import BatchPlanner
from bigbatch.train.state import RunSummary, SessionFigures, TrainState
from bigbatch.train.token_batches import TokenBatchPlanner, probe_micro_batch_tokens
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "RunStopped", "RunSummary", "Trainer", "fit"]


class NonFiniteError(RuntimeError):
    """The loss or the gradients were not finite for too many steps in a row."""


class Trainer:
    """Trains a model by optimizer steps under a Config, with exact accumulation and resume.

    The optimizer's own learning rate is the base: each step sets every group's lr to
    base x lr_scaling(global batch of the step) x warm-up/decay factor. The config's `batchnorm`
    policy is applied to the model before DDP wrapping (parameters are kept, so an optimizer
    built before stays valid).

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
        sample_length: a sample's input tokens, for global_batch_tokens when the dataset has no
            ``lengths`` (docs/tokens.md).
        collate_packed: rows of samples -> a packed micro-batch, for packing.
        shard_units: ``shard_units(model)``, the modules `parallelism: fsdp` shards on their own
            before the root; None: `bigbatch.core.sharding.default_shard_units`.
    """

    _checkpointer: Checkpointer | None = None  # built by _fit, with the run's participants

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
        sample_length: Callable[[Any], int] | None = None,
        collate_packed: Callable[[list[list[Any]]], Any] | None = None,
        shard_units: Callable[[torch.nn.Module], list[torch.nn.Module]] | None = None,
    ) -> None:
        if config.global_batch_size is None and config.global_batch_tokens is None:
            raise UsageError(
                "global_batch_size: not set by the config nor the recipe; set it (or "
                "global_batch_tokens)"
            )
        if config.max_steps is None and config.epochs is None:
            raise UsageError("max_steps: set max_steps or epochs (neither is set)")
        num_samples = len(train_dataset)  # type: ignore[arg-type]
        environment.check_num_workers(config.num_workers)
        self.config = config
        self.loss_fn, self.eval_fn, self.collate_fn = loss_fn, eval_fn, collate_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.run_dir = rundir.check_run_dir(run_dir) if run_dir is not None else None
        self.progress, self.name = progress, name
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.device = environment.resolve_device(config.device)
        model = _apply_batchnorm_policy_once(
            model, config.batchnorm, self.world_size, self.device.type
        )
        model = self._shard(model, optimizer, config, shard_units)
        # parallelism fsdp: checkpoints in torch.distributed.checkpoint's sharded format (on one
        # process too, so that they resume on any number of ranks).
        self.sharded = sharding.is_fsdp(model) or config.parallelism == "fsdp"
        self.module = distributed.unwrap(model).to(self.device)
        self.model: torch.nn.Module = model if distributed.is_ddp(model) else self.module
        if self.world_size > 1 and not distributed.is_ddp(model) and not sharding.is_fsdp(model):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        engine_policy = config.batchnorm if config.batchnorm in ("freeze", "window") else "keep"
        self._probed_gradient_sync: GradientSync | None = None
        self.collate_packed = collate_packed
        self.batches: BatchPlanner | TokenBatchPlanner
        if config.global_batch_tokens is None:
            self.batches = BatchPlanner(config, self.world_size, num_samples, self._probe)
        else:
            lengths = sample_lengths(train_dataset, sample_length)
            self.batches = TokenBatchPlanner(config, self.world_size, lengths, self._probe_tokens)
        self.plan_for, self.batch_size_at = self.batches.plan_for, self.batches.at
        self.first_global_batch_size = self.batches.first_global_batch_size
        if config.warmup_steps and config.batch_size_schedule != "adaptive":
            self.batches.total_steps()  # refuses a warm-up beyond the run now, not after a probe
        self.accumulator = Accumulator(
            self.model,
            optimizer,
            max_grad_norm=config.max_grad_norm,
            precision=config.precision,
            batchnorm=engine_policy,
            measure_noise_scale=config.noise_scale,
            noise_smoothing_steps=config.noise_smoothing_steps,
            gradient_sync=self._planned_gradient_sync(),
            memory_budget_bytes=None
            if config.memory_budget == "auto"
            else int(config.memory_budget),
        )
        self.early_warning = EarlyWarning()
        self._total_steps = 0
        self._saved_step: int | None = None  # the step of the latest checkpoint written
        self._restored: checkpoint.Checkpoint | None = None
        self._session_start, self._wall_time_before = time.perf_counter(), 0.0

    def _shard(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config,
        shard_units: Callable[[torch.nn.Module], list[torch.nn.Module]] | None,
    ) -> torch.nn.Module:
        """parallelism fsdp over several ranks: fully_shard the units, then the root, and point
        the optimizer at the sharded parameters. One process runs the model unsharded."""
        if config.parallelism != "fsdp" or sharding.is_fsdp(model) or distributed.is_ddp(model):
            return model
        if self.world_size == 1:
            logger.warning("parallelism fsdp on one process: the model runs unsharded")
            return model
        model = model.to(self.device)
        before = {id(parameter): name for name, parameter in model.named_parameters()}
        units = (shard_units or sharding.default_shard_units)(model)
        sharding.shard_model(model, units, world_size=self.world_size, device_type=self.device.type)
        try:
            sharding.rebind_optimizer(optimizer, before, model)
        except ValueError as error:
            raise UsageError(f"parallelism fsdp: {error}") from error
        logger.info(
            "parallelism fsdp: %d shard units and the root over %d ranks",
            len(units),
            self.world_size,
        )
        return model

    # -- plans, batch sizes and learning rate --------------------------------------------------

    def _planned_gradient_sync(self) -> GradientSync:
        """gradient_sync auto on a sharded model whose micro-batch the probe chooses: the probe
        compares both sync modes per rank, so it runs now, before the engine is built."""
        config = self.config
        if (
            config.gradient_sync == "auto"
            and sharding.is_fsdp(self.model)
            and config.micro_batch_size == "auto"
            and isinstance(self.batches, BatchPlanner)
        ):
            self.batches.micro_batch_size  # noqa: B018 - runs the probe
        return self._probed_gradient_sync or config.gradient_sync

    def _probe(self) -> int:
        """micro_batch_size auto: the memory probe, agreed over ranks."""
        budget = self.config.memory_budget
        choice = choose_micro_batch_size(
            self.module,
            self.loss_fn,
            first_samples(self.train_dataset, self.collate_fn),
            max_micro_batch_size=math.ceil(self.first_global_batch_size / self.world_size),
            memory_budget_bytes=None if budget == "auto" else budget,
            optimize=self.config.optimize,
            optimizer=self.optimizer,
            device=self.device,
            **environment.planned_layout(self.config, self.model, self.world_size),
        )
        chosen: list[Any] = [choice.micro_batch_size, choice.gradient_sync]
        if distributed.is_initialized():
            dist.broadcast_object_list(chosen, src=0)  # every rank must run the same plan
        logger.info("micro_batch_size auto: %d (%s)", chosen[0], choice.reason)
        self._probed_gradient_sync = chosen[1]
        return int(chosen[0])

    def _probe_tokens(self, lengths: Any) -> int:
        """micro_batch_tokens auto: the memory probe per padded token, agreed over ranks."""
        return probe_micro_batch_tokens(
            self.module,
            self.loss_fn,
            self.train_dataset,
            lengths,
            config=self.config,
            collate_fn=self.collate_fn,
            collate_packed=self.collate_packed,
            optimizer=self.optimizer,
            device=self.device,
            world_size=self.world_size,
        )

    def _in_tokens(self, state: TrainState) -> tuple[int, float]:
        """Progress so far and loss items per unit, in the unit of the global batch."""
        if self.config.global_batch_tokens is None:
            return state.samples_done, state.items_per_sample
        return state.tokens_done, state.items_per_token

    def _set_lr(self, step: int, total: int, state: TrainState) -> float:
        """Every group's lr for this step: base x scaling rule x warm-up/decay."""
        noise = self.accumulator.noise_scale()
        done, items_per_unit = self._in_tokens(state)
        for group in self.optimizer.param_groups:
            group["lr"] = self.batches.learning_rate(
                group["initial_lr"], step, total, done, noise, items_per_unit
            )
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> RunSummary:
        """Train to the last step; with resume, continue from the newest valid checkpoint.

        The run directory is locked for the run's life (one run per directory), and the config's
        `stop_signals` stop the run at the end of a step, with a checkpoint of it.

        Raises:
            RunStopped: a stop signal arrived; the checkpoint of the last completed step is saved.
            UsageError: bad input: the directory is in use or holds another run, a checkpoint of
                a run with other settings, a disk that is full, ...
        """
        if resume and overwrite:
            raise UsageError(
                "--resume continues the run in --out and --overwrite deletes it: give one of them"
            )
        with contextlib.ExitStack() as stack:
            if self.run_dir is not None:
                stack.enter_context(rundir.RunLock(self.run_dir))
            stop = stack.enter_context(StopSignals(self.config.stop_signals))
            return self._fit(stop, resume=resume, overwrite=overwrite)

    def _fit(self, stop: StopSignals, *, resume: bool, overwrite: bool) -> RunSummary:
        """`fit` inside the lock and the signal handlers."""
        self._session_start = time.perf_counter()
        first_plan = self.batches.start()  # probes memory once if auto
        if self.config.batchnorm != "freeze":  # the engine warns again per window otherwise
            batchnorm_policies.warn_small_micro_batches(self.module, first_plan.micro_batch_size)
        writes = self.run_dir is not None and distributed.is_main_process()
        if self.run_dir is not None:
            rundir.prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            if distributed.is_initialized():
                dist.barrier()  # every rank has checked the directory before rank 0 writes
        loader = self._window_loader(stop.signals)
        # Training draws (dropout, ...) from a stream of its own per rank, reproducible on resume.
        environment.seed_everything(self.config.seed + 1_000_003 * self.rank)
        state = TrainState()
        self._checkpointer = self._build_checkpointer(loader, state)
        restored = self._restore(loader, state) if resume else None
        total = self._total_steps = self._checked_total(restored, loader.step)
        if restored is not None and self.batches.finished(loader.step, loader.sampler, total):
            return self._already_finished(loader, state, first_plan, writes)
        if writes:
            assert self.run_dir is not None
            with rundir.storage_errors(f"write {self.run_dir / 'config.yaml'}"):
                (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
        logger.info("plan of the first step:\n%s", first_plan)
        logger_ = run_metrics.MetricsLogger(
            self.run_dir or Path("."),
            enabled=writes,
            resume_step=restored,
            trackers=self.config.trackers,
            config=self.config.model_dump(mode="json"),
        )
        bar = run_metrics.ProgressBar(total, initial=loader.step, enabled=self.progress and writes)
        figures = SessionFigures()
        try:
            stopped_by = self._loop(loader, total, state, logger_, bar, figures, stop)
            if stopped_by:
                raise RunStopped(
                    stopped_by, loader.step, total, self._stop_checkpoint(loader, state)
                )
            eval_metrics = self.evaluate()
            if eval_metrics:
                logger_.log_eval(loader.step, eval_metrics)
            if self.run_dir is not None:
                self._save_checkpoint(loader, state)
        finally:
            bar.close()
            logger_.close()
        summary = self._summary(loader, state, first_plan, figures, eval_metrics, resumed=restored)
        final_state = self._final_state() if self.run_dir is not None else None
        if writes:
            self._finish_run_dir(summary, final_state)
        return summary

    def _checked_total(self, restored: int | None, step: int) -> int:
        """The run's steps, checked against the warm-up and, on resume, the checkpoint."""
        total = self.batches.total_steps()
        if restored is not None and self._restored is not None:
            resume.warn_if_schedule_moves(self._restored, self.config, total, step)
        return total

    def _stop_checkpoint(
        self, loader: WindowLoader | TokenWindowLoader, state: TrainState
    ) -> Path | None:
        """The checkpoint of the step the run stops at (written unless it already is)."""
        if self.run_dir is None:
            return None
        if self._saved_step != loader.step:
            self._save_checkpoint(loader, state)
        return self.run_dir / "checkpoints" / checkpoint.checkpoint_name(loader.step)

    def _summary(
        self,
        loader: WindowLoader | TokenWindowLoader,
        state: TrainState,
        first_plan: Plan | TokenBudget,
        figures: SessionFigures,
        eval_metrics: dict[str, float],
        *,
        resumed: int | None,
    ) -> RunSummary:
        """What the run achieved; a resumed run's figures cover the whole run, every session."""
        time_s = max(figures.time_s, 1e-12)
        summary = RunSummary(
            steps=loader.step,
            final_loss=figures.final_loss,
            eval_metrics=eval_metrics,
            samples_per_s=figures.samples / time_s,
            items_per_s=figures.items / time_s,
            peak_memory_bytes=environment.peak_memory_bytes(self.device),
            skipped_steps=state.skipped_steps,
            plan=first_plan.to_dict(),
            run_dir=self.run_dir,
            global_batch_size=self.first_global_batch_size,
            wall_time_s=self._wall_time_before + time.perf_counter() - self._session_start,
            recipe=self.name,
            extra={
                **self._noise_scale_summary(loader.step, self._in_tokens(state)[1]),
                **figures.token_summary(loader.step - (resumed or 0), self.first_global_batch_size),
            },
        )
        metrics_file = (self.run_dir or Path(".")) / run_metrics.METRICS_FILE
        if resumed is None or self.run_dir is None or not metrics_file.exists():
            return summary
        return run_report.whole_run(summary, run_metrics.read_metrics(metrics_file))

    def _already_finished(
        self,
        loader: WindowLoader | TokenWindowLoader,
        state: TrainState,
        first_plan: Plan | TokenBudget,
        writes: bool,
    ) -> RunSummary:
        """Resuming a finished run: nothing to train or evaluate again; the report stays."""
        assert self.run_dir is not None
        logger.info("the run in %s is finished (step %d): nothing to do", self.run_dir, loader.step)
        summary = self._summary(
            loader, state, first_plan, SessionFigures(), {}, resumed=loader.step
        )
        missing = [not (self.run_dir / rundir.FINAL_WEIGHTS).exists()]
        if distributed.is_initialized():
            dist.broadcast_object_list(missing, src=0)
        if missing[0]:
            final_state = self._final_state()  # a collective under FSDP
            if writes:  # it stopped between its last checkpoint and the end
                self._finish_run_dir(summary, final_state)
        return summary

    def _window_loader(
        self, worker_ignored_signals: Sequence[int] = ()
    ) -> WindowLoader | TokenWindowLoader:
        """This rank's windows from step 0, in samples or in tokens (data workers leave the stop
        signals to the main process, which stops at a step boundary)."""
        if isinstance(self.batches, TokenBatchPlanner):
            return self.batches.window_loader(
                self.train_dataset,
                rank=self.rank,
                collate_fn=self.collate_fn,
                collate_packed=self.collate_packed,
                num_workers=self.config.num_workers,
                pin_memory=self.device.type == "cuda",
            )
        return WindowLoader(
            self.train_dataset,
            plan_for=self.plan_for,  # type: ignore[arg-type]
            global_batch_size_at=self.batch_size_at,
            seed=self.config.seed,
            rank=self.rank,
            collate_fn=self.collate_fn,
            drop_last=self.config.drop_last,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_ignored_signals=worker_ignored_signals,
        )

    def _loop(
        self,
        loader: WindowLoader | TokenWindowLoader,
        total: int,
        state: TrainState,
        logger_: run_metrics.MetricsLogger,
        bar: run_metrics.ProgressBar,
        figures: SessionFigures,
        stop: StopSignals,
    ) -> int:
        """Steps from the loader's position to the end, with logs, evaluations and checkpoints.

        Returns 0 at the end of the run, or the number of the signal that stopped it (every rank
        agrees on it at the end of a step).
        """
        self.model.train()
        windows: Iterator[Window | TokenWindow] = iter(loader)
        tick = time.perf_counter()
        try:
            while not self.batches.finished(loader.step, loader.sampler, total):
                window = next(windows)
                learning_rate = self._set_lr(window.step, total, state)
                micro_batches = [batches.to_device(m, self.device) for m in window.micro_batches]
                result = self.accumulator.step(micro_batches, self.loss_fn)
                step_time_s, tick = time.perf_counter() - tick, time.perf_counter()
                self._tally(window, result, step_time_s, state, figures)
                if not result.skipped:
                    figures.final_loss = result.loss
                    self.early_warning.observe(
                        loader.step,
                        result.loss,
                        result.grad_norm,
                        learning_rate,
                        self.batch_size_at(window.step),
                    )
                record = run_metrics.step_record(
                    window,  # type: ignore[arg-type]
                    result,
                    learning_rate,
                    step_time_s,
                    self.batch_size_at(window.step),
                    state.items_per_sample,
                )
                record.update(
                    run_metrics.token_record(
                        window,
                        result,
                        step_time_s,
                        self.batch_size_at(window.step),
                        state.items_per_token,
                    )
                )
                record["peak_memory_bytes"] = environment.peak_memory_bytes(self.device)
                record["skipped_steps"] = state.skipped_steps
                logger_.log_step(loader.step, record)
                bar.update(loader.step, record)
                changed = self._adapt(loader.step, result, self._in_tokens(state)[1])
                finished = self.batches.finished(loader.step, loader.sampler, total)
                every_eval, every_save = self.config.eval_every, self.config.checkpoint_every
                if not finished and every_eval and loader.step % every_eval == 0:
                    logger_.log_eval(loader.step, self.evaluate())
                due = every_save and loader.step % every_save == 0 and not finished
                if due and self.run_dir is not None:
                    self._save_checkpoint(loader, state)
                if not finished and stop.active and (stopped_by := stop.agreed()):
                    return stopped_by
                if changed:  # prefetched micro-batches were cut for the old size: start afresh
                    windows.close()  # type: ignore[attr-defined]
                    windows = iter(loader)
                tick = time.perf_counter()
        finally:
            windows.close()  # type: ignore[attr-defined]
        return 0

    def _tally(
        self,
        window: Window | TokenWindow,
        result: StepResult,
        step_time_s: float,
        state: TrainState,
        figures: SessionFigures,
    ) -> None:
        """Count one step into the run's state and this session's figures."""
        self._count(result, window.step, state)
        state.samples_done += window.num_samples
        state.items_done += result.num_items
        state.tokens_done += getattr(window, "num_tokens", 0)
        figures.tokens += getattr(window, "num_tokens", 0)
        figures.padded_tokens += getattr(window, "num_padded_tokens", 0)
        figures.samples += window.num_samples
        figures.items += result.num_items
        figures.time_s += step_time_s

    def _adapt(self, steps_done: int, result: StepResult, items_per_unit: float) -> bool:
        """Adaptive schedule: let the controller decide; True when the global batch changed.

        The critical batch is measured in loss items and the global batch counts samples (or
        tokens: items_per_unit is then loss items per token). No
        decision before the estimate has smoothed over a quarter of its window (an early, noisy
        estimate would move the batch only to move it back).
        """
        adaptive, noise = self.batches.adaptive, result.noise_scale
        if adaptive is None or noise is None or noise.critical_batch_size is None:
            return False
        settled = max(self.config.adapt_every, self.config.noise_smoothing_steps // 4)
        if noise.num_steps < settled:
            return False
        critical = noise.critical_batch_size / items_per_unit
        return adaptive.update(steps_done, critical) is not None

    def _count(self, result: StepResult, step: int, state: TrainState) -> None:
        """Count skipped steps; stop after too many non-finite ones in a row (on_nonfinite stop)."""
        state.skipped_steps += int(result.skipped)
        nonfinite = result.skipped and (result.skip_reason or "").startswith("non-finite")
        state.nonfinite_in_row = state.nonfinite_in_row + 1 if nonfinite else 0
        limit = self.config.max_nonfinite_in_row
        if self.config.on_nonfinite == "stop" and state.nonfinite_in_row >= limit:
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
        micro_batch_size = self.plan_for(self.first_global_batch_size).micro_batch_size
        return evaluation.evaluate(
            self.module,
            self.loss_fn,
            self.eval_fn,
            self.eval_dataset,
            micro_batch_size=micro_batch_size,
            precision=self.config.precision,
            collate_fn=self.collate_fn,
            equal_forwards=sharding.is_fsdp(self.module),
        )

    # -- checkpoints, the run directory and the summary ----------------------------------------

    def _build_checkpointer(
        self, loader: WindowLoader | TokenWindowLoader, state: TrainState
    ) -> Checkpointer:
        """The checkpointer of this run and everything with state, in restore order."""
        checkpointer = Checkpointer(
            (self.run_dir or Path(".")) / "checkpoints",
            model=self.module,
            optimizer=self.optimizer,
            sharded=self.sharded,
            keep=self.config.keep_checkpoints,
        )
        checkpointer.register("accumulator", self.accumulator)
        checkpointer.register("data", loader)
        checkpointer.register("counters", state)
        checkpointer.register("early_warning", self.early_warning)
        checkpointer.register("planner", _PlannerState(self.batches, self.config))
        return checkpointer

    def _save_checkpoint(self, loader: WindowLoader | TokenWindowLoader, state: TrainState) -> None:
        """The checkpoint of the step just done (call on every rank)."""
        assert self.run_dir is not None and self._checkpointer is not None
        self._saved_step = loader.step
        state.wall_time_s = self._wall_time_before + time.perf_counter() - self._session_start
        extra = {
            "plan": self.plan_for(self.batch_size_at(max(0, loader.step - 1))).to_dict(),
            "config": self.config.model_dump(mode="json"),
            "total_steps": self._total_steps,
        }
        self._checkpointer.save(loader.step, extra)

    def _restore(self, loader: WindowLoader | TokenWindowLoader, state: TrainState) -> int | None:
        """Load the newest valid checkpoint into everything; returns its step (None: none)."""
        num_samples = len(self.train_dataset)  # type: ignore[arg-type]
        found = self._restored = resume.load(self.run_dir, self.config, self.module, num_samples)
        if found is None:
            return None
        assert self._checkpointer is not None
        self._checkpointer.restore(found)  # loader and state are registered participants
        self._wall_time_before, self._saved_step = state.wall_time_s, found.step
        logger.info("resumed from %s at step %d", found.path, found.step)
        return found.step

    def _noise_scale_summary(self, steps: int, items_per_unit: float) -> dict[str, Any]:
        """B versus the measured critical batch, for the report and the printed summary."""
        noise = self.accumulator.noise_scale()
        if noise is None:
            return {}
        return run_report.noise_scale_summary(
            noise.critical_batch_size,
            self.batch_size_at(max(0, steps - 1)),
            items_per_unit,
            adaptive=self.batches.adaptive is not None,
            unit="samples" if self.config.global_batch_tokens is None else "tokens",
        )

    def _final_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the full weights, gathered once onto rank 0 (a collective: call on every
        rank); None otherwise (rank 0 has them)."""
        if not sharding.is_fsdp(self.module):
            return None
        return checkpoint.full_model_state(self.module)

    def _finish_run_dir(
        self, summary: RunSummary, final_state: dict[str, torch.Tensor] | None = None
    ) -> None:
        assert self.run_dir is not None
        rundir.save_final_weights(self.run_dir, self.module, final_state)
        records = run_metrics.read_metrics(self.run_dir / run_metrics.METRICS_FILE)
        with rundir.storage_errors(f"write the report in {self.run_dir}"):
            plot = run_report.plot_run(records, self.run_dir / rundir.PLOT_FILE)
            run_report.write_report(
                self.run_dir,
                summary.to_dict(),
                records,
                plot,
                config=self.config.model_dump(mode="json"),
                device=environment.describe_device(self.device),
            )


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
    ``runs/<recipe>-<time>`` (pass out_dir to resume). The batchnorm policy is applied before
    the optimizer is built.
    """
    distributed.setup_process_group()
    environment.seed_everything(config.seed)  # the model's initialisation, the same on every rank
    recipe = recipes.build(config.recipe, config.model_dump())
    config = with_recipe_defaults(config, recipe.defaults)
    if out_dir is None:
        name = [f"runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if distributed.is_initialized():
            dist.broadcast_object_list(name, src=0)  # every rank writes to / reads from one place
        out_dir = Path(name[0])
    world_size = distributed.get_world_size()
    device_type = environment.resolve_device(config.device).type
    model = _apply_batchnorm_policy_once(recipe.model, config.batchnorm, world_size, device_type)
    optimizer = recipe.build_optimizer(model, config.lr, config.weight_decay)
    trainer = Trainer(
        model,
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
        sample_length=recipe.sample_length,
        collate_packed=recipe.collate_packed,
        shard_units=recipe.shard_units,
    )
    return trainer.fit(resume=resume, overwrite=overwrite)


class _PlannerState:
    """The batch planner's probed micro-batch and adaptive stages as a checkpoint participant
    (`BatchPlanner` and `TokenBatchPlanner` have no state_dict of their own yet).

    Restored: a probed (auto) micro-batch, so that a resume runs no second memory probe, and
    the adaptive controller's stages.
    """

    def __init__(self, planner: BatchPlanner | TokenBatchPlanner, config: Config) -> None:
        self.planner, self.config = planner, config

    def state_dict(self) -> dict[str, Any]:
        adaptive = self.planner.adaptive
        return {
            "micro_batch_size": self.planner.micro_batch_size,
            "micro_batch_tokens": getattr(self.planner, "micro_batch_tokens", None),
            "adaptive": adaptive.state_dict() if adaptive is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        planner = self.planner
        if isinstance(planner, TokenBatchPlanner):
            if self.config.micro_batch_tokens == "auto":
                planner.micro_batch_tokens = int(state["micro_batch_tokens"])
        elif self.config.micro_batch_size == "auto":
            planner.micro_batch_size = int(state["micro_batch_size"])
        if planner.adaptive is not None and state.get("adaptive"):
            planner.adaptive.load_state_dict(state["adaptive"])


_POLICY_MARK = "_bigbatch_batchnorm_policy"


def _apply_batchnorm_policy_once(
    model: torch.nn.Module, policy: str, world_size: int, device_type: str
) -> torch.nn.Module:
    """`batchnorm.apply_policy` once per model: `fit` applies it before building the optimizer,
    the Trainer (for a model given directly) before DDP wrapping; a second call does nothing."""
    if getattr(distributed.unwrap(model), _POLICY_MARK, None) == policy:
        return model
    try:
        model = batchnorm_policies.apply_policy(
            model,
            policy,  # type: ignore[arg-type]
            world_size=world_size,
            device_type=device_type,
        )
    except ValueError as error:  # the policy does not fit this model: the config's to change
        raise UsageError(f"batchnorm: {error}") from error
    object.__setattr__(distributed.unwrap(model), _POLICY_MARK, policy)
    return model
