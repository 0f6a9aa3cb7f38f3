"""The gradient noise scale: per-micro-batch gradient norms and the critical batch size.

Accumulation makes the noise scale of McCandlish et al. 2018 (arXiv:1812.06162) nearly free: every
micro-batch is a small-batch gradient and the window a large-batch one. `GradientNormTracker` reads
each micro-batch's squared gradient norm from tensor hooks (no gradient copy, no host sync) and
`NoiseScaleEstimator` turns them into unbiased, smoothed estimates of |G|^2, tr(Sigma) and
B_simple = tr(Sigma) / |G|^2, valid for micro-batches of unequal item counts.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bigbatch.core import sharding

logger = logging.getLogger(__name__)


class GradientNormTracker:
    """Squared norm of every micro-batch's own gradient, read before it is accumulated.

    A hook on each parameter sees the gradient one backward produces for it, before it is added to
    ``.grad`` (and before DDP's all-reduce, which runs after accumulation), so the norm is that of
    this micro-batch alone. Each hook only computes one small norm on the device: no gradient is
    copied and nothing is read back to the host.

    Call `begin_micro_step` before a micro-batch's backward and `end_micro_step` after it; outside
    that bracket the hooks record nothing, so other backward passes (e.g. a user's own) are ignored.

    Under FSDP2 a backward produces the gradient of the *unsharded* parameters FSDP gathers for
    the forward, on every rank its own micro-batch's, before the reduce-scatter: the hooks go on
    those (registered from each FSDP module's forward, once the parameters are gathered), so the
    norms are each rank's micro-batch's, as under DDP.

    Args:
        parameters: the trained parameters (those with ``requires_grad``).
        model: the model, needed when it is sharded with FSDP2.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> tracker = GradientNormTracker(model.parameters())
        >>> tracker.begin_micro_step()
        >>> model(torch.tensor([[3.0, 4.0]])).sum().backward()
        >>> float(tracker.end_micro_step())  # |(3, 4)|^2
        25.0
        >>> tracker.remove()
    """

    def __init__(
        self, parameters: Iterable[torch.nn.Parameter], model: torch.nn.Module | None = None
    ) -> None:
        self._parameters = [p for p in parameters if p.requires_grad]
        if not self._parameters:
            raise ValueError("parameters holds no tensor with requires_grad=True: nothing to track")
        self.device = self._parameters[0].device
        # float64 norms for float64 models (the tests), float32 otherwise: a float32 norm of a
        # half-precision or loss-scaled gradient cannot overflow; it is squared in float64.
        self._norm_dtype = (
            torch.float64
            if any(p.dtype == torch.float64 for p in self._parameters)
            else torch.float32
        )
        self._norms: list[torch.Tensor] = []
        self._active = False
        self._handles: list[Any] = []
        self._hooked: dict[int, weakref.ref[torch.Tensor]] = {}
        if model is not None and sharding.is_fsdp(model):
            for module in sharding.fsdp_modules(model):
                # FSDP's own pre-forward hook (the all-gather) is registered first, to run first.
                self._handles.append(module.register_forward_pre_hook(self._hook_gathered))
        else:
            self._handles = [p.register_hook(self._record) for p in self._parameters]

    def _hook_gathered(self, module: torch.nn.Module, inputs: Any) -> None:
        """Hook the unsharded parameters FSDP has just gathered for this module's forward."""
        for parameter in module.parameters():
            if not parameter.requires_grad or sharding.is_sharded_tensor(parameter):
                continue
            known = self._hooked.get(id(parameter))
            if known is None or known() is not parameter:
                self._hooked[id(parameter)] = weakref.ref(parameter)
                self._handles.append(parameter.register_hook(self._record))

    def _record(self, gradient: torch.Tensor) -> None:
        if self._active:
            norm = torch.linalg.vector_norm(gradient, dtype=self._norm_dtype)
            if norm.device != self.device:  # a model spread over devices
                norm = norm.to(self.device, non_blocking=True)
            self._norms.append(norm)

    def begin_micro_step(self) -> None:
        """Start recording the gradients of the next backward."""
        self._norms.clear()
        self._active = True

    def end_micro_step(self) -> torch.Tensor:
        """Stop recording; the squared norm of that backward's gradient (float64, on the device).

        The norm is of what the backward produced: for a loss sum scaled by c it is
        c^2 * items^2 * |item-mean gradient|^2, see `item_mean_sq_norms`.
        """
        self._active = False
        if not self._norms:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        total = torch.stack(self._norms).to(torch.float64).square().sum()
        self._norms.clear()
        return total

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._active = False


def item_mean_sq_norms(
    raw_sq_norms: torch.Tensor, micro_items: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Squared norms of the micro-batches' item-mean gradients, on the device.

    A micro-batch whose backward ran on ``scale * loss_sum`` has gradient
    ``scale * items * (item-mean gradient)``, so its squared norm divides by ``(scale * items)^2``.
    Micro-batches with no items give 0 (the estimator leaves them out by their item count).

    Args:
        raw_sq_norms: what `GradientNormTracker.end_micro_step` returned, one per micro-batch.
        micro_items: the loss items of each micro-batch.
        scale: the constant the loss sums were multiplied by before backward (e.g. the fp16 loss
            scale divided by the engine's loss divisor); a tensor keeps it on the device.
    """
    items = micro_items.to(torch.float64)
    scale64 = scale.to(torch.float64) if isinstance(scale, torch.Tensor) else float(scale)
    denominator = (items * scale64).square()
    safe = torch.where(items > 0, denominator, torch.ones_like(denominator))
    return torch.where(items > 0, raw_sq_norms.to(torch.float64) / safe, torch.zeros_like(safe))


@dataclass(frozen=True)
class NoiseScale:
    """The smoothed gradient noise scale after a step.

    Attributes:
        critical_batch_size: B_simple = tr(Sigma) / |G|^2 in items; None until it can be estimated
            (no step with two or more micro-batches yet, or a smoothed |G|^2 that is not positive).
        gradient_sq_norm: smoothed estimate of |G|^2, the squared norm of the true gradient (NaN
            before the first estimate).
        trace_covariance: smoothed estimate of tr(Sigma), the summed per-item gradient variance
            (NaN before the first estimate).
        num_steps: steps that went into the estimate.
    """

    critical_batch_size: float | None
    gradient_sq_norm: float
    trace_covariance: float
    num_steps: int


def step_estimates(
    micro_sq_norms: Iterable[float],
    micro_items: Iterable[float],
    global_sq_norm: float,
    global_items: float,
) -> tuple[float, float] | None:
    """Unbiased one-step estimates of (|G|^2, tr(Sigma)); None with fewer than 2 micro-batches.

    For b items, E|g_b|^2 = |G|^2 + tr(Sigma) / b. The plain mean of the micro-batches' squared
    norms has expectation |G|^2 + S * h with h = mean(1 / b_i), the global one |G|^2 + S / B.
    Solving the two linear equations gives unbiased estimates whatever the b_i; h > 1 / B as soon
    as two micro-batches hold items (harmonic <= arithmetic mean). Empty micro-batches are left out.
    """
    pairs = [(float(s), float(b)) for s, b in zip(micro_sq_norms, micro_items) if float(b) > 0]
    return estimates_from_sums(
        sum(s for s, _ in pairs),
        sum(1.0 / b for _, b in pairs),
        len(pairs),
        global_sq_norm,
        global_items,
    )


def estimates_from_sums(
    sum_micro_sq_norms: float,
    sum_inverse_items: float,
    num_micro_batches: float,
    global_sq_norm: float,
    global_items: float,
) -> tuple[float, float] | None:
    """`step_estimates` from the sums that suffice: sum of the non-empty micro-batches' squared
    item-mean gradient norms, sum of their 1 / items, and their number (all summed over ranks)."""
    if num_micro_batches < 2 or global_items <= 0:
        return None
    small = sum_micro_sq_norms / num_micro_batches
    inverse_small = sum_inverse_items / num_micro_batches
    inverse_big = 1.0 / float(global_items)
    gap = inverse_small - inverse_big
    if gap <= 0:
        return None
    trace = (small - global_sq_norm) / gap
    gradient_sq = (global_sq_norm * inverse_small - small * inverse_big) / gap
    return gradient_sq, trace


class NoiseScaleEstimator:
    """Smoothed gradient noise scale from the micro-batch and window gradient norms of each step.

    The one-step estimates of |G|^2 and tr(Sigma) are unbiased but noisy (one step's |G|^2 estimate
    is often negative), so each is smoothed separately with a bias-corrected exponential moving
    average (McCandlish et al. 2018, appendix A.1) of decay ``1 - 1 / smoothing_steps``, and their
    ratio is taken afterwards. Feed only applied steps (not skipped ones).

    Args:
        smoothing_steps: the averaging window in steps (1: no smoothing).
    """

    def __init__(self, smoothing_steps: int = 200) -> None:
        if isinstance(smoothing_steps, bool) or not isinstance(smoothing_steps, int):
            raise TypeError(f"smoothing_steps must be an int, got {type(smoothing_steps).__name__}")
        if smoothing_steps < 1:
            raise ValueError(f"smoothing_steps must be >= 1, got {smoothing_steps}")
        self.smoothing_steps = smoothing_steps
        self._decay = 1.0 - 1.0 / smoothing_steps
        self._gradient_sq = 0.0
        self._trace = 0.0
        self._num_steps = 0
        self._warned_single = False

    def update(
        self,
        micro_sq_norms: torch.Tensor,
        micro_items: torch.Tensor,
        global_sq_norm: float,
        global_items: int,
    ) -> NoiseScale:
        """Add one step and return the smoothed estimate (one host read of the small tensors).

        Args:
            micro_sq_norms: squared norms of the micro-batches' item-mean gradients, every rank's.
            micro_items: their item counts (0 for an empty or padding slot, left out).
            global_sq_norm: squared norm of the step's global item-mean gradient (before clipping).
            global_items: the items of the whole global batch.
        """
        norms = micro_sq_norms.detach().to("cpu", torch.float64).tolist()
        items = micro_items.detach().to("cpu", torch.float64).tolist()
        if len(norms) != len(items):
            raise ValueError(
                f"micro_sq_norms and micro_items differ in length: {len(norms)} != {len(items)}"
            )
        estimates = step_estimates(norms, items, float(global_sq_norm), float(global_items))
        return self._add(estimates, sum(1 for b in items if b > 0))

    def update_from_sums(
        self,
        sum_micro_sq_norms: float,
        sum_inverse_items: float,
        num_micro_batches: float,
        global_sq_norm: float,
        global_items: int,
    ) -> NoiseScale:
        """`update` from the sums of `estimates_from_sums` (what the engine all-reduces)."""
        estimates = estimates_from_sums(
            sum_micro_sq_norms, sum_inverse_items, num_micro_batches, global_sq_norm, global_items
        )
        return self._add(estimates, int(num_micro_batches))

    def _add(self, estimates: tuple[float, float] | None, num_micro_batches: int) -> NoiseScale:
        if estimates is None:
            if not self._warned_single:
                logger.warning(
                    "noise scale: a step with %d non-empty micro-batch(es) over all ranks gives no "
                    "small/large batch pair, so no estimate; use 2 or more micro-batches per "
                    "step (gradient_accumulation_steps >= 2 or world_size >= 2)",
                    num_micro_batches,
                )
                self._warned_single = True
        elif all(math.isfinite(value) for value in estimates):
            gradient_sq, trace = estimates
            self._gradient_sq = self._decay * self._gradient_sq + (1 - self._decay) * gradient_sq
            self._trace = self._decay * self._trace + (1 - self._decay) * trace
            self._num_steps += 1
        else:
            logger.debug("noise scale: non-finite step estimate %s left out", estimates)
        return self.current()

    def current(self) -> NoiseScale:
        """The smoothed estimate so far, without adding a step."""
        if self._num_steps == 0:
            return NoiseScale(None, math.nan, math.nan, 0)
        correction = 1.0 - self._decay**self._num_steps
        if correction <= 0.0:  # smoothing_steps == 1: decay 0, the last step alone
            correction = 1.0
        gradient_sq = self._gradient_sq / correction
        trace = self._trace / correction
        critical = trace / gradient_sq if gradient_sq > 0 and trace >= 0 else None
        return NoiseScale(critical, gradient_sq, trace, self._num_steps)

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers for checkpoints."""
        return {
            "smoothing_steps": self.smoothing_steps,
            "gradient_sq_ema": self._gradient_sq,
            "trace_ema": self._trace,
            "num_steps": self._num_steps,
            "warned_single": self._warned_single,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, so a resumed run continues the same estimate."""
        smoothing_steps = int(state["smoothing_steps"])
        if smoothing_steps != self.smoothing_steps:
            logger.warning(
                "noise scale: checkpoint smoothed over %d steps, now %d: continuing with %d",
                smoothing_steps,
                self.smoothing_steps,
                self.smoothing_steps,
            )
        self._gradient_sq = float(state["gradient_sq_ema"])
        self._trace = float(state["trace_ema"])
        self._num_steps = int(state["num_steps"])
        self._warned_single = bool(state.get("warned_single", False))


class NoiseScaleMeter:
    """The engine's side of the measurement: a `WindowStatistics` of three sums per window.

    Per micro-step the tracker's squared norm of the backward's gradient (of ``c * loss_sum``) is
    kept with the micro-batch's item count; `local_statistics` turns them, once per window, into
    item-mean squared norms (dividing out c, constant within a window). The three sums (norms,
    1 / items, count) are what `estimates_from_sums` needs, so every rank's micro-batches count
    after one SUM all-reduce, whatever the number of micro-batches of each rank. The sums are
    read to the host with the step's totals (`host_sums`) and feed the estimator once per
    applied step.
    """

    host_sums = True

    def __init__(
        self,
        parameters: Iterable[torch.nn.Parameter],
        smoothing_steps: int = 200,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.tracker = GradientNormTracker(parameters, model)
        self.estimator = NoiseScaleEstimator(smoothing_steps)
        self._raw_sq_norms: list[torch.Tensor] = []
        self._items: list[float | torch.Tensor] = []

    def begin_window(self) -> None:
        """Forget a previous (or failed) window."""
        self._raw_sq_norms.clear()
        self._items.clear()

    def begin_micro_step(self) -> None:
        """Record the gradient norms of the next backward."""
        self.tracker.begin_micro_step()

    def end_micro_step(self, num_items: float | torch.Tensor) -> None:
        """Keep this micro-batch's squared norm and item count (no work yet)."""
        self._raw_sq_norms.append(self.tracker.end_micro_step())
        self._items.append(num_items)

    def local_statistics(self, backward_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """This rank's three sums, for loss sums backpropagated times ``backward_scale``.

        Computed once per window, so the micro-steps pay only for the tracker's norms.
        """
        device = self.tracker.device
        if not self._raw_sq_norms:
            return torch.zeros(3, dtype=torch.float64, device=device)
        items = _as_device_tensor(self._items, device)
        micro_sq_norms = item_mean_sq_norms(torch.stack(self._raw_sq_norms), items, backward_scale)
        has_items = items > 0
        inverse_items = torch.where(has_items, 1.0 / items, torch.zeros_like(items))
        return torch.stack(
            [micro_sq_norms.sum(), inverse_items.sum(), has_items.to(torch.float64).sum()]
        )

    def end_window(
        self, reduced: torch.Tensor | None = None, *, num_items: int = 0, grad_norm: float = 0.0
    ) -> None:
        """Feed an applied step to the estimator.

        Args:
            reduced: `local_statistics` summed over ranks, on the host; None: this rank's own.
            num_items: the loss items of the global batch.
            grad_norm: norm of the global batch's item-mean gradient, before clipping.
        """
        if reduced is None:
            reduced = self.local_statistics()
        sum_sq_norms, sum_inverse_items, num_micro_batches = reduced.tolist()
        self.estimator.update_from_sums(
            sum_sq_norms, sum_inverse_items, num_micro_batches, grad_norm**2, num_items
        )

    def abort_window(self) -> None:
        """A skipped step feeds nothing: the estimate stays where it was."""

    def current(self) -> NoiseScale:
        """The smoothed estimate so far."""
        return self.estimator.current()

    def remove(self) -> None:
        """Remove the tracker's gradient hooks from the parameters (idempotent)."""
        self.tracker.remove()


def _as_device_tensor(values: list[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """A float64 tensor of numbers and device scalars, without a host sync."""
    if not any(isinstance(value, torch.Tensor) for value in values):
        # A non-blocking copy from pageable memory is staged by the host: no device sync.
        return torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
    return torch.stack(
        [
            value.to(torch.float64)
            if isinstance(value, torch.Tensor)
            else torch.full((), value, dtype=torch.float64, device=device)
            for value in values
        ]
    )
