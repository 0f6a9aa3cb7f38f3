"""A token run's global batch of every step, its plan, and the learning rate that follows.

`TokenBatchPlanner` is `bigbatch.train.schedules.BatchPlanner` for `global_batch_tokens`: the
budget of each step (constant, `batch_size_schedule` stages or the adaptive controller, all in
tokens), each step's `TokenPlan` from its samples' lengths, `micro_batch_tokens` (given, or probed
once for `auto`), and warm-up / decay counted in input tokens, so a global batch that changes does
not shift them. docs/tokens.md describes the whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bigbatch.core.engine import LossFn
from bigbatch.core.noise import NoiseScale
from bigbatch.data.token_loader import TokenWindowLoader
from bigbatch.data.token_plan import TokenBudget, TokenPlan, plan_tokens
from bigbatch.data.tokens import (
    TokenBatchSampler,
    check_lengths,
    count_token_steps,
    token_batch_sizes,
)
from bigbatch.tools.micro_setting import probe_micro_setting, probe_rows
from bigbatch.train.config import Config
from bigbatch.train.environment import planned_layout
from bigbatch.train.schedules import (
    AdaptiveBatchSize,
    BatchSizeSchedule,
    adascale_gain,
    progress_factor,
    scale_learning_rate,
)
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)


class TokenBatchPlanner:
    """The token budget of every step, its plan, and the step's learning rate.

    Args:
        config: the run's configuration (global_batch_tokens set).
        world_size: number of ranks.
        lengths: input tokens of every training sample, in index order.
        probe: ``probe(lengths)``: micro_batch_tokens for ``micro_batch_tokens: auto``.
    """

    def __init__(
        self,
        config: Config,
        world_size: int,
        lengths: Sequence[int] | np.ndarray,
        probe: Callable[[np.ndarray], int],
    ) -> None:
        assert config.global_batch_tokens is not None
        self.config, self.world_size, self._probe = config, world_size, probe
        self.lengths = check_lengths(lengths)
        self.longest = int(self.lengths.max())
        given = config.batch_size_schedule
        stages = list(given) if isinstance(given, list) else []
        if not stages or stages[0][0] != 0:
            stages.insert(0, (0, config.global_batch_tokens))
        self.schedule = BatchSizeSchedule.from_value([list(stage) for stage in stages])
        self.first_global_batch_tokens = self.schedule.at(0)
        self.adaptive: AdaptiveBatchSize | None = None  # built once micro_batch_tokens is known
        self._micro_batch_tokens: int | None = None
        self._run_tokens: dict[int, int] = {}
        if isinstance(config.micro_batch_tokens, int):
            self._check_micro_batch_tokens(config.micro_batch_tokens)

    @property
    def first_global_batch_size(self) -> int:
        """The schedule's first value, in the run's unit (tokens): what the trainer reads."""
        return self.first_global_batch_tokens

    def _check_micro_batch_tokens(self, value: int) -> None:
        if value < self.longest:
            raise UsageError(
                f"micro_batch_tokens {value} is below the longest training sample "
                f"({self.longest} tokens), which must fit one micro-batch: set micro_batch_tokens "
                f">= {self.longest} (or auto), or shorten the longest samples"
            )

    def at(self, step: int) -> int:
        """The global batch in tokens of a 0-based step."""
        return self.adaptive.at(step) if self.adaptive is not None else self.schedule.at(step)

    @property
    def micro_batch_tokens(self) -> int | None:
        """Padded tokens per micro-batch (given or probed once); None: a rank's whole share."""
        value = self.config.micro_batch_tokens
        if isinstance(value, int):
            return value
        if value == "auto" and self._micro_batch_tokens is None:
            self._micro_batch_tokens = self._probe(self.lengths)
        return self._micro_batch_tokens

    @micro_batch_tokens.setter
    def micro_batch_tokens(self, value: int) -> None:
        self._micro_batch_tokens = value  # a resumed run's probed value: no second memory probe

    @property
    def micro_batch_size(self) -> int:
        """Rows of a micro-batch at the longest sample (evaluation batches, BatchNorm's check)."""
        return self.plan_for(self.first_global_batch_tokens).micro_batch_size

    def plan_for(self, global_batch_tokens: int) -> TokenBudget:
        """What every step of this budget shares (each step's split follows its lengths)."""
        return TokenBudget(
            global_batch_tokens,
            self.world_size,
            self.micro_batch_tokens,
            self.config.packing,
            self.longest,
        )

    def plan_tokens(self, global_batch_tokens: int, lengths: Sequence[int]) -> TokenPlan:
        """The plan of one global batch: ranks balanced by tokens, micro-batches by padding."""
        packing = self.config.packing
        return plan_tokens(
            lengths,
            self.world_size,
            self.micro_batch_tokens,
            packing=packing,
            row_tokens=self.longest if packing else None,
            global_batch_tokens=global_batch_tokens,
        )

    def start(self) -> TokenBudget:
        """The first step's budget plan (probing memory once if auto); starts the adaptive one."""
        first = self.plan_for(self.first_global_batch_tokens)
        config = self.config
        if config.batch_size_schedule == "adaptive":
            assert config.max_global_batch_tokens is not None
            self.adaptive = AdaptiveBatchSize(
                self.first_global_batch_tokens,
                config.min_global_batch_tokens or self.first_global_batch_tokens,
                config.max_global_batch_tokens,
                granularity=(self.micro_batch_tokens or self.longest) * self.world_size,
                adapt_every=config.adapt_every,
            )
        return first

    def total_steps(self) -> int:
        """Optimizer steps of the run (max_steps, or what `epochs` take; adaptive: an estimate)."""
        config = self.config
        if config.max_steps is not None:
            return config.max_steps
        assert config.epochs is not None
        return count_token_steps(
            self.lengths, config.epochs, self.at, seed=config.seed, drop_last=config.drop_last
        )

    def finished(self, step: int, sampler: Any, total_steps: int) -> bool:
        """All steps done; adaptive: all epochs done (the number of steps is not known ahead)."""
        if self.adaptive is None:
            return step >= total_steps
        assert self.config.epochs is not None and isinstance(sampler, TokenBatchSampler)
        return sampler.next_epoch_tokens(self.at(step)) >= self.config.epochs

    def run_tokens(self, total_steps: int) -> int:
        """Input tokens of the whole run: of its steps' global batches, or epochs x the dataset."""
        if self.adaptive is not None:
            return (self.config.epochs or 0) * int(self.lengths.sum())
        if total_steps not in self._run_tokens:
            sizes = token_batch_sizes(
                self.lengths,
                self.at,
                steps=total_steps,
                seed=self.config.seed,
                drop_last=self.config.drop_last,
            )
            self._run_tokens[total_steps] = sum(tokens for _, tokens in sizes)
        return self._run_tokens[total_steps]

    def learning_rate(
        self,
        base_lr: float,
        step: int,
        total_steps: int,
        tokens_before: int,
        noise: NoiseScale | None,
        items_per_token: float = 1.0,
    ) -> float:
        """base_lr x lr_scaling rule (or AdaScale's gain) x warm-up/decay, for one step.

        Warm-up lasts warmup_steps x the first global_batch_tokens input tokens and the decay
        runs over the rest of the run's tokens, whatever each step's budget; the scaling rule
        compares the step's budget with lr_scaling.base_batch_size in tokens (auto: the first).
        """
        config, budget = self.config, self.at(step)
        base = config.lr_scaling.base_batch_size
        base_tokens = self.first_global_batch_tokens if base == "auto" else base
        factor = progress_factor(
            tokens_before,
            budget,
            self.run_tokens(total_steps),
            config.warmup_steps * self.first_global_batch_tokens,
            config.lr_schedule,
        )
        rule = config.lr_scaling.rule
        if rule != "adascale":
            return scale_learning_rate(base_lr, budget, base_tokens, rule) * factor
        gain = 1.0
        if noise is not None:
            base_items = base_tokens * items_per_token
            trace = noise.trace_covariance / base_items
            gain = adascale_gain(budget / base_tokens, noise.gradient_sq_norm, trace)
        return base_lr * gain * factor

    def window_loader(
        self,
        dataset: Dataset[Any],
        *,
        rank: int,
        collate_fn: Callable[[list[Any]], Any] | None,
        collate_packed: Callable[[list[list[Any]]], Any] | None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> TokenWindowLoader:
        """This rank's windows of the run, from step 0 (load a checkpoint's position to resume)."""
        if self.config.packing and collate_packed is None:
            raise UsageError(
                "packing: the recipe has no collate_packed, so its model cannot read packed rows "
                "(positions restarting and attention within each sequence); set packing false"
            )
        return TokenWindowLoader(
            dataset,
            lengths=self.lengths,
            plan_for=self.plan_tokens,
            global_batch_tokens_at=self.at,
            seed=self.config.seed,
            rank=rank,
            collate_fn=collate_fn,
            collate_packed=collate_packed if self.config.packing else None,
            drop_last=self.config.drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )


def probe_micro_batch_tokens(
    module: torch.nn.Module,
    loss_fn: LossFn,
    dataset: Dataset[Any],
    lengths: np.ndarray,
    *,
    config: Config,
    collate_fn: Callable[[list[Any]], Any] | None,
    collate_packed: Callable[[list[list[Any]]], Any] | None,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    world_size: int,
) -> int:
    """micro_batch_tokens auto: the probe on rows of the longest sample, agreed over ranks."""
    assert config.global_batch_tokens is not None
    make_rows, longest = probe_rows(
        dataset,
        collate_fn,
        lengths=lengths,
        collate_packed=collate_packed if config.packing else None,
    )
    assert longest is not None
    return probe_micro_setting(
        module,
        loss_fn,
        make_rows,
        row_tokens=longest,
        max_rows=max(1, math.ceil(config.global_batch_tokens / world_size) // longest),
        memory_budget=config.memory_budget,
        optimize=config.optimize,
        optimizer=optimizer,
        device=device,
        **planned_layout(config, module, world_size),
    ).value
