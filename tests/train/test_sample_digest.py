"""Every train line of metrics.jsonl carries `world_size` and `sample_digest`: the SHA-256 of the
step's dataset indices over every rank, sorted ascending, joined by commas. The expected digests
are computed here from the sampler's definition (numpy's permutation seeded with (seed, epoch),
cut into global batches): for 1 process here, for 1, 2 and 3 in tests/train/test_elastic.py. The
windows of every rank together hold exactly the indices the digest covers, in samples and in
packed token rows."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import Dataset

from bigbatch.data.loader import WindowLoader
from bigbatch.planning.unit import SampleUnit, TokenUnit
from bigbatch.train.configfile import validate
from bigbatch.train.metrics import read_metrics
from bigbatch.train.trainer import Trainer
from tests import models

N = 50  # steps of 16: 16, 16, 16, 2 (a short last global batch), then the next epoch
GLOBAL = 16
STEPS = 6


def expected_digests(seed: int, steps: int = STEPS, n: int = N, size: int = GLOBAL) -> list[str]:
    """The digest of each step, from the sampler's definition (docs/training.md)."""
    digests, epoch, position = [], 0, 0
    for _ in range(steps):
        if position == n:
            epoch, position = epoch + 1, 0
        order = np.random.default_rng([seed, epoch]).permutation(n)
        taken = sorted(int(i) for i in order[position : position + size])
        position = min(n, position + size)
        digests.append(hashlib.sha256(",".join(map(str, taken)).encode()).hexdigest())
    return digests


def _train(run_dir, seed: int = 0) -> list[dict]:
    torch.manual_seed(0)
    model = models.mlp()
    x, y = models.regression_data(N)

    def loss_fn(m, batch):
        return models.mse_per_sample(m, *batch).sum(), batch[0].shape[0]

    config = validate(
        dict(global_batch_size=GLOBAL, micro_batch_size=3, max_steps=STEPS, seed=seed)
        | dict(checkpoint_every=0, eval_every=0, trackers=[])
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = torch.utils.data.TensorDataset(x, y)
    Trainer(model, optimizer, loss_fn, dataset, config, run_dir=run_dir, progress=False).fit()
    return read_metrics(run_dir / "metrics.jsonl", "train")


def test_one_process_digests_follow_the_sampler_order_and_the_seed(tmp_path):
    lines = _train(tmp_path / "seed0")
    assert [line["world_size"] for line in lines] == [1] * STEPS
    assert [line["sample_digest"] for line in lines] == expected_digests(0)
    other = _train(tmp_path / "seed1", seed=1)
    assert [line["sample_digest"] for line in other] == expected_digests(1)
    assert all(a != b for a, b in zip(expected_digests(0), expected_digests(1), strict=True))


class _Indexed(Dataset):
    """Sample i is its own index, as a one-element tensor of i's length (a token sequence)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((self.lengths[index],), index)


def _rank_indices(unit_for_rank, lengths, steps, packed) -> list[list[int]]:
    """For each step, the dataset indices every rank's micro-batches hold, all ranks together,
    and check each step's Window.indices against them."""
    dataset = _Indexed(lengths)

    def first_tokens(samples: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([sample[:1] for sample in samples])  # the sample's index

    def packed_rows(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return first_tokens([sample for row in rows for sample in row])

    seen: list[list[int]] = [[] for _ in range(steps)]
    recorded: list[list[int]] = [[] for _ in range(steps)]
    unit = unit_for_rank()
    for rank in range(unit.world_size):
        loader = WindowLoader(
            dataset,
            unit=unit_for_rank(),
            global_batch_at=lambda step: 40 if packed else 7,
            seed=3,
            rank=rank,
            collate_fn=first_tokens,
            collate_packed=packed_rows if packed else None,
        )
        for step, window in zip(range(steps), loader, strict=False):
            for micro_batch in window.micro_batches:
                seen[step] += micro_batch.tolist()
            recorded[step] = sorted(int(i) for i in window.indices)
    for step in range(steps):
        assert sorted(seen[step]) == recorded[step], step  # every rank's samples, each once
    return recorded


def test_window_indices_are_every_ranks_samples():
    lengths = [1] * 20
    indices = _rank_indices(
        lambda: SampleUnit(20, world_size=3, micro_batch_size=2), lengths, 4, False
    )
    order = np.random.default_rng([3, 0]).permutation(20)
    assert indices[:2] == [sorted(order[:7].tolist()), sorted(order[7:14].tolist())]


def test_window_indices_are_every_ranks_documents_in_packed_token_rows():
    lengths = [((7 * i) % 9) + 1 for i in range(30)]
    indices = _rank_indices(
        lambda: TokenUnit(lengths, world_size=2, micro_batch_tokens=18, packing=True),
        lengths,
        3,
        True,
    )
    order = np.random.default_rng([3, 0]).permutation(30)
    taken = np.searchsorted(np.cumsum(np.asarray(lengths)[order]), 40) + 1  # until 40 tokens
    assert indices[0] == sorted(order[:taken].tolist())
