"""BatchNorm under accumulation: detection, a warning, and the `batchnorm` policies.

BatchNorm normalises with the statistics of the micro-batch, not the global batch, so accumulation
is not equivalent to one big batch for models that use it. This module finds BatchNorm layers,
warns once when micro-batches are small, and applies a policy: keep, sync (SyncBatchNorm on CUDA,
`syncnorm.CrossRankBatchNorm` elsewhere), freeze (running statistics), groupnorm (replace), or
window (`WindowBatchNormStatistics`: running statistics updated once per step from the inputs
each layer saw in the window; see docs/batchnorm.md for where that equals one big forward).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from bigbatch.choices import BATCHNORM_POLICIES, ENGINE_BATCHNORM_POLICIES, BatchNormPolicy
from bigbatch.core import checkpointing, distributed, runningstats, syncnorm

logger = logging.getLogger(__name__)

MAX_GROUPS = 32
MIN_CHANNELS_PER_GROUP = 4
_WARNED_ATTRIBUTE = "_bigbatch_batchnorm_warned"
_FROZEN_ATTRIBUTE = "_bigbatch_batchnorm_frozen"


def find_batchnorm(model: torch.nn.Module) -> list[str]:
    """Names of the BatchNorm layers (any ``_BatchNorm``, SyncBatchNorm included) of the model."""
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


def warn_small_micro_batches(
    model: torch.nn.Module, micro_batch_size: int, threshold: int = 16
) -> bool:
    """Warn once per model when its BatchNorm layers see micro-batches below ``threshold``.

    The warning (a UserWarning: the user can act on it) names the layers and the `batchnorm`
    options. Layers held by the `freeze` policy do not count: they use no batch statistics.

    Returns:
        True when this call warned.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) and not is_frozen(module)
    ]
    if not names or micro_batch_size >= threshold or getattr(model, _WARNED_ATTRIBUTE, False):
        return False
    object.__setattr__(model, _WARNED_ATTRIBUTE, True)  # a plain flag, not a module attribute
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    options = "\n".join(f"  {name}: {effect}" for name, effect in BATCHNORM_POLICIES.items())
    message = (
        f"{len(names)} BatchNorm layer(s) ({shown}) normalise with micro-batches of "
        f"{micro_batch_size} < {threshold} items, not with the global batch: accumulation is not "
        "equivalent to one big batch, and small micro-batches can make training unstable, above "
        "all where BatchNorm sees few values per channel (BatchNorm1d); see docs/batchnorm.md. "
        f"Choose a batchnorm policy:\n{options}"
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    return True


def check_engine_policy(policy: str) -> None:
    """Raise unless the engine can apply the policy itself (``Accumulator(batchnorm=...)``).

    Raises:
        ValueError: ``sync`` and ``groupnorm`` (they change the layers, before DDP and the
            optimizer), or an unknown policy.
    """
    if policy in ("sync", "groupnorm"):
        raise ValueError(
            f"batchnorm={policy!r} changes the model's layers: call "
            f"bigbatch.core.batchnorm.apply_policy(model, {policy!r}) before wrapping the "
            "model in DDP and building the optimizer, then pass batchnorm='keep'"
        )
    if policy not in ENGINE_BATCHNORM_POLICIES:
        raise ValueError(
            f"batchnorm must be one of {', '.join(ENGINE_BATCHNORM_POLICIES)}, got {policy!r}"
        )


def mark_warned(model: torch.nn.Module) -> None:
    """Count the model (and copies made from it afterwards) as told: no small-micro-batch warning.

    For tools that report BatchNorm themselves, such as `bigbatch verify`.
    """
    object.__setattr__(model, _WARNED_ATTRIBUTE, True)


def is_frozen(module: torch.nn.Module) -> bool:
    """True for a BatchNorm layer that the `freeze` policy holds on its running statistics."""
    return bool(getattr(module, _FROZEN_ATTRIBUTE, False))


def group_count(num_channels: int) -> int:
    """GroupNorm groups replacing a BatchNorm of ``num_channels``.

    The largest divisor of num_channels that is at most 32 (GroupNorm's usual count, Wu and He
    2018) and leaves at least 4 channels per group: one channel per group would normalise every
    feature of a BatchNorm1d to a constant. 1 group (LayerNorm-like) when no such divisor exists.

    Example:
        >>> [group_count(c) for c in (3, 16, 64, 256, 30)]
        [1, 4, 16, 32, 6]
    """
    for groups in range(min(MAX_GROUPS, num_channels // MIN_CHANNELS_PER_GROUP), 0, -1):
        if num_channels % groups == 0:
            return groups
    return 1


def _frozen_pre_hook(module: torch.nn.Module, args: Any) -> None:
    # Runs before every forward, so a later model.train() cannot bring batch statistics back.
    module.training = False


def freeze(model: torch.nn.Module) -> Callable[[], None]:
    """The `freeze` policy: every BatchNorm layer normalises with its running statistics.

    Each layer goes to eval mode and gets a forward pre-hook that keeps it there, so a later
    ``model.train()`` cannot bring batch statistics back. Layers frozen before are left as they
    are.

    Returns:
        A callable that removes the hooks this call added (idempotent); the layers stay in eval
        mode until the next ``model.train()``.

    Raises:
        ValueError: a BatchNorm layer has no running statistics.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    for name, module in layers:  # all checked before any is changed
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"batchnorm='freeze' needs running statistics, but layer {name!r} has "
                "track_running_stats=False; use batchnorm='groupnorm' instead"
            )
    added: list[tuple[torch.nn.Module, RemovableHandle]] = []
    for _, module in layers:
        if not getattr(module, _FROZEN_ATTRIBUTE, False):
            added.append((module, module.register_forward_pre_hook(_frozen_pre_hook)))
            object.__setattr__(module, _FROZEN_ATTRIBUTE, True)
        module.eval()
    if layers:
        logger.info("batchnorm=freeze: %d layer(s) use their running statistics", len(layers))

    def unfreeze() -> None:
        for module, handle in added:
            handle.remove()
            object.__setattr__(module, _FROZEN_ATTRIBUTE, False)
        added.clear()

    return unfreeze


def _to_groupnorm(module: torch.nn.Module, prefix: str = "") -> torch.nn.Module:
    if isinstance(module, _BatchNorm):
        channels = module.num_features
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(
                f"batchnorm='groupnorm' needs the channel count of layer {prefix or 'model'!r}, "
                f"got num_features={channels!r}: run one forward first (lazy BatchNorm)"
            )
        replacement = torch.nn.GroupNorm(
            group_count(channels), channels, eps=module.eps, affine=module.affine
        )
        if module.affine:
            # The same Parameter objects: trainable, and any optimizer already holding them works.
            replacement.weight = module.weight
            replacement.bias = module.bias
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _to_groupnorm(child, f"{prefix}.{name}" if prefix else name))
    return module


def apply_policy(
    model: torch.nn.Module,
    policy: BatchNormPolicy,
    *,
    world_size: int = 1,
    device_type: str | None = None,
) -> torch.nn.Module:
    """Apply a `batchnorm` policy; call before DDP wrapping and before building the optimizer.

    Args:
        model: the unwrapped model.
        policy: one of `bigbatch.choices.BATCHNORM_POLICIES`;
            ``window`` also needs a `WindowBatchNormStatistics` in the training loop.
        world_size: number of ranks; ``sync`` has no effect with 1.
        device_type: where the model will train (default: cuda when available): ``sync`` uses
            torch's SyncBatchNorm on CUDA and `bigbatch.core.syncnorm.CrossRankBatchNorm` elsewhere.

    Returns:
        The model to train: the same object, except for ``sync`` and a model that is itself a
        BatchNorm layer (then a new module; parameters are shared, never copied).
    """
    if policy not in BATCHNORM_POLICIES:
        raise ValueError(
            f"batchnorm must be one of {', '.join(BATCHNORM_POLICIES)}, got {policy!r}"
        )
    if distributed.is_ddp(model) and policy in ("sync", "groupnorm"):
        raise ValueError(
            f"batchnorm={policy!r} must be applied to the model before wrapping it in "
            "DistributedDataParallel: apply_policy(model, ...) first, then wrap the result"
        )
    names = find_batchnorm(model)
    if policy in ("keep", "window") or not names:
        return model
    if policy == "freeze":
        freeze(model)
        return model
    if policy == "groupnorm":
        converted = _to_groupnorm(model)
        logger.info(
            "batchnorm=groupnorm: %d layer(s) replaced by GroupNorm (groups: largest divisor of "
            "the channels <= %d leaving >= %d channels per group)",
            len(names),
            MAX_GROUPS,
            MIN_CHANNELS_PER_GROUP,
        )
        return converted
    if world_size == 1:
        warnings.warn(
            "batchnorm='sync' has no effect with world_size 1: there is no other rank to share "
            "statistics with (use 'window' to pool the micro-batches of the window)",
            UserWarning,
            stacklevel=2,
        )
        return model
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch's SyncBatchNorm reduces only GPU tensors: the same statistics over gloo, in torch ops.
    return syncnorm.convert(model)


class WindowBatchNormStatistics:
    """Running statistics updated once per step from the inputs each BatchNorm saw in the window.

    For ``batchnorm='window'``: forwards still normalise with micro-batch statistics, but a hook
    records the per-channel count, sum and sum of squares (float64) of every BatchNorm layer's
    input during the window, and `end_window` rewinds the running statistics to where they were
    at `begin_window` and applies one update from the pooled global-batch statistics: mean, and
    unbiased variance over all items (within plus between micro-batches), with the layer's
    momentum, or the cumulative average for ``momentum=None``, as torch's BatchNorm does.

    For a layer whose input passes through no other BatchNorm in training mode (the first of a
    stack, parallel branches) this is the update one forward over the whole global batch makes.
    A layer behind another one pools the inputs it actually saw, normalised per micro-batch:
    close to the full-batch forward's statistics, not equal (no accumulation can give it the
    full-batch forward's inputs). Only layers in training mode with running statistics count.
    Everything stays on the device: no host sync. Under DDP, SUM all-reduce `local_statistics`
    (merged into the step's one small all-reduce) and pass the result to `end_window`. The
    engine holds it as a `bigbatch.core.window.WindowStatistics`.

    Args:
        model: the model (a DDP wrapper is unwrapped).
    """

    host_sums = False  # one count and two sums per channel: they stay on the device

    def __init__(self, model: torch.nn.Module) -> None:
        module = distributed.unwrap(model)
        self._layers: list[_BatchNorm] = [
            layer
            for layer in module.modules()
            if isinstance(layer, _BatchNorm) and layer.track_running_stats
        ]
        tensors = [*module.parameters(), *module.buffers()]
        self._device = tensors[0].device if tensors else torch.device("cpu")
        self._statistics: list[torch.Tensor] = []
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._open = False
        self._handles = [
            layer.register_forward_pre_hook(self._record_hook(index))
            for index, layer in enumerate(self._layers)
        ]

    @property
    def num_statistics(self) -> int:
        """Length of `local_statistics`: 1 + 2 x channels per layer."""
        return sum(1 + 2 * int(layer.num_features) for layer in self._layers)

    def _record_hook(self, index: int) -> Any:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            # A checkpointed unit's recompute replays a forward already recorded.
            if not (self._open and module.training) or checkpointing.is_recomputing(module):
                return
            x = args[0].detach().to(torch.float64)
            dims = [d for d in range(x.dim()) if d != 1]
            stats = self._statistics[index]
            channels = (stats.numel() - 1) // 2
            stats[0] += x.numel() // channels
            stats[1 : 1 + channels] += x.sum(dim=dims)
            stats[1 + channels :] += x.square().sum(dim=dims)

        return record

    def begin_window(self) -> None:
        """Save the running statistics and start recording; call before the first forward.

        Calling it again before `end_window` (e.g. when the engine retries a window) first
        restores the statistics saved by the open window.
        """
        if self._open:
            self._restore()
        self._saved = []
        self._statistics = []
        for layer in self._layers:
            assert layer.running_mean is not None and layer.running_var is not None
            assert layer.num_batches_tracked is not None
            self._saved.append(
                (
                    layer.running_mean.detach().clone(),
                    layer.running_var.detach().clone(),
                    layer.num_batches_tracked.detach().clone(),
                )
            )
            channels = int(layer.num_features)
            self._statistics.append(
                torch.zeros(1 + 2 * channels, dtype=torch.float64, device=layer.running_mean.device)
            )
        self._open = True

    def begin_micro_step(self) -> None:
        """Nothing: the forward hooks record."""

    def end_micro_step(self, num_items: float | torch.Tensor) -> None:
        """Nothing: BatchNorm counts values per channel, not loss items."""

    def local_statistics(self, backward_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """This rank's recorded [count, sum, sum of squares] of every layer, flat float64.

        Args:
            backward_scale: unused: the inputs of a forward carry no loss scale.
        """
        if not self._open:
            raise RuntimeError("local_statistics() needs an open window: call begin_window() first")
        if not self._statistics:
            return torch.zeros(0, dtype=torch.float64, device=self._device)
        device = self._statistics[0].device
        return torch.cat([s.to(device) for s in self._statistics])

    def _restore(self) -> None:
        with torch.no_grad():
            for layer, (mean, var, tracked) in zip(self._layers, self._saved):
                assert layer.running_mean is not None and layer.running_var is not None
                assert layer.num_batches_tracked is not None
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(tracked)

    def end_window(
        self, reduced: torch.Tensor | None = None, *, num_items: int = 0, grad_norm: float = 0.0
    ) -> None:
        """Rewind the running statistics and apply one update from the pooled statistics.

        Args:
            reduced: `local_statistics` summed over ranks; None: this rank's own (one process).
            num_items: unused: the update needs only the pooled sums.
            grad_norm: unused.
        """
        if not self._open:
            raise RuntimeError("end_window() without begin_window()")
        if reduced is None:
            reduced = self.local_statistics()
        if reduced.numel() != self.num_statistics:
            raise ValueError(
                f"reduced must hold {self.num_statistics} values (local_statistics), got "
                f"{reduced.numel()}"
            )
        self._restore()
        self._open = False
        offset = 0
        with torch.no_grad():
            for layer in self._layers:
                channels = int(layer.num_features)
                stats = reduced[offset : offset + 1 + 2 * channels]
                offset += 1 + 2 * channels
                _update_running(layer, stats.to(layer.running_mean.device))  # type: ignore[union-attr]

    def abort_window(self) -> None:
        """Rewind the running statistics without an update (e.g. the window is given up)."""
        if self._open:
            self._restore()
            self._open = False

    def remove(self) -> None:
        """Remove the hooks (rewinding an open window first); idempotent."""
        self.abort_window()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _update_running(layer: _BatchNorm, stats: torch.Tensor) -> None:
    """One running-statistics update from pooled [count, sum, sum of squares] (float64)."""
    channels = (stats.numel() - 1) // 2
    count = stats[0]
    mean = stats[1 : 1 + channels] / count.clamp(min=1)
    # Pooled over micro-batches (and ranks) as sums, so the squared deviations come from the
    # sum of squares: within plus between micro-batches.
    biased = (stats[1 + channels :] / count.clamp(min=1) - mean.square()).clamp(min=0)
    runningstats.update_running_statistics(layer, count, mean, biased * count)
