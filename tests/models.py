"""Small float64 models and data shared by the tests (no bigbatch imports)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
VOCAB = 11


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    ).double()


def regression_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return x, y


def mse_per_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean(dim=1)


class TokenModel(torch.nn.Module):
    """Embedding, a causal running mean over positions, and a projection: per-token logits."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        positions = torch.arange(1, tokens.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        hidden = torch.tanh(self.mix(hidden.cumsum(dim=1) / positions))
        return self.out(hidden)


def token_model() -> torch.nn.Module:
    return TokenModel().double()


def token_data(n: int, max_len: int = 9, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded variable-length sequences; labels are IGNORE on padding and random prompt tokens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, max_len), generator=generator)
    labels = torch.randint(0, VOCAB, (n, max_len), generator=generator)
    lengths = torch.randint(1, max_len + 1, (n,), generator=generator)
    positions = torch.arange(max_len).view(1, -1)
    padding = positions >= lengths.view(-1, 1)
    prompt = torch.rand(n, max_len, generator=generator) < 0.3
    tokens[padding] = 0
    labels[padding | prompt] = IGNORE
    return tokens, labels


def token_losses(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(
        logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view_as(labels)


def token_loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """The (loss_sum, num_items) form: sum over tokens that carry loss, and their count."""
    tokens, labels = batch
    return token_losses(model, tokens, labels).sum(), (labels != IGNORE).sum()


def token_mean_loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """What the textbook loop uses: the mean over this micro-batch's tokens."""
    tokens, labels = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE)


def token_item_losses(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """(per-token losses, 0/1 mask of the tokens that carry loss): the reference's form."""
    tokens, labels = batch
    return token_losses(model, tokens, labels), (labels != IGNORE).double()


class IndexedRegression(torch.utils.data.Dataset):
    """Regression samples that also return their index, to check which items a run used."""

    def __init__(self, n: int) -> None:
        self.x, self.y = regression_data(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i
