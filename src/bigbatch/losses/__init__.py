"""Losses written as ``(loss_sum, num_items)``, so that a split window gives the full-batch loss.

Each function returns the sum of its micro-batch's per-item losses and the number of items they
are averaged over; `bigbatch.Accumulator` adds both over the window and every rank and divides
once, which is the full-batch loss each docstring states (docs/design.md, invariant 1). What an
item is differs: a scored token (`token_cross_entropy`), a labelled row
(`sequence_classification`), a preference pair (`dpo_loss`), or a sequence, a token or a fixed
budget of token slots (`policy_gradient_loss`'s normalisations). See docs/losses.md.

Part of the core layer: torch only, nothing of configs, files or the command line.
"""

from __future__ import annotations

from bigbatch.losses.policy import Normalization, policy_gradient_loss
from bigbatch.losses.preference import PreferenceKind, dpo_loss
from bigbatch.losses.tokens import ProblemType, sequence_classification, token_cross_entropy

__all__ = [
    "Normalization",
    "PreferenceKind",
    "ProblemType",
    "dpo_loss",
    "policy_gradient_loss",
    "sequence_classification",
    "token_cross_entropy",
]
