"""TRL's preference and GRPO-style training with the full-batch gradient.

TRL's `DPOTrainer` averages each micro-batch's pairs and the Trainer divides that mean by the
accumulation steps: the full-batch mean over pairs only when every micro-batch holds as many
pairs, which the short last window of an epoch does not. `ExactPreferenceMixin`, put before
`DPOTrainer`, counts the pairs of the whole window on every rank first and turns each
micro-batch's loss into its pair sum over that count (docs/design.md, invariant 1).

For a loop of your own (a GRPO-style loop, or DPO without the Trainer), `dpo_loss_fn` and
`policy_gradient_loss_fn` read TRL's batch layouts -- `DataCollatorForPreference`'s pairs (one
row per pair, by `preference_pairs`) and `GRPOTrainer`'s generation batch -- and return
``(loss_sum, num_items)`` through `bigbatch.losses`, for `Accumulator.step`. Nothing of `trl`
is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bigbatch.losses import Normalization, PreferenceKind, dpo_loss, policy_gradient_loss

__all__ = [
    "ExactPreferenceMixin",
    "completion_logps",
    "dpo_loss_fn",
    "policy_gradient_loss_fn",
    "preference_pairs",
]

Batch = Mapping[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Any]]
PAIRED_KEYS = ("input_ids", "attention_mask", "completion_mask")
"""The preference collator's tensors that stack the chosen rows over the rejected ones."""


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_positions: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of the last `num_positions` tokens of every row, as TRL computes them.

    Position t is scored by the logits at t - 1, divided by `temperature` (GRPO samples with
    one; DPO uses 1). Half-precision logits are upcast to float32, float64 stays float64.

    Returns:
        [rows, num_positions] log p(token t | tokens before t).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -num_positions - 1 : -1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    targets = input_ids[:, -num_positions:].unsqueeze(-1)
    return log_probs.gather(-1, targets).squeeze(-1)


def preference_pairs(batch: Batch) -> dict[str, torch.Tensor]:
    """TRL's preference micro-batch as one row per pair, which bigbatch may split and re-split.

    `DataCollatorForPreference` stacks the chosen completions over the rejected ones (2 x pairs
    rows) and adds the reference log-probs with one entry per pair. Cut by rows, as the engine
    cuts micro-batches (uneven splits, out-of-memory re-splits), that layout would pair the wrong
    rows; here the halves sit side by side: ``chosen_input_ids``, ``rejected_input_ids`` (and the
    same for ``attention_mask`` and ``completion_mask``), ``ref_chosen_logps`` and
    ``ref_rejected_logps`` where the batch has them, every tensor with one row per pair.
    """
    missing = [key for key in PAIRED_KEYS if key not in batch]
    if missing:
        raise ValueError(
            f"a preference batch needs {', '.join(PAIRED_KEYS)} (DataCollatorForPreference's "
            f"output), missing {', '.join(missing)}"
        )
    pairs: dict[str, torch.Tensor] = {}
    for key in PAIRED_KEYS:
        pairs[f"chosen_{key}"], pairs[f"rejected_{key}"] = batch[key].chunk(2)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in batch:
            pairs[key] = batch[key]
    return pairs


def dpo_loss_fn(
    beta: float = 0.1,
    kind: PreferenceKind = "sigmoid",
    ref_model: torch.nn.Module | None = None,
) -> LossFn:
    """A loss function for `Accumulator.step` on TRL's preference pairs.

    A micro-batch is `preference_pairs` of what `DataCollatorForPreference` makes, with
    ``ref_chosen_logps`` and ``ref_rejected_logps`` as `DPOConfig(precompute_ref_log_probs=True)`
    adds them, or else a `ref_model` to compute them. Each response's log-probability is the sum
    over its completion tokens (for ``"ipo"`` their mean, as TRL does); the loss is
    `bigbatch.losses.dpo_loss`, one item per pair.
    """

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if "chosen_input_ids" not in batch:
            raise ValueError(
                "dpo_loss_fn takes one row per pair, so that any split keeps each pair whole: "
                "pass preference_pairs(batch) of the collated batch"
            )
        (chosen, rejected), lengths = _response_logps(model, batch)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif ref_model is not None:
            with torch.no_grad():
                (ref_chosen, ref_rejected), _ = _response_logps(ref_model, batch)
        else:
            raise ValueError(
                "dpo_loss_fn needs the reference log-probs: a batch with ref_chosen_logps and "
                "ref_rejected_logps (DPOConfig(precompute_ref_log_probs=True)) or ref_model="
            )
        if kind == "ipo":  # TRL scores IPO by the per-token mean of each response
            chosen_lengths, rejected_lengths = lengths
            chosen, ref_chosen = chosen / chosen_lengths, ref_chosen / chosen_lengths
            rejected, ref_rejected = rejected / rejected_lengths, ref_rejected / rejected_lengths
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, kind=kind)

    return loss_fn


def _response_logps(
    model: torch.nn.Module, pairs: Batch
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(chosen, rejected) summed completion log-probs and completion lengths (at least 1).

    Both responses of every pair go through one forward, as TRL runs them."""
    rows = {key: _stacked(pairs, key) for key in PAIRED_KEYS}
    width = rows["input_ids"].shape[1]
    token_logps = completion_logps(model, rows["input_ids"], rows["attention_mask"], width - 1)
    mask = rows["completion_mask"][:, 1:].to(token_logps.dtype)
    logps, lengths = (token_logps * mask).sum(dim=1), mask.sum(dim=1).clamp(min=1)
    return logps.chunk(2), lengths.chunk(2)


def _stacked(pairs: Batch, key: str) -> torch.Tensor:
    """The chosen rows over the rejected rows, right-padded with zeros to one width."""
    chosen, rejected = pairs[f"chosen_{key}"], pairs[f"rejected_{key}"]
    width = max(chosen.shape[1], rejected.shape[1])
    return torch.cat(
        [
            F.pad(chosen, (0, width - chosen.shape[1])),
            F.pad(rejected, (0, width - rejected.shape[1])),
        ]
    )


def policy_gradient_loss_fn(
    normalization: Normalization,
    max_length: int | None = None,
    clip_range: float | tuple[float, float] = 0.2,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> LossFn:
    """A loss function for `Accumulator.step` on micro-batches of TRL's GRPO generation batch.

    A micro-batch holds ``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``
    and ``advantages`` (one per completion), and where TRL has them ``old_per_token_logps`` (else
    the current log-probs, detached: ratio 1), ``ref_per_token_logps`` (for ``beta`` > 0) and
    ``tool_mask``. The loss is `bigbatch.losses.policy_gradient_loss`: `normalization`
    ``"sequence"`` is TRL's ``loss_type="grpo"``, ``"token"`` its ``"dapo"`` (and ``"bnpo"``
    over the global batch), ``"constant"`` its ``"dr_grpo"`` with `max_length` =
    ``max_completion_length``; `clip_range` is (``epsilon``, ``epsilon_high``).
    """

    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Any]:
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
        logps = completion_logps(
            model, input_ids, attention_mask, completion_ids.shape[1], temperature
        )
        old_logps = batch.get("old_per_token_logps")
        mask = completion_mask if "tool_mask" not in batch else completion_mask * batch["tool_mask"]
        return policy_gradient_loss(
            logps,
            logps.detach() if old_logps is None else old_logps,
            batch["advantages"],
            mask,
            normalization,
            max_length=max_length,
            clip_range=clip_range,
            ref_logps=batch.get("ref_per_token_logps"),
            kl_coef=beta,
        )

    return loss_fn


class ExactPreferenceMixin:
    """Make a TRL preference trainer exact: ``class Trainer(ExactPreferenceMixin, DPOTrainer)``.

    Before a window's first backward the Trainer asks for the window's item count; this mixin
    answers with its preference pairs (half the rows of every micro-batch), summed over the
    ranks. Each micro-batch's loss, TRL's mean over its pairs, is then multiplied by its pairs
    (giving their sum) and divided by that count, and the Trainer no longer divides by the
    accumulation steps: every step applies the mean over the window's pairs, whatever their
    split (under DDP, which averages the ranks' gradients, times the number of ranks). It
    relies on the trainer's loss being a mean over the micro-batch's pairs, true of every
    ``loss_type`` of `DPOTrainer`; a MoE router loss added to it is weighted by pairs too.
    """

    loss_is_scaled_for_ga = True
    args: Any
    accelerator: Any

    def _get_num_items_in_batch(
        self, batch_samples: list[Batch], device: torch.device
    ) -> torch.Tensor:
        pairs = sum(int(batch["input_ids"].shape[0]) // 2 for batch in batch_samples)
        count = torch.tensor(pairs, device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: Batch,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if num_items_in_batch is None or not model.training:
            return result  # evaluation: TRL's mean per batch, as before
        loss, outputs = result if return_outputs else (result, None)
        pairs = int(inputs["input_ids"].shape[0]) // 2
        loss = loss * (pairs * self.accelerator.num_processes) / num_items_in_batch
        return (loss, outputs) if return_outputs else loss
