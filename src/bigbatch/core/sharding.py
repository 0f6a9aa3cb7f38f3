"""FSDP2 (`torch.distributed.fsdp.fully_shard`) and the gradient sync mode, for the engine.

Under FSDP2 the engine sums gradients over ranks (sum reduction set on every FSDP module: neither
setter is recursive), so the step's one normalisation is 1 / global items with no world-size
factor. The gradient sync mode chooses between a reduce-scatter in every backward
(``every_micro_batch``: sharded gradients only) and one in the window's last backward
(``step_end``: an unsharded gradient held per rank until then). ``auto`` chooses from the memory
there is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from bigbatch.choices import GRADIENT_SYNCS, GradientSync, one_of

logger = logging.getLogger(__name__)

try:  # FSDP2 is in torch.distributed.fsdp from torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - a torch without FSDP2
    FSDPModule = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_fsdp(model: torch.nn.Module) -> bool:
    """True for a model whose root was sharded with FSDP2's `fully_shard`."""
    return FSDPModule is not None and isinstance(model, FSDPModule)


def fsdp_modules(model: torch.nn.Module) -> list[Any]:
    """Every FSDP2 module in the model, root included."""
    if FSDPModule is None:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def default_shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard on their own when a recipe names none.

    Every outermost module (below the root) of a class that occurs more than once, has modules
    of its own and holds parameters: the repeated blocks of a transformer or a ResNet (not its
    layers, such as two Embeddings). A model without repeated blocks: its top-level children that
    hold parameters.
    """
    counts: dict[type, int] = {}
    for module in model.modules():
        if module is not model and any(True for _ in module.parameters()):
            counts[type(module)] = counts.get(type(module), 0) + 1
    units: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if not any(True for _ in child.parameters()):
                continue
            repeated = counts.get(type(child), 0) > 1
            composite = any(True for _ in child.children())
            if repeated and composite and type(child) not in _CONTAINERS:
                units.append(child)
            else:
                visit(child)

    visit(model)
    if units:
        return units
    return [child for child in model.children() if any(True for _ in child.parameters())]


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def shard_model(
    model: torch.nn.Module,
    units: list[torch.nn.Module],
    *,
    world_size: int,
    device_type: str,
) -> torch.nn.Module:
    """`fully_shard` each unit, then the root, over a 1-D mesh of every rank; the root returned.

    The parameters become DTensors (new objects): an optimizer built before must be rebound
    (`rebind_optimizer`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for unit in units:
        if unit is not model:
            fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    before: dict[int, str],
    model: torch.nn.Module,
) -> None:
    """Point an optimizer built over a model's parameters at the same parameters after sharding.

    Args:
        before: ``id(parameter) -> name`` taken before `shard_model`.

    Raises:
        ValueError: the optimizer holds a parameter that is not the model's, or has state already.
    """
    if any(optimizer.state.values()):
        raise ValueError("the optimizer has state already: build it before the first step")
    after = dict(model.named_parameters())
    for group in optimizer.param_groups:
        rebound = []
        for parameter in group["params"]:
            name = before.get(id(parameter))
            if name is None or name not in after:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            rebound.append(after[name])
        group["params"] = rebound
    optimizer.state.clear()


def use_sum_reduction(model: torch.nn.Module) -> None:
    """Make every FSDP module's gradient reduce-scatter a plain sum over ranks.

    Both setters act on one module only. The divide factor alone would use PREMUL_SUM, which gloo
    does not have; forcing sum reduction makes the collective a SUM on every backend.
    """
    for module in fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def check_sharded_parameters(parameters: list[torch.nn.Parameter]) -> None:
    """Under FSDP every trained parameter must be sharded (fully_shard the root module too)."""
    plain = sum(1 for p in parameters if DTensor is None or not isinstance(p, DTensor))
    if plain:
        raise ValueError(
            f"{plain} trained parameter(s) are not sharded by FSDP: call fully_shard on the root "
            "module as well as on its blocks, so that every parameter's gradient is reduced"
        )


def prepare(model: torch.nn.Module, parameters: list[torch.nn.Parameter]) -> None:
    """Check a sharded model for the engine and set sum reduction on every FSDP module.

    Raises:
        ValueError: a trained parameter is not sharded.
    """
    check_sharded_parameters(parameters)
    use_sum_reduction(model)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a sharded parameter, gradient or optimizer state)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call it, in the same order),
    or a copy of the tensor itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor.clone()


def unsharded_gradient_bytes(parameters: list[torch.nn.Parameter]) -> int:
    """Bytes of a full (unsharded) gradient of these parameters: what step_end holds per rank."""
    return sum(p.numel() * p.element_size() for p in parameters)


def free_memory_bytes(device: torch.device) -> int | None:
    """Free device memory on CUDA; None elsewhere (assumed to fit)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def choose_gradient_sync(
    gradient_sync: str,
    *,
    sharded: bool,
    parameters: list[torch.nn.Parameter],
    device: torch.device,
    memory_budget_bytes: int | None,
) -> str:
    """``"every_micro_batch"`` or ``"step_end"``: the mode asked for, or what ``auto`` picks.

    ``auto`` picks step_end unless the model is sharded and its unsharded gradient does not fit
    the budget (default: the device's free memory on CUDA; on CPU it is assumed to fit), and logs
    which and why, once.
    """
    if gradient_sync not in GRADIENT_SYNCS:
        raise ValueError(f"gradient_sync must be {one_of(GRADIENT_SYNCS)}, got {gradient_sync!r}")
    if gradient_sync != "auto":
        return gradient_sync
    if not sharded:
        # A replicated model holds a full gradient anyway: one sync per step costs no memory.
        return "step_end"
    needed = unsharded_gradient_bytes(parameters)
    budget = memory_budget_bytes if memory_budget_bytes is not None else free_memory_bytes(device)
    chosen: GradientSync = "step_end" if budget is None or needed <= budget else "every_micro_batch"
    logger.info(
        "gradient_sync auto: %s (the unsharded gradient needs %.3g GB per rank; %s)",
        chosen,
        needed / 1e9,
        "no memory budget on this device: assumed to fit"
        if budget is None
        else f"budget {budget / 1e9:.3g} GB: {'fits' if chosen == 'step_end' else 'does not fit'}",
    )
    return chosen


def _fsdp_params(model: torch.nn.Module) -> Iterator[Any]:
    """FSDP2's per-parameter state of every FSDP module (its internals: they are not public)."""
    for module in fsdp_modules(model):
        try:
            group = module._get_fsdp_state()._fsdp_param_group
        except AttributeError:  # pragma: no cover - internals changed
            continue
        if group is not None:
            yield from group.fsdp_params


def unsharded_gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    """The unsharded gradients FSDP2 holds now: a step_end window's accumulated ones and those
    of a backward not yet reduce-scattered (read through its internals, best effort)."""
    found = []
    for fsdp_param in _fsdp_params(model):
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        for grad in (
            getattr(fsdp_param, "unsharded_accumulated_grad", None),
            None if unsharded is None else unsharded.grad,
        ):
            if grad is not None:
                found.append(grad)
    return found


def clear_unsharded_gradients(model: torch.nn.Module) -> None:
    """Drop unsharded gradients FSDP may hold from an unfinished step_end window.

    Best effort through FSDP2's internals (they are not public); a window that ran to its end
    holds none.
    """
    for fsdp_param in _fsdp_params(model):
        if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
            fsdp_param.unsharded_accumulated_grad = None
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None and unsharded.grad is not None:
            unsharded.grad = None
