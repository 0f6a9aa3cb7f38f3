"""The trainer: wires a run together and runs it -- set up, plan, restore, loop, finish.

`Trainer` runs anyone's model, optimizer, loss_fn and datasets under a `Config`; `fit(config)`
builds them from a recipe (what the CLI calls). The trainer computes nothing itself: setting up
is `setup`, each step's global batch and learning rate the planner's, the loop `loop.Loop`, what
happens after a step `hooks`, saving and restoring the checkpointer's over its Stateful
participants. A run resumed from its newest valid checkpoint ends bitwise equal to an
uninterrupted one (CPU, same world size): weights, optimizer, engine state, data position, the
adaptive batch and every RNG stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core import distributed, sharding
from bigbatch.core.engine import LossFn
from bigbatch.data.loader import WindowLoader
from bigbatch.recipes import EvalFn
from bigbatch.train import checkpoint, environment, evaluation, packages, rundir, setup
from bigbatch.train import metrics as run_metrics
from bigbatch.train import resume as resume_rules
from bigbatch.train.checkpointer import Checkpointer, DamagedCheckpoint
from bigbatch.train.config import Config
from bigbatch.train.configfile import config_to_yaml
from bigbatch.train.early_warning import EarlyWarning
from bigbatch.train.finish import final_weights, finish_run_dir, noise_scale_summary, summarize
from bigbatch.train.hooks import CheckpointHook, EvaluationHook, MetricsHook, StopHook
from bigbatch.train.loop import Loop, NonFiniteError, StepHook
from bigbatch.train.planner import BatchPlanner
from bigbatch.train.preemption import RunStopped, StopSignals
from bigbatch.train.state import RunSummary, SessionFigures, TrainState
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "RunStopped", "RunSummary", "Trainer"]


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
        shard_units: setup.ShardUnits | None = None,
    ) -> None:
        setup.check_run_length(config)
        environment.check_num_workers(config.num_workers)
        self.config = config
        self.loss_fn, self.eval_fn, self.collate_fn = loss_fn, eval_fn, collate_fn
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_packed = collate_packed
        self.run_dir = rundir.check_run_dir(run_dir) if run_dir is not None else None
        self.progress, self.name = progress, name
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        device = environment.resolve_device(config.device)
        environment.apply_threads(config.threads)
        prepared = setup.prepare_model(model, optimizer, config, device, shard_units)
        self.module, self.model, self.device = prepared.module, prepared.model, device
        self.prepared = prepared  # its checkpointing: set up here, perhaps chosen by the probe
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", float(group["lr"]))
        probe = setup.MicroBatchProbe(
            prepared,
            loss_fn,
            train_dataset,
            optimizer,
            config,
            collate_fn=collate_fn,
            collate_packed=collate_packed,
        )
        self.planner = BatchPlanner(
            config, self.world_size, train_dataset, sample_length=sample_length, probe=probe
        )
        self.unit = self.planner.unit.name
        self.first_global = self.planner.first_global_batch
        if config.warmup_steps and config.batch_size_schedule != "adaptive":
            self.planner.total_steps()  # refuses a warm-up beyond the run now, not after a probe
        probes_sync = config.gradient_sync == "auto" and config.micro_batch_size == "auto"
        if probes_sync and sharding.is_fsdp(self.model) and self.unit == "samples":
            # The probe compares both sync modes per rank: it runs before the engine is built.
            self.planner.micro_batch_size  # noqa: B018
        gradient_sync = probe.gradient_sync or config.gradient_sync
        self.accumulator = setup.build_accumulator(prepared, optimizer, config, gradient_sync)
        self.early_warning = EarlyWarning()
        self._total_steps = 0  # the run's, once known: what its checkpoints record

    @property
    def _writes(self) -> bool:
        """This process writes the run's files: rank 0 of a run with a directory."""
        return self.run_dir is not None and distributed.is_main_process()

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
                packages.check_trackers(self.config)  # before the lock: nothing written on refusal
                stack.enter_context(rundir.RunLock(self.run_dir))
            stop = stack.enter_context(StopSignals(self.config.stop_signals))
            return self._fit(stop, resume=resume, overwrite=overwrite)

    def _fit(self, stop: StopSignals, *, resume: bool, overwrite: bool) -> RunSummary:
        """`fit` inside the lock and the signal handlers."""
        writes = self._writes
        if self.run_dir is not None:
            rundir.prepare_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            if distributed.is_initialized():
                dist.barrier()  # every rank has checked the directory before rank 0 writes
        found, first_plan, loader, state, checkpoints = self._start(stop, resume)
        if self.config.batchnorm != "freeze":  # the engine warns again per window otherwise
            batchnorm_policies.warn_small_micro_batches(self.module, first_plan.micro_batch_size)
        total = self._total_steps = self.planner.total_steps()
        if found is not None:
            resume_rules.warn_if_schedule_moves(found, self.config, total, loader.step)
            if self.planner.finished(loader.step, loader, total):
                return self._already_finished(loader.step, state, first_plan.to_dict())
        if writes:
            assert self.run_dir is not None
            with rundir.storage_errors(f"write {self.run_dir / 'config.yaml'}"):
                (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
        logger.info("plan of the first step:\n%s", first_plan)
        resumed = None if found is None else found.step
        summary = self._train(loader, state, checkpoints, stop, resumed, first_plan.to_dict())
        final_state = final_weights(self.module) if self.run_dir is not None else None
        if writes:
            self._finish_run_dir(summary, final_state)
        if stop.active and (late := stop.agreed()):  # during the last step: finished, then stop
            raise RunStopped(
                late, loader.step, total, None, moment="end", run_dir=self.run_dir, summary=summary
            )
        return summary

    def _train(
        self,
        loader: WindowLoader,
        state: TrainState,
        checkpoints: CheckpointHook | None,
        stop: StopSignals,
        resumed: int | None,
        first_plan: dict[str, Any],
    ) -> RunSummary:
        """The loop with its hooks, then the last evaluation and checkpoint: what the run did."""
        writes = self._writes
        total = self._total_steps
        metrics_logger = run_metrics.MetricsLogger(
            self.run_dir or Path("."),
            enabled=writes,
            resume_step=resumed,
            trackers=self.config.trackers,
            config=self.config.model_dump(mode="json"),
        )
        bar = run_metrics.ProgressBar(total, initial=loader.step, enabled=self.progress and writes)
        figures = SessionFigures()
        hooks: list[StepHook] = [
            MetricsHook(metrics_logger, bar, self.early_warning, self.device, self.unit),
            EvaluationHook(self.config.eval_every, self.evaluate, metrics_logger),
            *([checkpoints] if checkpoints is not None else []),
            StopHook(stop),
        ]
        loop = Loop(
            self.accumulator,
            self.planner,
            self.loss_fn,
            self.optimizer,
            self.device,
            self.config,
            self.unit,
        )
        try:
            if stop.active and (early := stop.agreed()):  # before the first step: nothing trained
                raise RunStopped(
                    early, loader.step, total, None, moment="start", run_dir=self.run_dir
                )
            stopped_by = loop.run(loader, total, state, figures, hooks)
            if stopped_by:
                saved = checkpoints.save_unless_saved(loader.step) if checkpoints else None
                raise RunStopped(stopped_by, loader.step, total, saved)
            eval_metrics = self.evaluate()
            if eval_metrics:
                metrics_logger.log_eval(loader.step, eval_metrics)
            if checkpoints is not None:
                checkpoints.save_unless_saved(loader.step)
        finally:
            bar.close()
            metrics_logger.close()
            if checkpoints is not None:
                checkpoints.close()  # a background write still running ends before the run does
        return self._summary(loader.step, state, first_plan, figures, eval_metrics, resumed=resumed)

    def _window_loader(self, worker_ignored_signals: Any = ()) -> WindowLoader:
        """This rank's windows from step 0 (data workers leave stop signals to this process)."""
        return self.planner.window_loader(
            self.train_dataset,
            rank=self.rank,
            collate_fn=self.collate_fn,
            collate_packed=self.collate_packed,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_ignored_signals=worker_ignored_signals,
        )

    def evaluate(self) -> dict[str, float]:
        """Loss (loss_fn sums / items) and eval_fn metrics on the eval set, over every rank."""
        if self.eval_dataset is None:
            return {}
        return evaluation.evaluate(
            self.module,
            self.loss_fn,
            self.eval_fn,
            self.eval_dataset,
            micro_batch_size=self.planner.micro_batch_size,
            precision=self.config.precision,
            collate_fn=self.collate_fn,
            equal_forwards=sharding.is_fsdp(self.module),
        )

    # -- checkpoints, the run directory and the summary ----------------------------------------

    def _start(
        self, stop: StopSignals, resume: bool
    ) -> tuple[checkpoint.Checkpoint | None, Any, WindowLoader, TrainState, CheckpointHook | None]:
        """The run's parts, restored from the newest checkpoint that restores on every rank (one
        that fails to is damaged: the previous one is tried); call on every rank."""
        damaged: dict[Path, str] = {}  # those that failed to restore
        while True:
            found = self._newest_checkpoint(damaged) if resume else None
            if found is not None:  # the probed micro setting comes back: no second memory probe
                self.planner.load_state_dict(found.training_state["planner"])
            first_plan = self.planner.start()  # probes memory once if auto
            loader = self._window_loader(stop.signals)
            # Training draws (dropout, ...) from a per-rank stream, reproducible on resume.
            environment.seed_everything(self.config.seed + 1_000_003 * self.rank)
            state = TrainState()
            checkpoints = self._checkpoints(loader, state)
            if found is None or checkpoints is None:
                return found, first_plan, loader, state, checkpoints
            try:
                checkpoints.checkpointer.restore(found)  # every participant, the weights, the RNG
            except DamagedCheckpoint as error:
                logger.warning("cannot restore %s: %s", found.path, error.reason)
                damaged[found.path] = error.reason
                continue
            resume_rules.set_aside_everywhere(found.skipped)
            checkpoints.saved_step = found.step
            logger.info("resumed from %s at step %d", found.path, found.step)
            return found, first_plan, loader, state, checkpoints

    def _newest_checkpoint(self, damaged: dict[Path, str]) -> checkpoint.Checkpoint | None:
        """The newest valid checkpoint of this run (call on every rank); None: none."""
        num_samples = len(self.train_dataset)  # type: ignore[arg-type]
        return resume_rules.load(self.run_dir, self.config, self.module, num_samples, damaged)

    def _checkpoints(self, loader: WindowLoader, state: TrainState) -> CheckpointHook | None:
        """The run's checkpoints and everything with state, in restore order; None without a
        run directory."""
        if self.run_dir is None:
            return None
        checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            model=self.module,
            optimizer=self.optimizer,
            sharded=self.prepared.sharded,
            keep=self.config.keep_checkpoints,
            collective_timeout_s=self.config.collective_timeout,
        )
        checkpointer.register("accumulator", self.accumulator)
        checkpointer.register("data", loader)
        checkpointer.register("counters", state)
        checkpointer.register("early_warning", self.early_warning)
        checkpointer.register("planner", self.planner)

        def extra(step: int) -> dict[str, Any]:
            planner = self.planner
            return {
                "plan": planner.plan_for(planner.at(max(0, step - 1))).to_dict(),
                "config": self.config.model_dump(mode="json"),
                "total_steps": self._total_steps,
            }

        every, background = self.config.checkpoint_every, self.config.checkpoint_async
        return CheckpointHook(checkpointer, every, extra, background=background)

    def _summary(
        self,
        steps: int,
        state: TrainState,
        first_plan: dict[str, Any],
        figures: SessionFigures,
        eval_metrics: dict[str, float],
        *,
        resumed: int | None,
    ) -> RunSummary:
        noise_summary = noise_scale_summary(
            self.accumulator.noise_scale(),
            self.planner,
            steps,
            state.progress(self.unit)[1],
            self.unit,
        )
        return summarize(
            steps=steps,
            state=state,
            figures=figures,
            first_plan=first_plan,
            first_global_batch=self.first_global,
            eval_metrics=eval_metrics,
            device=self.device,
            run_dir=self.run_dir,
            name=self.name,
            resumed=resumed,
            noise_scale=noise_summary,
            checkpointing=self.prepared.checkpointing.summary.describe(),
        )

    def _already_finished(
        self, steps: int, state: TrainState, first_plan: dict[str, Any]
    ) -> RunSummary:
        """Resuming a finished run: nothing to train or evaluate again; the report stays."""
        assert self.run_dir is not None
        logger.info("the run in %s is finished (step %d): nothing to do", self.run_dir, steps)
        summary = self._summary(steps, state, first_plan, SessionFigures(), {}, resumed=steps)
        if distributed.rank_0_value(not (self.run_dir / rundir.FINAL_WEIGHTS).exists()):
            final_state = final_weights(self.module)  # a collective under FSDP
            if self._writes:  # it stopped between its last checkpoint and the end
                self._finish_run_dir(summary, final_state)
        return summary

    def _finish_run_dir(
        self, summary: RunSummary, final_state: dict[str, torch.Tensor] | None
    ) -> None:
        assert self.run_dir is not None
        finish_run_dir(
            self.run_dir,
            self.module,
            summary,
            config=self.config.model_dump(mode="json"),
            device=self.device,
            final_state=final_state,
        )
