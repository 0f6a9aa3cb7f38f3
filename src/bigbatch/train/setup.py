"""Setting up a run: the model placed, sharded or replicated, its BatchNorm policy, the engine.

`prepare_model` turns the user's model into what the loop trains: the config's BatchNorm policy
applied once, its activation checkpointing (before sharding or DDP), the model on its device,
sharded with FSDP2 (`parallelism: fsdp` over several ranks) or wrapped in
DistributedDataParallel (several ranks), the optimizer pointed at the sharded parameters.
`build_accumulator` builds the engine from the config. Nothing here runs a step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import Dataset

from bigbatch.choices import GradientSync
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core import compilation, distributed, replication, sharding
from bigbatch.core.checkpointing import (
    CheckpointingSummary,
    apply_activation_checkpointing,
    checkpointed_units,
    summarize_checkpointing,
)
from bigbatch.core.engine import Accumulator, LossFn
from bigbatch.planning.unit import BatchUnit, SampleUnit, TokenUnit
from bigbatch.tools.micro_setting import (
    planned_layout,
    probe_joint_setting,
    probe_micro_setting,
    probe_rows,
    share_in_rows,
)
from bigbatch.train.config import Config
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)

ShardUnits = Callable[[torch.nn.Module], list[torch.nn.Module]]
"""``shard_units(model)``: the modules `parallelism: fsdp` shards on their own before the root."""

_POLICY_MARK = "_bigbatch_batchnorm_policy"


@dataclass(frozen=True)
class PreparedModel:
    """The model as the loop trains it.

    Attributes:
        module: the model itself (unwrapped): what checkpoints, evaluation and the probe read.
        model: what runs the steps: the module, DDP around it, or the FSDP2-sharded module.
        device: where it runs.
        sharded: checkpoints go through torch.distributed.checkpoint (`parallelism: fsdp`, on
            one process too, so that they resume on any number of ranks).
        checkpointing: the activation checkpointing of its units (the probe's seam).
    """

    module: torch.nn.Module
    model: torch.nn.Module
    device: torch.device
    sharded: bool
    checkpointing: ActivationCheckpointing


class ActivationCheckpointing:
    """The run's activation checkpointing: the units it may checkpoint and the policy they run.

    `apply` is the one way to change it: at setup, and where a memory probe sets a candidate
    policy (it works on the model sharded or wrapped in DDP already); `summary` is what the run
    prints and reports.

    Args:
        module: the model (unwrapped).
        units: the recipe's shard units; None: the default finder, or a Hugging Face model's
            own layers (`bigbatch.core.checkpointing.apply_activation_checkpointing`).
    """

    def __init__(self, module: torch.nn.Module, units: list[torch.nn.Module] | None) -> None:
        self.module, self.units = module, units
        self.summary = summarize_checkpointing(module, "none", [], units)

    def apply(self, policy: str, reason: str = "") -> CheckpointingSummary:
        """Checkpoint the units as ``policy`` says (not "auto"), replacing the policy before."""
        wrapped = apply_activation_checkpointing(self.module, policy, self.units)
        self.summary = summarize_checkpointing(self.module, policy, wrapped, self.units, reason)
        return self.summary

    def keep_given(self) -> CheckpointingSummary | None:
        """A model that came checkpointed (`apply_activation_checkpointing`, a Hugging Face
        model's own method) keeps its checkpointing; None when it came without."""
        given = checkpointed_units(self.module)
        if not given:
            return None
        reason = (
            "the model came with these units checkpointed; activation_checkpointing none keeps them"
        )
        summary = summarize_checkpointing(self.module, "none", given, self.units, reason)
        self.summary = dataclasses.replace(summary, policy="as given")
        return self.summary


def resolve_checkpointing(config: Config) -> tuple[str, str]:
    """The policy to apply at setup, and why when the config says auto.

    auto is the memory probe's to choose with the micro-batch (micro_batch_size or
    micro_batch_tokens auto), through `ActivationCheckpointing.apply`: setup starts it at none,
    the policy the probe measures the micro-batch with until it chooses. With a given micro
    setting nothing is measured, and none is the fastest: a recompute only costs time.
    """
    policy = config.activation_checkpointing
    if policy != "auto":
        return policy, ""
    if "auto" in (config.micro_batch_size, config.micro_batch_tokens):
        return "none", "auto: none, the policy the memory probe measures the micro-batch with"
    return (
        "none",
        "auto: none, as the micro setting is given (no memory probe) and a recompute "
        "only costs time",
    )


def prepare_model(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    device: torch.device,
    shard_units: ShardUnits | None = None,
) -> PreparedModel:
    """The BatchNorm policy, activation checkpointing, then sharding (FSDP2) or replication
    (DDP) over the ranks.

    The parameters are kept (DDP) or rebound in the optimizer (FSDP2), so an optimizer built
    before stays valid.
    """
    world_size = distributed.get_world_size()
    model = apply_batchnorm_policy_once(model, config.batchnorm, world_size, device.type)
    unwrapped = distributed.unwrap(model)
    checkpointing = ActivationCheckpointing(
        unwrapped, None if shard_units is None else shard_units(unwrapped)
    )
    kept = checkpointing.keep_given() if config.activation_checkpointing == "none" else None
    summary = kept or checkpointing.apply(*resolve_checkpointing(config))
    if summary.policy != "none" or summary.reason:  # the default, none, goes without saying
        logger.info("activation_checkpointing %s", summary.describe())
    model = _shard(model, optimizer, config, device, world_size, shard_units)
    module = distributed.unwrap(model).to(device)
    if config.compile:
        _compile(model, module)
    runner: torch.nn.Module = model if distributed.is_ddp(model) else module
    if world_size > 1 and not distributed.is_ddp(model) and not sharding.is_fsdp(model):
        ids = [device.index] if device.type == "cuda" else None
        runner = replication.replicate(module, device_ids=ids)  # one gradient per rank
    sharded = sharding.is_fsdp(model) or config.parallelism == "fsdp"
    return PreparedModel(module, runner, device, sharded, checkpointing)


def _compile(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """compile: true: the module's forward compiled in place, before DDP wraps it."""
    if sharding.is_fsdp(model) or distributed.is_ddp(model):
        raise UsageError(
            "compile: true compiles the model before bigbatch wraps it in DDP; it is not "
            "available with parallelism fsdp over several ranks or a model wrapped already: "
            "set compile: false, or call bigbatch.core.compilation.compile_model yourself"
        )
    if compilation.is_compiled(module):  # a second run on the same model
        return
    compilation.compile_model(module)
    logger.info(
        "compile: the model's forward compiled with torch.compile (batch dimension dynamic)"
    )


def _shard(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    device: torch.device,
    world_size: int,
    shard_units: ShardUnits | None,
) -> torch.nn.Module:
    """parallelism fsdp over several ranks: fully_shard the units, then the root, and point
    the optimizer at the sharded parameters. One process runs the model unsharded."""
    if config.parallelism != "fsdp" or sharding.is_fsdp(model) or distributed.is_ddp(model):
        return model
    if world_size == 1:
        logger.warning("parallelism fsdp on one process: the model runs unsharded")
        return model
    model = model.to(device)
    before = {id(parameter): name for name, parameter in model.named_parameters()}
    units = (shard_units or sharding.default_shard_units)(model)
    sharding.shard_model(model, units, world_size=world_size, device_type=device.type)
    try:
        sharding.rebind_optimizer(optimizer, before, model)
    except ValueError as error:
        raise UsageError(f"parallelism fsdp: {error}") from error
    logger.info(
        "parallelism fsdp: %d shard units and the root over %d ranks", len(units), world_size
    )
    return model


def build_accumulator(
    prepared: PreparedModel,
    optimizer: torch.optim.Optimizer,
    config: Config,
    gradient_sync: GradientSync,
) -> Accumulator:
    """The engine of the run's steps, as the config asks (clipping, precision, BatchNorm,
    noise scale, gradient sync)."""
    engine_policy = config.batchnorm if config.batchnorm in ("freeze", "window") else "keep"
    return Accumulator(
        prepared.model,
        optimizer,
        max_grad_norm=config.max_grad_norm,
        precision=config.precision,
        batchnorm=engine_policy,
        measure_noise_scale=config.noise_scale,
        noise_smoothing_steps=config.noise_smoothing_steps,
        gradient_sync=gradient_sync,
        memory_budget_bytes=None if config.memory_budget == "auto" else int(config.memory_budget),
    )


def apply_batchnorm_policy_once(
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


class MicroBatchProbe:
    """``micro_batch_size: auto`` / ``micro_batch_tokens: auto``: the memory probe, agreed over
    ranks, run at most once by the planner.

    Besides the micro-batch it may choose the gradient sync (FSDP2 with ``gradient_sync: auto``
    compares both modes per rank): `gradient_sync` holds that choice once probed; and, with
    ``activation_checkpointing: auto``, the checkpointing policy (`probe_joint_setting`), applied
    to the model through its `ActivationCheckpointing` with the reason.
    """

    def __init__(
        self,
        prepared: PreparedModel,
        loss_fn: LossFn,
        dataset: Dataset[Any],
        optimizer: torch.optim.Optimizer,
        config: Config,
        *,
        collate_fn: Callable[[list[Any]], Any] | None,
        collate_packed: Callable[[list[list[Any]]], Any] | None,
    ) -> None:
        self.prepared, self.loss_fn, self.dataset = prepared, loss_fn, dataset
        self.optimizer, self.config = optimizer, config
        self.collate_fn, self.collate_packed = collate_fn, collate_packed
        self.world_size = distributed.get_world_size()
        self.gradient_sync: GradientSync | None = None

    def __call__(self, unit: BatchUnit) -> int:
        """The micro setting of the unit: micro_batch_size, or micro_batch_tokens (rows of the
        longest sample, packed or not)."""
        config, world_size = self.config, self.world_size
        lengths = cast(TokenUnit, unit).lengths if unit.name == "tokens" else None
        make_rows, row_tokens = probe_rows(
            self.dataset,
            self.collate_fn,
            lengths=lengths,
            collate_packed=self.collate_packed if config.packing else None,
        )
        if row_tokens is None:
            first = cast(SampleUnit, unit).first_global_batch
        else:
            first = config.global_batch_tokens
        assert first is not None
        probe = dict(
            row_tokens=row_tokens,
            max_rows=share_in_rows(first, world_size, row_tokens),
            memory_budget=config.memory_budget,
            optimize=config.optimize,
            optimizer=self.optimizer,
            device=self.prepared.device,
            **planned_layout(self.prepared.model, world_size, config.gradient_sync),
        )
        module, checkpointing = self.prepared.module, self.prepared.checkpointing
        if config.activation_checkpointing == "auto":  # chosen with the micro-batch
            joint = probe_joint_setting(
                module, self.loss_fn, make_rows, units=checkpointing.units, **probe
            )
            checkpointing.apply(joint.activation_checkpointing, f"auto: {joint.reason}")
            choice = joint.choice
        else:
            choice = probe_micro_setting(module, self.loss_fn, make_rows, **probe)
        self.gradient_sync = choice.gradient_sync
        return choice.value


def check_run_length(config: Config) -> None:
    """A run needs its global batch and its length, from the config or the recipe."""
    if config.global_batch_size is None and config.global_batch_tokens is None:
        raise UsageError(
            "global_batch_size: not set by the config nor the recipe; set it (or "
            "global_batch_tokens)"
        )
    if config.max_steps is None and config.epochs is None:
        raise UsageError("max_steps: set max_steps or epochs (neither is set)")
