"""bigbatch: train with the batch you want on the memory you have.

A run is defined by its global batch; bigbatch plans the split into micro-batches, ranks and
accumulation steps, and applies every optimizer step exactly as one big batch would.
"""

from bigbatch.data import GlobalBatchSampler, WindowLoader
from bigbatch.engine import Accumulator, LossFn, StepResult
from bigbatch.plan import BatchSizeSchedule, Plan, plan, scale_learning_rate
from bigbatch.trainer import Trainer, fit

__all__ = [
    "Accumulator",
    "BatchSizeSchedule",
    "GlobalBatchSampler",
    "LossFn",
    "Plan",
    "StepResult",
    "Trainer",
    "WindowLoader",
    "fit",
    "plan",
    "scale_learning_rate",
]
__version__ = "0.1.0"
