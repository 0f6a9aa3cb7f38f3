"""The PPO-clip policy-gradient loss of GRPO-style training as ``(loss_sum, num_items)``, in the
three normalisations these methods use.

A per-token surrogate is the same in all three; what differs is what it is averaged over: each
sequence's token mean then the mean over sequences (GRPO, items = sequences), every token of the
global batch (DAPO, items = tokens), or a constant budget of sequences x max_length token slots
(Dr. GRPO). Returning the sum and that item count lets `bigbatch.Accumulator` divide once by the
global batch's count, which is exact for each (docs/design.md, invariant 1).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["sequence", "token", "constant"]
NORMALIZATIONS: tuple[Normalization, ...] = ("sequence", "token", "constant")


def policy_gradient_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normalization: Normalization,
    max_length: int | None = None,
    clip_range: float | tuple[float, float] = 0.2,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """PPO-clip surrogate (plus an optional KL term) summed over the micro-batch, and its items.

    Per token t of sequence s, with ratio rho = exp(logps - old_logps), A the sequence's
    advantage and k3 = exp(ref - logps) - (ref - logps) - 1 (the KL estimator TRL uses):

        l[s, t] = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + kl_coef * k3.

    With m the mask (1 on the tokens that carry loss), the global batch's N sequences and
    tokens T = sum m, the full-batch loss is, by ``normalization``:

    - ``"sequence"`` (GRPO): L = (1 / N) * sum_s [sum_t m l / max(1, sum_t m)]; items = N;
    - ``"token"`` (DAPO): L = (1 / T) * sum_{s,t} m l; items = T (packed rows work alike,
      with advantages given per token);
    - ``"constant"`` (Dr. GRPO): L = (1 / (N * max_length)) * sum_{s,t} m l;
      items = N * max_length.

    ``old_logps``, ``advantages`` and ``ref_logps`` carry no gradient (they are detached).
    Half-precision inputs are computed in float32.

    Args:
        logps: [sequences, positions] the policy's log-prob of each sampled token.
        old_logps: [sequences, positions] the same under the policy that sampled them.
        advantages: [sequences] one per sequence, or [sequences, positions] one per token.
        mask: [sequences, positions], 1 (True) on tokens that carry loss, 0 on padding.
        normalization: ``"sequence"``, ``"token"`` or ``"constant"``.
        max_length: the constant's token slots per sequence (``"constant"`` only), e.g. the
            maximum completion length.
        clip_range: eps, or (eps_low, eps_high) as DAPO's clip-higher.
        ref_logps: [sequences, positions] the reference model's log-probs (for the KL term).
        kl_coef: the KL term's weight (beta in TRL); > 0 needs ``ref_logps``.

    Returns:
        (loss_sum, num_items): a 0-dim float tensor and an int (an integer-valued 0-dim tensor
        for ``"token"``).

    Raises:
        ValueError: an unknown ``normalization``, ``max_length`` missing or not positive for
            ``"constant"``, shapes that do not match, a bad ``clip_range`` or ``kl_coef``.

    Example:
        >>> logps = torch.zeros(2, 3)  # ratio 1: l = -A on every token
        >>> mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
        >>> loss_sum, num_items = policy_gradient_loss(
        ...     logps, logps, torch.tensor([1.0, -2.0]), mask, "token")
        >>> float(loss_sum), int(num_items)  # -(1 + 1 + 1) + 2
        (-1.0, 4)
    """
    low, high = _check(logps, old_logps, advantages, mask, normalization, max_length, clip_range)
    _check_kl(logps, ref_logps, kl_coef)
    per_token = _per_token_loss(logps, old_logps, advantages, (low, high), ref_logps, kl_coef)
    dtype = per_token.dtype
    weights = mask.to(dtype)
    masked = per_token * weights
    sequences = int(logps.shape[0])
    if normalization == "sequence":
        per_sequence = masked.sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return per_sequence.sum(), sequences
    if normalization == "token":
        return masked.sum(), mask.sum()
    assert max_length is not None  # _check
    return masked.sum(), sequences * max_length


def _per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip: tuple[float, float],
    ref_logps: torch.Tensor | None,
    kl_coef: float,
) -> torch.Tensor:
    """l[s, t] of `policy_gradient_loss`, in float32 at least."""
    logps = _at_least_float32(logps)
    dtype = logps.dtype
    advantage = advantages.detach().to(dtype)
    if advantage.dim() == 1:
        advantage = advantage.unsqueeze(1)
    ratio = torch.exp(logps - old_logps.detach().to(dtype))
    clipped = torch.clamp(ratio, 1 - clip[0], 1 + clip[1])
    per_token = -torch.minimum(ratio * advantage, clipped * advantage)
    if ref_logps is not None and kl_coef:
        difference = ref_logps.detach().to(dtype) - logps
        per_token = per_token + kl_coef * (torch.exp(difference) - difference - 1)
    return per_token


def _check(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normalization: str,
    max_length: int | None,
    clip_range: float | tuple[float, float],
) -> tuple[float, float]:
    """Validate the arguments; return (eps_low, eps_high)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}"
        )
    if normalization == "constant" and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise ValueError(
            f'max_length must be a positive int with normalization="constant" (the token slots '
            f"per sequence it divides by), got {max_length!r}"
        )
    if logps.dim() != 2:
        raise ValueError(f"logps must be [sequences, positions], got shape {tuple(logps.shape)}")
    for name, tensor in (("old_logps", old_logps), ("mask", mask)):
        if tensor.shape != logps.shape:
            raise ValueError(
                f"{name} of shape {tuple(tensor.shape)} must match logps of shape "
                f"{tuple(logps.shape)}"
            )
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"advantages must be one per sequence {tuple(logps.shape[:1])} or one per token "
            f"{tuple(logps.shape)}, got shape {tuple(advantages.shape)}"
        )
    bounds = tuple(clip_range) if isinstance(clip_range, (tuple, list)) else (clip_range,) * 2
    if len(bounds) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 for b in bounds
    ):
        raise ValueError(
            f"clip_range must be a number >= 0 or a pair (low, high) of them, got {clip_range!r}"
        )
    return float(bounds[0]), float(bounds[1])


def _check_kl(logps: torch.Tensor, ref_logps: torch.Tensor | None, kl_coef: float) -> None:
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a number >= 0, got {kl_coef!r}")
    if kl_coef and ref_logps is None:
        raise ValueError(f"ref_logps is needed for the KL term of kl_coef={kl_coef}")
    if ref_logps is not None and ref_logps.shape != logps.shape:
        raise ValueError(
            f"ref_logps of shape {tuple(ref_logps.shape)} must match logps of shape "
            f"{tuple(logps.shape)}"
        )


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
