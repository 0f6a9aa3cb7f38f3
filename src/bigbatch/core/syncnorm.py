"""Cross-rank BatchNorm on any device: the `sync` policy where torch's SyncBatchNorm cannot run.

torch's SyncBatchNorm reduces only GPU tensors. `CrossRankBatchNorm` normalises each micro-step
with the statistics of that micro-step's inputs on every rank -- the count, the mean and the
variance pooled exactly, in two small differentiable all-reduces (sum, then squared deviations
from the global mean, which keeps the variance accurate) -- so it runs over gloo on CPUs too.
Gradients flow back through the all-reduces, as they do through SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from bigbatch.core import distributed, runningstats


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced)
        return reduced

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(gradient)  # type: ignore[no-any-return]


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)  # type: ignore[no-any-return]


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm over the inputs of every rank at once (any number of dimensions, any device).

    Outside training, or without a process group of more than one rank, it is plain BatchNorm.
    Every rank must run the same number of forwards: an empty micro-batch (0 rows) still joins.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        local_count = input.numel() // max(channels, 1)
        sums = torch.cat([input.sum(dims), input.new_full((1,), float(local_count))])
        sums = _all_reduce_sum(sums)
        count = sums[-1]
        mean = sums[:channels] / count
        squared = _all_reduce_sum((input - mean.view(shape)).square().sum(dims))
        variance = squared / count  # biased: what the forward normalises with
        runningstats.update_running_statistics(
            self, count.detach(), mean.detach(), squared.detach()
        )
        output = (input - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm layer by a `CrossRankBatchNorm` sharing its parameters, buffers."""
    if isinstance(module, _BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        replacement = CrossRankBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=None,
        )
        replacement.weight, replacement.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(replacement, name, getattr(module, name))
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert(child))
    return module


def has_cross_rank_layers(model: torch.nn.Module) -> bool:
    """True when forwards of the model run collectives (SyncBatchNorm or CrossRankBatchNorm)."""
    return any(
        isinstance(module, (torch.nn.SyncBatchNorm, CrossRankBatchNorm))
        for module in model.modules()
    )
