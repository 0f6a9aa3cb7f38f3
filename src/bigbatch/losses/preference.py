"""Direct preference optimisation losses (DPO and its IPO and hinge variants) as
``(loss_sum, num_items)``, one item per preference pair.

Each pair's loss depends on that pair alone, so the window's sum over its pairs divided by the
pairs of the whole global batch is the full-batch mean over pairs, whatever the split
(docs/design.md, invariant 1) -- where a mean per micro-batch divided by the accumulation steps is
not, for micro-batches of unequal sizes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PreferenceKind = Literal["sigmoid", "ipo", "hinge"]
PREFERENCE_KINDS: tuple[PreferenceKind, ...] = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    kind: PreferenceKind = "sigmoid",
) -> tuple[torch.Tensor, int]:
    """Preference loss summed over the micro-batch's pairs, and the number of pairs.

    With the policy's and the reference model's log-probabilities of each pair's chosen (c) and
    rejected (r) response, u_p = (c_p - ref_c_p) - (r_p - ref_r_p); over the P pairs of the
    global batch the loss is L = (1 / P) * sum_p l(u_p), where l is

    - ``"sigmoid"`` (DPO): l(u) = -log sigmoid(beta * u);
    - ``"ipo"`` (IPO): l(u) = (u - 1 / (2 * beta))^2 (TRL passes per-token mean log-probs here);
    - ``"hinge"`` (SLiC): l(u) = max(0, 1 - beta * u).

    The reference log-probabilities carry no gradient (they are detached here). Half-precision
    inputs are computed in float32.

    Args:
        chosen_logps, rejected_logps: [pairs] the policy's summed (or mean) response log-probs.
        ref_chosen_logps, ref_rejected_logps: [pairs] the same under the reference model.
        beta: the inverse temperature (> 0).
        kind: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.

    Returns:
        (loss_sum, num_items): a 0-dim float tensor and the number of pairs.

    Raises:
        ValueError: an unknown ``kind``, ``beta`` not positive, or inputs of different shapes or
            not one value per pair.

    Example:
        >>> zero = torch.zeros(4)  # the policy is the reference: u = 0, l = log 2
        >>> loss_sum, pairs = dpo_loss(zero, zero, zero, zero)
        >>> round(float(loss_sum) / pairs, 4), pairs
        (0.6931, 4)
    """
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(PREFERENCE_KINDS)}, got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    inputs = {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, tensor in inputs.items():
        if tensor.dim() != 1 or tensor.shape != chosen_logps.shape:
            raise ValueError(
                f"{name} must hold one value per pair, of shape {tuple(chosen_logps.shape[:1])} "
                f"like chosen_logps, got shape {tuple(tensor.shape)}"
            )
    chosen, rejected = _at_least_float32(chosen_logps), _at_least_float32(rejected_logps)
    reference = _at_least_float32(ref_chosen_logps.detach() - ref_rejected_logps.detach())
    margin = (chosen - rejected) - reference.to(chosen.dtype)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif kind == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    return losses.sum(), int(chosen_logps.shape[0])


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
