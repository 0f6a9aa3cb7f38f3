"""Recipes whose loss_fn sleeps STEP_DELAY seconds, so that a run is slow enough to be signalled
or raced; tests write them into their directory as a module the config names: `slow:build`
(digits, in samples) and `slow:build_tokens` (tinylm, for global batches in tokens)."""

SLOW_RECIPE = """
import os, time
from bigbatch.recipes import digits, tinylm

def build(config):
    return slowed(digits.build(config))

def build_tokens(config):
    return slowed(tinylm.build(config))

def slowed(recipe):
    plain, delay = recipe.loss_fn, float(os.environ.get("STEP_DELAY", "0"))

    def loss_fn(model, batch):
        time.sleep(delay)
        return plain(model, batch)

    recipe.loss_fn = loss_fn
    return recipe
"""
