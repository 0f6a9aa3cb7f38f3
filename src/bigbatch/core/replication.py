"""How a model's gradients meet over ranks: one strategy per replication mode, chosen once.

`choose` returns `Local` (one process, or a model with no wrapper), `DDP`
(DistributedDataParallel: replicas whose gradients one all-reduce averages) or `FSDP2`
(``fully_shard``: sharded parameters whose gradients reduce-scatter sums). The engine asks its
strategy every question whose answer depends on the mode -- the rank factor of the step's scale,
a micro-step's sync context, which micro-steps every rank must run, which gradients to scale --
and never tests the mode, so the exact step (docs/design.md, invariants 1 and 2) is written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bigbatch.core import batches, distributed, sharding, syncnorm
from bigbatch.core.accumulation import Fp32GradientBuffer, choose_accumulation_dtype

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

MicroStep = tuple[Any, bool]
"""A micro-batch of the window and whether it is a stand-in (its loss counts no item)."""


class Replication:
    """What the engine asks of a replication mode; the answers here are those of one process.

    Args:
        model: the model as the caller gave it (wrapped or sharded).
        parameters: its trained parameters.
        gradient_sync: ``"step_end"``, ``"every_micro_batch"`` or ``"auto"`` (see `Accumulator`).
        memory_budget_bytes: what ``gradient_sync="auto"`` may give an unsharded gradient.
        accumulation_dtype: ``"fp32"``, ``"param"`` or ``"auto"`` (see `Accumulator`).

    Attributes:
        name: ``"local"``, ``"ddp"`` or ``"fsdp2"``.
        spans_ranks: the step's figures are summed and its decisions agreed over ranks (the
            window's totals, the fp16 loss divisor, an out-of-memory re-split).
        sharded: each rank holds a shard of every gradient: the gradient norm is taken from the
            shards (their squares summed over ranks), a non-finite gradient backs the loss scale
            off on every rank, and fp32 buffers are not available.
        world_size: the ranks taking part; 1 for one process.
        gradient_sync: ``"step_end"`` or ``"every_micro_batch"``, as chosen.
        accumulation_dtype: ``"fp32"`` or ``"param"``, as chosen.
    """

    name = "local"
    spans_ranks = False
    sharded = False

    def __init__(
        self,
        model: torch.nn.Module,
        parameters: list[torch.nn.Parameter],
        *,
        gradient_sync: str,
        memory_budget_bytes: int | None,
        accumulation_dtype: str,
    ) -> None:
        self.model = model
        self.world_size = distributed.get_world_size() if self.spans_ranks else 1
        self.gradient_sync = sharding.choose_gradient_sync(
            gradient_sync,
            sharded=self.sharded,
            parameters=parameters,
            device=parameters[0].device,
            memory_budget_bytes=memory_budget_bytes,
        )
        self.accumulation_dtype = choose_accumulation_dtype(
            accumulation_dtype, parameters, sharded=self.sharded
        )

    @property
    def gradient_ranks(self) -> int:
        """The ranks whose summed gradient the gradient collective divides by (DDP averages:
        world_size; FSDP2 sums: 1): the step's scale multiplies it back."""
        return 1

    @property
    def keeps_gradients(self) -> bool:
        """``.grad`` is a view into storage the mode owns (DDP's buckets under
        ``gradient_as_bucket_view``): the engine zeroes and writes it in place, never replaces
        it or sets it to None."""
        return False

    @property
    def equal_micro_steps(self) -> bool:
        """Every rank must run as many micro-steps: a collective runs in more than the last
        backward (or in every forward)."""
        return False

    @property
    def checks_divergence(self) -> bool:
        """Ranks hold replicas that a parameter checksum may compare."""
        return False

    def micro_steps(self, micro_batches: list[Any], device: torch.device) -> list[MicroStep]:
        """The window's micro-steps as (micro-batch, is a stand-in).

        Where every rank must run as many micro-steps, they run as many as the rank with the most
        (one small MAX all-reduce), and an empty micro-batch becomes a stand-in.
        """
        if not self.equal_micro_steps:
            return [(micro_batch, False) for micro_batch in micro_batches]
        count = torch.tensor([float(len(micro_batches))], device=device)
        steps = int(distributed.all_reduce_max(count).item())
        filler = stand_in(micro_batches)
        padded = [(m, False) if batches.num_rows(m) else (filler, True) for m in micro_batches]
        return padded + [(filler, True)] * (steps - len(micro_batches))

    def empty_micro_step(
        self, micro_batches: list[Any], micro_batch: Any, index: int, last: int
    ) -> MicroStep | None:
        """What runs in place of an empty micro-batch at ``index`` (not a stand-in already);
        None: skip it."""
        return None

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """The context of one micro-step: whether its backward runs the gradient collective."""
        return contextlib.nullcontext()

    def out_of_memory_is_fatal(self, index: int, last: int) -> bool:
        """Out of memory in the backward of micro-step ``index``: True when other ranks may be
        inside a gradient collective already, so that the window cannot be redone."""
        return False

    def micro_steps_to_join(self, failed_at: int, num_steps: int) -> Sequence[int]:
        """After this rank ran out of memory at micro-step ``failed_at``: the micro-steps it still
        runs, with stand-ins, to join every collective the other ranks run."""
        if not self.spans_ranks:
            return []
        return range(failed_at, num_steps) if self.equal_micro_steps else [num_steps - 1]

    def local_gradients(self, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The accumulated gradients this rank scales and clips (when no fp32 buffer holds
        them)."""
        return [p.grad for p in parameters if p.grad is not None]

    def reduce_buffer(self, buffer: Fp32GradientBuffer) -> None:
        """After the window's last backward: sum the fp32 buffer over ranks where the gradient
        collective did not."""

    def clear(self) -> None:
        """Drop gradients the mode holds besides ``.grad`` and the fp32 buffer."""


class Local(Replication):
    """One process, or a model with no DDP wrapper and no FSDP2 sharding: no collective."""


class DDP(Replication):
    """DistributedDataParallel: replicas, gradients averaged over ranks by one all-reduce in the
    window's last backward (``step_end``) or in every backward (``every_micro_batch``)."""

    name = "ddp"
    spans_ranks = True

    def __init__(
        self, model: torch.nn.Module, parameters: list[torch.nn.Parameter], **choices: Any
    ) -> None:
        super().__init__(model, parameters, **choices)
        # Forwards that run collectives (cross-rank BatchNorm) run on every rank, empty or not.
        self._forward_empty = syncnorm.has_cross_rank_layers(model)

    @property
    def gradient_ranks(self) -> int:
        return self.world_size

    @property
    def keeps_gradients(self) -> bool:
        return bool(getattr(self.model, "gradient_as_bucket_view", False))

    @property
    def equal_micro_steps(self) -> bool:
        return self.gradient_sync == "every_micro_batch"

    @property
    def checks_divergence(self) -> bool:
        return self.world_size > 1

    def empty_micro_step(
        self, micro_batches: list[Any], micro_batch: Any, index: int, last: int
    ) -> MicroStep | None:
        if self._forward_empty:
            return micro_batch, False
        if index != last:
            return None
        # The step's one gradient sync: every rank joins it. Models that cannot forward 0 rows
        # (GPT-2) join with a real row weighed 0.
        filler = stand_in(micro_batches)
        return filler, batches.num_rows(filler) > 0

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if self.accumulation_dtype == "fp32":
            return self.model.no_sync()  # type: ignore[operator]  # the fp32 buffers are reduced
        if last or self.gradient_sync == "every_micro_batch":
            return contextlib.nullcontext()
        return self.model.no_sync()  # type: ignore[operator]

    def out_of_memory_is_fatal(self, index: int, last: int) -> bool:
        return index == last or self.equal_micro_steps

    def reduce_buffer(self, buffer: Fp32GradientBuffer) -> None:
        buffer.average_over_ranks(self.world_size)


class FSDP2(Replication):
    """FSDP2 (``fully_shard``): sharded parameters, gradients summed over ranks by reduce-scatter
    in the window's last backward (``step_end``) or in every backward (``every_micro_batch``);
    every forward and backward all-gathers parameters, so every rank runs every micro-step."""

    name = "fsdp2"
    spans_ranks = True
    sharded = True

    def __init__(
        self, model: torch.nn.Module, parameters: list[torch.nn.Parameter], **choices: Any
    ) -> None:
        sharding.prepare(model, parameters)
        super().__init__(model, parameters, **choices)
        self._requires_gradient_sync: bool | None = None  # FSDP's flag as last set

    @property
    def equal_micro_steps(self) -> bool:
        return True

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        sync = last or self.gradient_sync == "every_micro_batch"
        if sync != self._requires_gradient_sync:
            self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            self._requires_gradient_sync = sync
        return contextlib.nullcontext()

    def out_of_memory_is_fatal(self, index: int, last: int) -> bool:
        return True

    def local_gradients(self, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [sharding.local(p.grad) for p in parameters if p.grad is not None]

    def clear(self) -> None:
        sharding.clear_unsharded_gradients(self.model)


def choose(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    *,
    gradient_sync: str,
    memory_budget_bytes: int | None,
    accumulation_dtype: str,
) -> Replication:
    """The strategy of the model as given: FSDP2 when its root is sharded by ``fully_shard``, DDP
    when it is wrapped in DistributedDataParallel, else Local.

    Raises:
        ValueError: a trained parameter of an FSDP2 model is not sharded, or an unknown or
            unavailable ``gradient_sync`` or ``accumulation_dtype``.
    """
    kind: type[Replication] = Local
    if sharding.is_fsdp(model):
        kind = FSDP2
    elif distributed.is_ddp(model):
        kind = DDP
    return kind(
        model,
        parameters,
        gradient_sync=gradient_sync,
        memory_budget_bytes=memory_budget_bytes,
        accumulation_dtype=accumulation_dtype,
    )


def replicate(
    module: torch.nn.Module, device_ids: list[int] | None = None, **options: Any
) -> DistributedDataParallel:
    """``module`` wrapped in DistributedDataParallel with ``gradient_as_bucket_view=True``: every
    ``.grad`` a view into DDP's buckets, so that a rank holds one gradient, not two.

    The gradients are made zeros before wrapping, so that DDP points them into its buckets at
    once rather than after the first synced backward (which would otherwise hold a gradient
    of its own beside the buckets for a whole window).
    """
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    return DistributedDataParallel(
        module, device_ids=device_ids, gradient_as_bucket_view=True, **options
    )


def stand_in(micro_batches: list[Any]) -> Any:
    """One real row of the window (its first), or no row when the window has none."""
    for micro_batch in micro_batches:
        if batches.num_rows(micro_batch):
            return batches.narrow(micro_batch, 0, 1)
    return batches.narrow(micro_batches[0], 0, 0)


@contextlib.contextmanager
def stand_in_forward(model: torch.nn.Module, is_stand_in: bool) -> Iterator[None]:
    """For a stand-in's forward: BatchNorm layers in eval mode, so their statistics ignore it."""
    if not is_stand_in:
        yield
        return
    layers = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
    ]
    for layer in layers:
        layer.training = False
    try:
        yield
    finally:
        for layer in layers:
            layer.training = True
