"""A digits recipe whose loss_fn sleeps STEP_DELAY seconds, so that a run is slow enough to be
signalled or raced; tests write it into their directory as a module the config names."""

SLOW_RECIPE = """
import os, time
from bigbatch.recipes import digits

def build(config):
    recipe = digits.build(config)
    plain, delay = recipe.loss_fn, float(os.environ.get("STEP_DELAY", "0"))

    def loss_fn(model, batch):
        time.sleep(delay)
        return plain(model, batch)

    recipe.loss_fn = loss_fn
    return recipe
"""
