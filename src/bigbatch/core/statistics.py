"""The optional statistics of an Accumulator's steps, and the hooks they put on the model.

`StepStatistics` builds what the settings ask for -- the gradient noise scale, the window
BatchNorm statistics, the rank-divergence check -- and the ``batchnorm="freeze"`` hooks, and calls
every statistic at the points of the window that `bigbatch.core.window.WindowStatistics` names.
Their sums ride the step's one small all-reduce (`bigbatch.core.window.reduce_and_read`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bigbatch.core import batches, distributed
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core.divergence import DivergenceCheck, DivergenceStatistic
from bigbatch.core.noise import NoiseScaleMeter
from bigbatch.core.window import WindowStatistics


class StepStatistics:
    """The statistics one Accumulator gathers over each window, in the order they are reduced.

    Args:
        model: the model as the caller gave it.
        parameters: its trained parameters.
        batchnorm: the engine's BatchNorm policy (``"keep"``, ``"freeze"`` or ``"window"``).
        noise_smoothing_steps: measure the gradient noise scale with this moving-average window;
            None: do not measure it.
        check_ranks_every: compare the replicas' parameters every this many steps; None: never.

    Attributes:
        noise: the noise scale meter, or None.
        items: every statistic, those whose sums are read on the host first (so that the step's
            one host read is a prefix of the reduced sums).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        parameters: list[torch.nn.Parameter],
        *,
        batchnorm: str,
        noise_smoothing_steps: int | None,
        check_ranks_every: int | None,
    ) -> None:
        self._model = model
        self._checked_batchnorm = batchnorm != "keep"
        self._remove_hooks: list[Callable[[], None]] = []
        if batchnorm == "freeze":
            self._remove_hooks.append(batchnorm_policies.freeze(distributed.unwrap(model)))
        self.noise = (
            None
            if noise_smoothing_steps is None
            else NoiseScaleMeter(parameters, noise_smoothing_steps, model=model)
        )
        items: list[WindowStatistics] = [] if self.noise is None else [self.noise]
        if batchnorm == "window":
            items.append(batchnorm_policies.WindowBatchNormStatistics(model))
        if check_ranks_every is not None:
            check = DivergenceCheck(parameters, every_n_steps=check_ranks_every)
            items.append(DivergenceStatistic(check))
        self.items = sorted(items, key=lambda statistic: not statistic.host_sums)

    def warn_about_batchnorm_once(self, micro_batches: list[Any]) -> None:
        """Under ``batchnorm="keep"``, warn once when BatchNorm layers meet small micro-batches."""
        if self._checked_batchnorm:
            return
        self._checked_batchnorm = True
        rows = [batches.num_rows(micro_batch) for micro_batch in micro_batches]
        smallest = min((size for size in rows if size > 0), default=0)
        if smallest:
            batchnorm_policies.warn_small_micro_batches(distributed.unwrap(self._model), smallest)

    def begin_window(self) -> None:
        for statistic in self.items:
            statistic.begin_window()

    def begin_micro_step(self) -> None:
        for statistic in self.items:
            statistic.begin_micro_step()

    def end_micro_step(self, num_items: float | torch.Tensor) -> None:
        for statistic in self.items:
            statistic.end_micro_step(num_items)

    def end_window(self, sums: list[torch.Tensor], *, num_items: int, grad_norm: float) -> None:
        """Commit an applied step, with each statistic's sums over ranks (in `items` order)."""
        for statistic, reduced in zip(self.items, sums):
            statistic.end_window(reduced, num_items=num_items, grad_norm=grad_norm)

    def abort_window(self) -> None:
        for statistic in self.items:
            statistic.abort_window()

    def remove(self) -> None:
        """Remove every hook on the model: the statistics' and the ``freeze`` policy's."""
        for statistic in self.items:
            statistic.remove()
        for remove in self._remove_hooks:
            remove()
