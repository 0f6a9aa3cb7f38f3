"""Ready tasks: each a `build(config)` returning a `Recipe` (model, datasets, loss_fn, defaults).

A recipe is named by a short name from `RECIPES` or by `module:function` for a user's own, e.g.
`recipe: mypkg.tasks:build`. `build` receives the resolved config as a plain dict (it reads `seed`
and its own `recipe_options`) and must not download anything.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from bigbatch.core.engine import LossFn
from bigbatch.units import UsageError, UsageTypeError, shorten

RECIPES: dict[str, str] = {
    "digits": "bigbatch.recipes.digits:build",
    "digits-bn": "bigbatch.recipes.digits:build_batchnorm",
    "tinylm": "bigbatch.recipes.tinylm:build",
}

EvalFn = Callable[[torch.nn.Module, Any], Mapping[str, tuple[float, float]]]
"""eval_fn(model, micro_batch) -> {metric: (sum, count)}; the trainer reports sum / count."""


@dataclass
class Recipe:
    """What a task hands the trainer.

    Attributes:
        name: a short name for run directories and reports.
        model: the freshly initialised model (on CPU; the trainer moves it).
        train_dataset: a map-style dataset of samples.
        eval_dataset: a held-out map-style dataset, or None.
        loss_fn: ``loss_fn(model, micro_batch) -> (loss_sum, num_items)`` (see `bigbatch.LossFn`).
        collate_fn: turns a list of samples into one micro-batch (padding per micro-batch), or
            None for torch's default collation.
        eval_fn: per-batch evaluation sums, e.g. ``{"loss": (loss_sum, items),
            "accuracy": (correct, samples)}``; None: the loss alone.
        optimizer: ``"adamw"`` or ``"sgd"``, built by the trainer with `lr` and `weight_decay`.
        defaults: config values this recipe suggests (global_batch_size, micro_batch_size,
            max_steps, lr, ...); the user's config wins.
        sample_length: ``sample_length(sample)``, a sample's input tokens, for global batches in
            tokens when the train dataset has no ``lengths`` attribute (docs/tokens.md).
        collate_packed: rows of samples -> one packed micro-batch (several sequences a row,
            positions and attention kept within each), for ``packing: true``; None: the model
            does not support packing.
        shard_units: ``shard_units(model)``, the modules that `parallelism: fsdp` shards each on
            its own (its transformer blocks, say), before the root; None: every outermost module
            of a class repeated in the model, else the top-level children holding parameters
            (`bigbatch.core.sharding.default_shard_units`).
    """

    name: str
    model: torch.nn.Module
    train_dataset: Dataset[Any]
    eval_dataset: Dataset[Any] | None
    loss_fn: LossFn
    collate_fn: Callable[[list[Any]], Any] | None = None
    eval_fn: EvalFn | None = None
    optimizer: str = "adamw"
    defaults: dict[str, Any] = field(default_factory=dict)
    sample_length: Callable[[Any], int] | None = None
    collate_packed: Callable[[list[list[Any]]], Any] | None = None
    shard_units: Callable[[torch.nn.Module], list[torch.nn.Module]] | None = None

    def build_optimizer(
        self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0
    ) -> torch.optim.Optimizer:
        """The recipe's optimizer by name over the model's trainable parameters: "adamw", or
        "sgd" (momentum 0.9)."""
        parameters = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
        raise UsageError(
            f"recipe optimizer must be 'adamw' or 'sgd', got {shorten(self.optimizer)}"
        )


def resolve(spec: str) -> Callable[[Mapping[str, Any]], Recipe]:
    """The build function of a recipe name or `module:function` spec.

    A module is imported like any Python import, so its code runs; the current directory is on
    the search path, as under ``python -m`` (the ``bigbatch`` console script would not have it).

    Raises:
        UsageError: an unknown name, a module that does not exist or a missing function. An
            error raised while the module runs (its own bad import, a syntax error) propagates
            with its traceback: it is the module's, not the config's.
    """
    target = RECIPES.get(spec, spec)
    if ":" not in target:
        raise UsageError(
            f"recipe {shorten(spec)} is unknown: use one of {', '.join(sorted(RECIPES))} or "
            "'module:function' for your own"
        )
    module_name, _, function_name = target.partition(":")
    _current_directory_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not _is_prefix(error.name, module_name):
            raise  # the module exists and imports something missing: its own error
        raise UsageError(
            f"recipe {shorten(spec)}: no module named {error.name!r} (looked in the current "
            f"directory {os.getcwd()!r} and the installed packages)"
        ) from None
    except (ImportError, TypeError, ValueError) as error:  # an empty or relative module name
        if module_name and not module_name.startswith("."):
            raise
        raise UsageError(
            f"recipe {shorten(spec)}: cannot import {module_name!r} ({error})"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(
            f"recipe {shorten(spec)}: module {module_name!r} has no function {function_name!r}"
        )
    return function  # type: ignore[no-any-return]


def _is_prefix(missing: str, module_name: str) -> bool:
    """True when the missing module is the one asked for or a package on its way."""
    return module_name == missing or module_name.startswith(missing + ".")


def _current_directory_on_path() -> None:
    """Put the current directory first on sys.path, as ``python -m`` does, once."""
    here = os.getcwd()
    if not any(os.path.abspath(entry or ".") == here for entry in sys.path):
        sys.path.insert(0, here)


RECIPE_IS = (
    "a recipe is a 'module:function' whose function takes the config mapping and returns a "
    "bigbatch.recipes.Recipe"
)


def build(spec: str, config: Mapping[str, Any]) -> Recipe:
    """Build a recipe by name or `module:function` with the resolved config.

    Raises:
        UsageTypeError: the function is no recipe builder: it is annotated to return something
            else, cannot be called with the config alone, or returns something else. A
            TypeError raised inside the function itself propagates with its traceback.
    """
    function = resolve(spec)
    name = f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"
    returns = _return_annotation(function)
    if isinstance(returns, type) and returns is not object and not issubclass(returns, Recipe):
        raise UsageTypeError(
            f"recipe {shorten(spec)}: {name} returns {returns.__name__}, not a Recipe; {RECIPE_IS}"
        )
    try:
        recipe = function(config)
    except TypeError as error:
        if error.__traceback__ is not None and error.__traceback__.tb_next is not None:
            raise  # raised inside the function: its own file and line matter
        raise UsageTypeError(
            f"recipe {shorten(spec)}: {name} cannot be called with the config ({error}); "
            f"{RECIPE_IS}"
        ) from None
    if not isinstance(recipe, Recipe):
        raise UsageTypeError(
            f"recipe {shorten(spec)}: {name} returned {type(recipe).__name__}, not a Recipe; "
            f"{RECIPE_IS}"
        )
    return recipe


def _return_annotation(function: Callable[..., Any]) -> Any:
    """The function's return annotation, evaluated; None when it has none or it cannot be read."""
    try:
        returns = inspect.signature(function, eval_str=True).return_annotation
    except Exception:  # no signature (some builtins), or an annotation that does not evaluate
        return None
    return None if returns is inspect.Signature.empty else returns


def check_options(recipe: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    """Refuse a recipe_options key the recipe does not know, with the closest known one."""
    for key in sorted(set(given) - set(known), key=str):
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        allowed = f"allowed: {', '.join(sorted(known))}" if known else f"{recipe} takes no options"
        raise UsageError(
            f"recipe_options for {recipe}: unknown key {shorten(str(key))}{hint}; {allowed}"
        )
