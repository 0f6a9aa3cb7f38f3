"""bigbatch: train with the batch you want on the memory you have.

A run is defined by its global batch; bigbatch plans the split into micro-batches, ranks and
accumulation steps, and applies every optimizer step exactly as one big batch would.
"""

from bigbatch.engine import Accumulator, LossFn, StepResult
from bigbatch.plan import Plan, plan

__all__ = ["Accumulator", "LossFn", "Plan", "StepResult", "plan"]
__version__ = "0.1.0"
