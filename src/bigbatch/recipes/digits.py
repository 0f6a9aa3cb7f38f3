"""The `digits` recipe: a small convnet on scikit-learn's bundled 8x8 handwritten digits.

The default task: no download, trains to >= 95% test accuracy on a CPU in well under a minute with
a global batch of 256 over micro-batches of 16. `digits` has no BatchNorm, so every split gives the
same update; `digits-bn` adds BatchNorm2d after the convolutions to show what breaks equivalence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bigbatch.recipes import Recipe, check_options
from bigbatch.units import UsageError

SPLIT_SEED = 0
"""The train/test split is fixed (independent of the run's seed) so test accuracies compare."""
TEST_FRACTION = 0.2
NUM_CLASSES = 10

DEFAULTS: dict[str, Any] = {
    "global_batch_size": 256,
    "micro_batch_size": 16,
    "max_steps": 100,
    "lr": 0.003,
    "eval_every": 25,
}


class ConvNet(torch.nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a two-layer classifier head (about 90k weights).

    Args:
        batchnorm: put a BatchNorm2d after each convolution (breaks the split-invariance of the
            update: its statistics depend on the micro-batch).
    """

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()

        def norm(channels: int) -> torch.nn.Module:
            return torch.nn.BatchNorm2d(channels) if batchnorm else torch.nn.Identity()

        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            norm(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            norm(32),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 4 * 4, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape (samples, 10) for images of shape (samples, 1, 8, 8)."""
        return self.head(self.features(images))


def load_datasets() -> tuple[TensorDataset, TensorDataset]:
    """The bundled digits as (train, test) datasets of (image, label), a fixed 80/20 split.

    Pixels are scaled from 0..16 to 0..1; images have shape (1, 8, 8).
    """
    try:
        from sklearn.datasets import load_digits  # optional dependency, bundled data (offline)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "sklearn":
            raise  # scikit-learn is there but broken: its own error
        raise UsageError(
            "the digits recipes read the 8x8 digits bundled with scikit-learn, which is not "
            "installed: pip install 'bigbatch[full]' (or scikit-learn)"
        ) from None

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_test = int(round(TEST_FRACTION * len(labels)))
    test, train = order[:num_test], order[num_test:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def loss_fn(
    model: torch.nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Sum of the per-sample cross-entropy and the number of samples (every sample is an item)."""
    images, labels = micro_batch
    logits = model(images.to(_dtype(model)))
    return F.cross_entropy(logits, labels, reduction="sum"), labels.shape[0]


def eval_fn(
    model: torch.nn.Module, micro_batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Summed loss and correct predictions of one batch, with their counts."""
    images, labels = micro_batch
    with torch.no_grad():
        logits = model(images.to(_dtype(model)))
        loss_sum = float(F.cross_entropy(logits, labels, reduction="sum"))
        correct = float((logits.argmax(dim=1) == labels).sum())
    count = float(labels.shape[0])
    return {"loss": (loss_sum, count), "accuracy": (correct, count)}


def _dtype(model: torch.nn.Module) -> torch.dtype:
    """The model's floating dtype, so a float64 copy (as `bigbatch verify` makes) gets float64."""
    return next(model.parameters()).dtype


def _build(config: Mapping[str, Any], *, batchnorm: bool) -> Recipe:
    check_options("digits-bn" if batchnorm else "digits", config.get("recipe_options") or {}, [])
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(int(config.get("seed", 0) or 0))
        model = ConvNet(batchnorm=batchnorm)
    train, test = load_datasets()
    return Recipe(
        name="digits-bn" if batchnorm else "digits",
        model=model,
        train_dataset=train,
        eval_dataset=test,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        optimizer="adamw",
        defaults=dict(DEFAULTS),
    )


def build(config: Mapping[str, Any]) -> Recipe:
    """The `digits` recipe: a convnet without BatchNorm; the model is seeded by config["seed"]."""
    return _build(config, batchnorm=False)


def build_batchnorm(config: Mapping[str, Any]) -> Recipe:
    """The `digits-bn` recipe: the same convnet with BatchNorm2d after each convolution."""
    return _build(config, batchnorm=True)
