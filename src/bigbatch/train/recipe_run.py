"""A run built from a recipe: what `bigbatch train` runs, alone or under torchrun.

The recipe gives the model, optimizer, loss and datasets; its defaults fill what the config
leaves unset; `Trainer` runs them.
"""

from __future__ import annotations

import time
from pathlib import Path

from bigbatch import recipes
from bigbatch.core import distributed
from bigbatch.train import environment, setup
from bigbatch.train.config import Config
from bigbatch.train.configfile import with_recipe_defaults
from bigbatch.train.state import RunSummary
from bigbatch.train.trainer import Trainer

__all__ = ["fit"]


def fit(
    config: Config,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Train the config's recipe: what `bigbatch train` runs, alone or under torchrun.

    The recipe's defaults fill what the config leaves unset; the run directory defaults to
    ``runs/<recipe>-<time>`` (pass out_dir to resume). The batchnorm policy is applied before
    the optimizer is built.
    """
    distributed.setup_process_group(timeout_s=config.collective_timeout)
    environment.seed_everything(config.seed)  # the model's initialisation, the same on every rank
    recipe = recipes.build(config.recipe, config.model_dump())
    config = with_recipe_defaults(config, recipe.defaults)
    if out_dir is None:
        name = f"runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path(distributed.rank_0_value(name))  # one place for every rank
    world_size = distributed.get_world_size()
    device_type = environment.resolve_device(config.device).type
    model = setup.apply_batchnorm_policy_once(
        recipe.model, config.batchnorm, world_size, device_type
    )
    optimizer = recipe.build_optimizer(model, config.lr, config.weight_decay)
    trainer = Trainer(
        model,
        optimizer,
        recipe.loss_fn,
        recipe.train_dataset,
        config,
        eval_dataset=recipe.eval_dataset,
        collate_fn=recipe.collate_fn,
        eval_fn=recipe.eval_fn,
        run_dir=out_dir,
        progress=progress,
        name=recipe.name,
        sample_length=recipe.sample_length,
        collate_packed=recipe.collate_packed,
        shard_units=recipe.shard_units,
    )
    return trainer.fit(resume=resume, overwrite=overwrite)
