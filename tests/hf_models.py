"""Tiny transformers models built from configs (random init, nothing downloaded) and padded data.

Imports nothing from bigbatch: the references here must stay independent of the code under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 64
IGNORE = -100


def gpt2(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A two-layer GPT-2 with 32-wide embeddings, no dropout (so any split sees the same net)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype)


def causal_batch(rows: int, max_len: int = 12, seed: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded sequences of lengths 2..max_len; labels are the ids with -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (rows,), generator=generator)
    input_ids = torch.randint(1, VOCAB, (rows, max_len), generator=generator)
    attention_mask = (torch.arange(max_len).view(1, -1) < lengths.view(-1, 1)).long()
    input_ids[attention_mask == 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def rows_of(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


def causal_item_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token losses and their 0/1 mask, from sliced logits (not a padded shift)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = (targets != IGNORE).reshape(-1)
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), targets.clamp(min=0).reshape(-1), reduction="none"
    )
    return losses.masked_fill(~mask, 0.0), mask.to(losses.dtype)


class Rows(torch.utils.data.Dataset):
    """The rows of one padded batch, one dict per sample: what a framework's dataloader batches."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def global_batches(
    everything: dict[str, torch.Tensor], global_batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive global batches of a dataset held as one padded batch."""
    rows = len(everything["input_ids"])
    return [
        rows_of(everything, start, start + global_batch_size)
        for start in range(0, rows, global_batch_size)
    ]
