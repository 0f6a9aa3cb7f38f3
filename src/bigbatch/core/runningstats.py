"""BatchNorm's running-statistics update, written once for the layers bigbatch updates itself.

The `window` BatchNorm policy (one update per step from the pooled window) and
`CrossRankBatchNorm` (one update per forward from every rank's inputs) both move a layer's
running statistics as torch's BatchNorm does after one training forward over the same values.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def update_running_statistics(
    layer: _BatchNorm, count: torch.Tensor, mean: torch.Tensor, sum_sq_deviations: torch.Tensor
) -> None:
    """One update of the layer's running statistics from ``count`` values per channel.

    As torch's BatchNorm: running_var moves towards the unbiased variance
    ``sum_sq_deviations / (count - 1)``, by the layer's momentum, or by 1 / num_batches_tracked
    (the cumulative average) when momentum is None; num_batches_tracked counts the update. A layer
    that saw no value (count 0) or whose statistics are not finite keeps its running statistics
    and its count, decided on the device (no host sync). Computed in float64, stored in the
    buffers' dtype. Layers without running statistics are left alone.

    Args:
        layer: the BatchNorm layer.
        count: values per channel, a scalar tensor.
        mean: their per-channel mean.
        sum_sq_deviations: their per-channel sum of squared deviations from ``mean``.
    """
    if layer.running_mean is None or layer.running_var is None:
        return
    assert layer.num_batches_tracked is not None
    count = count.to(torch.float64)
    mean = mean.to(torch.float64)
    unbiased = sum_sq_deviations.to(torch.float64) / (count - 1).clamp(min=1)
    valid = (count > 0) & torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
    tracked = layer.num_batches_tracked + valid.to(layer.num_batches_tracked.dtype)
    if layer.momentum is None:  # cumulative moving average: factor 1 / batches seen
        factor = 1.0 / tracked.clamp(min=1).to(torch.float64)
    else:
        factor = torch.full_like(count, float(layer.momentum))
    factor = torch.where(valid, factor, torch.zeros_like(factor))
    for running, value in ((layer.running_mean, mean), (layer.running_var, unbiased)):
        old = running.to(torch.float64)
        # torch's own form, (1 - factor) * old + factor * new; `where` keeps a NaN out.
        new = torch.where(valid, (1 - factor) * old + factor * value, old)
        running.copy_(new.to(running.dtype))
    layer.num_batches_tracked.copy_(tracked)
