"""`bigbatch verify`: check that a recipe's accumulated update equals the full-batch one.

In float64, for a few global batches, the gradient of (sum of every item's loss) / (number of
items) from one forward over the whole global batch is compared with the gradient that
`Accumulator.step` applies under several splits (micro-batches of 1, an uneven split, the
configured one). Layers that make the update depend on the split (BatchNorm, dropout without a
fixed seed) are named, since they are the usual reason for a mismatch. The same check over several
ranks (DDP, FSDP2) is `bigbatch.tools.verify_distributed`; `format_report` prints either.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.data import default_collate

from bigbatch.choices import GradientSync
from bigbatch.core import batches, sharding
from bigbatch.core import batchnorm as batchnorm_policies
from bigbatch.core.engine import Accumulator, LossFn
from bigbatch.planning import check_count, plan
from bigbatch.recipes import Recipe
from bigbatch.units import UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitResult:
    """One split of the global batch and how far its update is from the full-batch one.

    Attributes:
        name: "micro 1", "uneven", "configured" (and "empty" over several ranks).
        micro_batch_sizes: the micro-batch sizes of rank 0's window.
        relative_error: the largest |g_split - g_full| / |g_full| over the global batches (over
            several ranks: the largest on any rank).
        passed: relative_error <= the tolerance.
        world_size: the ranks the global batch was split over.
        parallelism: "ddp" or "fsdp" over several ranks; None on one process.
        gradient_sync: the engine's gradient sync mode over several ranks; None on one process.
        rank_micro_batch_sizes: every rank's window over several ranks; () on one process.
    """

    name: str
    micro_batch_sizes: tuple[int, ...]
    relative_error: float
    passed: bool
    world_size: int = 1
    parallelism: str | None = None
    gradient_sync: str | None = None
    rank_micro_batch_sizes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found.

    Attributes:
        recipe: the recipe's name.
        global_batch_size: samples of each global batch compared.
        num_global_batches: how many global batches were compared.
        tolerance: the largest relative error that passes.
        splits: one result per split (and gradient sync mode, over several ranks).
        breaking_layers: (module name, why) of every layer that breaks split equivalence.
        world_size: the ranks the check ran on (1: one process).
    """

    recipe: str
    global_batch_size: int
    num_global_batches: int
    tolerance: float
    splits: tuple[SplitResult, ...]
    breaking_layers: tuple[tuple[str, str], ...]
    world_size: int = 1

    @property
    def passed(self) -> bool:
        """True when every split is within the tolerance."""
        return all(split.passed for split in self.splits)


def breaking_layers(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Layers whose training-mode output depends on how the global batch is split.

    BatchNorm normalises with the statistics of each micro-batch; dropout draws a new mask per
    forward, so one full-batch forward and several micro-batch forwards see different masks.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not batchnorm_policies.is_frozen(module):
            found.append(
                (name, f"{type(module).__name__}: normalises with each micro-batch's statistics")
            )
        elif isinstance(module, _DropoutNd) and module.p > 0:
            found.append(
                (
                    name,
                    f"{type(module).__name__}(p={module.p}): dropout without a "
                    "fixed seed draws different masks per micro-batch",
                )
            )
    return found


class _GradientRecorder(torch.optim.Optimizer):
    """An optimizer that applies nothing and keeps a copy of the gradient it was asked to apply."""

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        super().__init__(parameters, {"lr": 1.0})
        self.gradients: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Record the whole gradients (the engine has normalised them by now).

        A sharded gradient is gathered whole: a collective, so every rank records the same
        parameters in the same order (FSDP gives every rank a gradient shard, or none to all).
        """
        self.gradients = [
            torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            if p.grad is None
            else sharding.full(p.grad.detach())
            for group in self.param_groups
            for p in group["params"]
        ]


def to_float64(batch: Any) -> Any:
    """The batch with its floating-point tensors in float64."""
    return batches.map_tensors(batch, lambda t: t.double() if t.is_floating_point() else t)


def full_batch_gradients(
    model: torch.nn.Module, loss_fn: LossFn, global_batch: Any
) -> list[torch.Tensor]:
    """Plain autograd of (sum of the items' losses) / (items) in one forward: the reference."""
    model.zero_grad(set_to_none=True)
    output = loss_fn(model, global_batch)
    if isinstance(output, (tuple, list)):
        loss_sum, num_items = output
        loss = loss_sum / float(num_items)
    else:
        loss = output  # a scalar mean over the samples
    loss.backward()
    gradients = [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
        if p.requires_grad
    ]
    model.zero_grad(set_to_none=True)
    return gradients


def accumulated_gradients(
    model: torch.nn.Module,
    loss_fn: LossFn,
    window: Sequence[Any],
    *,
    gradient_sync: GradientSync = "auto",
) -> list[torch.Tensor]:
    """The whole gradient `Accumulator.step` applies for a window of micro-batches.

    The model may be wrapped in DistributedDataParallel or sharded with FSDP2: then every rank
    calls this with its own window, and each gets the whole gradient of the global batch.
    """
    recorder = _GradientRecorder([p for p in model.parameters() if p.requires_grad])
    Accumulator(model, recorder, gradient_sync=gradient_sync).step(window, loss_fn)
    return recorder.gradients


def relative_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """|actual - expected| / |expected| over all tensors together (0 when both are zero).

    Infinite when the two cannot be compared: no gradient applied (a skipped step records none),
    tensors that differ in number or shape, or a non-finite gradient on either side.
    """
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return math.inf
    difference = sum(float((a - e).pow(2).sum()) for a, e in zip(actual, expected))
    norm = sum(float(e.pow(2).sum()) for e in expected)
    if norm == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    error = float((difference / norm) ** 0.5)
    return error if math.isfinite(error) else math.inf  # a NaN would pass max() and <=


def _splits(global_batch_size: int, micro_batch_size: int | None) -> dict[str, tuple[int, ...]]:
    """The splits to compare, by name, without duplicates."""
    candidates = {
        "micro 1": 1,
        "uneven": global_batch_size // 3 + 1,
        "configured": micro_batch_size,
    }
    splits: dict[str, tuple[int, ...]] = {}
    for name, micro in candidates.items():
        if micro is None or micro > global_batch_size:
            continue
        sizes = tuple(plan(global_batch_size, micro_batch_size=micro).micro_batch_sizes(0))
        if sizes not in splits.values():
            splits[name] = sizes
    return splits


def global_batches(
    recipe: Recipe, global_batch_size: int, num_global_batches: int, seed: int
) -> Iterator[list[Any]]:
    """Samples of the first global batches of a seeded shuffle of the training set, one by one
    (permutations are drawn as they are needed, so many batches take no more memory)."""
    num_samples = len(recipe.train_dataset)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(num_global_batches):
        while len(order) < global_batch_size:
            order += torch.randperm(num_samples, generator=generator).tolist()
        batch, order = order[:global_batch_size], order[global_batch_size:]
        yield [recipe.train_dataset[i] for i in batch]


def check_arguments(
    recipe: Recipe,
    global_batch_size: int,
    micro_batch_size: int | None,
    num_global_batches: int,
    tolerance: float,
    world_size: int = 1,
) -> None:
    """Sizes that fit the training set and the ranks, a count of batches, a tolerance that means
    something."""
    plan(global_batch_size, world_size, micro_batch_size=micro_batch_size)  # validates the sizes
    check_count("num_global_batches", num_global_batches)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise UsageError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not 0 <= tolerance < math.inf:
        raise UsageError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    num_samples = len(recipe.train_dataset)  # type: ignore[arg-type]
    if num_samples < global_batch_size:
        raise UsageError(
            f"global_batch_size {global_batch_size} is larger than the recipe's training set "
            f"({num_samples} samples): use global_batch_size <= {num_samples}"
        )


def float64_model(recipe: Recipe, batchnorm: str) -> torch.nn.Module:
    """A float64 copy of the recipe's model in training mode, with the `batchnorm` policy if it
    is ``freeze`` or ``groupnorm`` (the others leave the layers as they are)."""
    model = copy.deepcopy(recipe.model).double().train()
    if batchnorm in ("freeze", "groupnorm"):
        model = batchnorm_policies.apply_policy(model, batchnorm)  # type: ignore[arg-type]
    batchnorm_policies.mark_warned(model)  # the report names BatchNorm layers itself
    return model


def verify(
    recipe: Recipe,
    *,
    global_batch_size: int,
    micro_batch_size: int | None,
    num_global_batches: int = 2,
    tolerance: float = 1e-6,
    seed: int = 0,
    batchnorm: str = "keep",
) -> VerifyReport:
    """Compare the accumulated update with the full-batch one, in float64, for several splits.

    Args:
        recipe: a built recipe; its model is copied and cast to float64, never changed.
        global_batch_size: samples per global batch.
        micro_batch_size: the configured micro-batch (None: compare micro 1 and uneven only).
        num_global_batches: how many global batches to compare.
        tolerance: the largest relative gradient error that passes.
        seed: seed of the shuffle that picks the global batches.
        batchnorm: the BatchNorm policy to check: ``freeze`` and ``groupnorm`` make the update
            independent of the split; ``keep``, ``window`` and ``sync`` (one process) do not.

    Raises:
        UsageError: a size that is not a positive integer or larger than the training set, a
            count of batches below 1, a tolerance that is negative or not finite.
    """
    check_arguments(recipe, global_batch_size, micro_batch_size, num_global_batches, tolerance)
    model = float64_model(recipe, batchnorm)
    collate = recipe.collate_fn or default_collate
    splits = _splits(global_batch_size, micro_batch_size)
    errors = dict.fromkeys(splits, 0.0)
    for samples in global_batches(recipe, global_batch_size, num_global_batches, seed):
        expected = full_batch_gradients(
            copy.deepcopy(model), recipe.loss_fn, to_float64(collate(samples))
        )
        for name, sizes in splits.items():
            starts = [sum(sizes[:index]) for index in range(len(sizes))]
            window = [
                to_float64(collate(samples[start : start + size]))
                for start, size in zip(starts, sizes)
            ]
            actual = accumulated_gradients(copy.deepcopy(model), recipe.loss_fn, window)
            errors[name] = max(errors[name], relative_error(actual, expected))
    results = tuple(
        SplitResult(name, sizes, errors[name], errors[name] <= tolerance)
        for name, sizes in splits.items()
    )
    return VerifyReport(
        recipe=recipe.name,
        global_batch_size=global_batch_size,
        num_global_batches=num_global_batches,
        tolerance=tolerance,
        splits=results,
        breaking_layers=tuple(breaking_layers(model)),
    )


def _describe_sizes(sizes: Sequence[int]) -> str:
    """`16 x 16` for even splits, `86 85 85` or `86, 85 x 2` for uneven ones."""
    if len(set(sizes)) == 1:
        return f"{sizes[0]} x {len(sizes)}"
    if len(sizes) <= 6:
        return " ".join(map(str, sizes))
    counts = {size: sizes.count(size) for size in dict.fromkeys(sizes)}
    return ", ".join(f"{size} x {count}" for size, count in counts.items())


def _describe_ranks(rank_sizes: Sequence[Sequence[int]]) -> str:
    """Every rank's window, `3 3 | 3 2`; the first two and the last of more than four ranks."""
    shown = [_describe_sizes(sizes) for sizes in rank_sizes]
    if len(shown) > 4:
        shown = [*shown[:2], "...", shown[-1]]
    return " | ".join(shown)


def _rows(report: VerifyReport) -> list[str]:
    """The column titles and one line per split (per split and sync mode over several ranks)."""
    if report.world_size == 1:
        lines = [f"{'split':<12}{'micro-batch sizes':<22}{'relative error':>16}  result"]
        for split in report.splits:
            lines.append(
                f"{split.name:<12}{_describe_sizes(split.micro_batch_sizes):<22}"
                f"{split.relative_error:>16.2e}  {'ok' if split.passed else 'FAIL'}"
            )
        return lines
    lines = [
        f"{'split':<12}{'ranks':>5}  {'parallelism':<13}{'gradient sync':<19}"
        f"{'relative error':>14}  result  micro-batch sizes (rank 0 | rank 1 | ...)"
    ]
    for split in report.splits:
        result = "ok" if split.passed else "FAIL"
        lines.append(
            f"{split.name:<12}{split.world_size:>5}  {split.parallelism or '-':<13}"
            f"{split.gradient_sync or '-':<19}{split.relative_error:>14.2e}  "
            f"{result:<6}  {_describe_ranks(split.rank_micro_batch_sizes)}"
        )
    return lines


def format_report(report: VerifyReport) -> str:
    """A small table: one row per split, then the layers that break equivalence and a verdict."""
    over = f" over {report.world_size} ranks" if report.world_size > 1 else ""
    lines = [
        f"verify {report.recipe}: {report.num_global_batches} global batches of "
        f"{report.global_batch_size}{over}, float64, full batch vs Accumulator.step, "
        f"tolerance {report.tolerance:g}",
        *_rows(report),
    ]
    if report.breaking_layers:
        lines.append("layers that break equivalence:")
        lines += [f"  {name}: {why}" for name, why in report.breaking_layers]
    else:
        lines.append("layers that break equivalence: none found")
    verdict = "all splits match the full batch" if report.passed else "splits differ"
    lines.append(f"{'PASS' if report.passed else 'FAIL'}: {verdict}")
    return "\n".join(lines)
