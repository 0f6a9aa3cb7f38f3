"""The `tinylm` recipe: a small GPT that learns multi-digit addition such as "123+45=168".

Only the answer tokens carry loss (labels are -100 on the operands and padding), and operands have
varying digit counts, so the number of loss items per sample varies: the case where `loss / k`
accumulation is wrong and bigbatch's per-item normalisation is exact. Sequences are padded per
micro-batch by `collate`. With `max_sums` above 1 a sample chains 1 to max_sums sums, their
count long-tailed, so sequence lengths vary widely (the case for global batches in tokens,
docs/tokens.md); `collate_packed` packs several sequences into one row, the model keeping
attention and positions within each sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bigbatch.recipes import Recipe, check_options
from bigbatch.units import UsageError, shorten

PLUS, EQUALS, END, PAD = 10, 11, 12, 13
VOCAB_SIZE = 14
IGNORE = -100
CHUNK_DIGITS = 18  # the most decimal digits an int64 draw covers whole (10**18 < 2**63)

DEFAULTS: dict[str, Any] = {
    "global_batch_size": 128,
    "micro_batch_size": 32,
    "max_steps": 1500,
    "lr": 0.002,
    # Without a warm-up the first Adam steps stall the model on a plateau for hundreds of steps.
    "warmup_steps": 30,
    "max_grad_norm": 1.0,
    "eval_every": 250,
}
OPTIONS: dict[str, int] = {
    "max_digits": 3,
    "num_train_samples": 20000,
    "num_eval_samples": 500,
    "d_model": 64,
    "num_layers": 2,
    "num_heads": 4,
    "max_sums": 1,
}
# The largest value of each option: a small task on a CPU (and a bound for hostile input).
OPTION_LIMITS: dict[str, int] = {
    "max_digits": 30,
    "num_train_samples": 10_000_000,
    "num_eval_samples": 1_000_000,
    "d_model": 4096,
    "num_layers": 64,
    "num_heads": 64,
    "max_sums": 64,
}


class AdditionDataset(Dataset[torch.Tensor]):
    """Seeded sums "a+b=c<end>" as token tensors; a and b have 1..max_digits digits.

    The digit count of each operand is drawn first, then its value, so short and long operands
    are equally common and the answer length (the items of a sample) varies. With max_sums > 1 a
    sample chains k sums, k drawn with probability proportional to 1 / k^2 over 1..max_sums:
    most samples are short, a few long. `lengths` holds each sample's input tokens (its length
    minus the last token, which is only ever a label).
    """

    def __init__(self, num_samples: int, max_digits: int, seed: int, max_sums: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        weights = 1.0 / torch.arange(1, max_sums + 1, dtype=torch.float64) ** 2
        self.samples = [
            _chain(max_digits, max_sums, weights, generator) for _ in range(num_samples)
        ]
        self.lengths = [len(sample) - 1 for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.samples[index]


def _operand(max_digits: int, generator: torch.Generator) -> int:
    """A uniform integer of 1..max_digits digits, the digit count drawn first (a Python int).

    torch draws int64 (up to 18 whole digits): a longer operand is its leading digits followed
    by 18-digit chunks, each drawn uniformly, which keeps it uniform over its digit count; an
    operand of up to 18 digits is one draw, as it always was (the same data for the same seed).
    """
    digits = int(torch.randint(1, max_digits + 1, (1,), generator=generator))
    num_chunks = (digits - 1) // CHUNK_DIGITS
    leading = digits - CHUNK_DIGITS * num_chunks
    low = 0 if digits == 1 else 10 ** (leading - 1)
    value = int(torch.randint(low, 10**leading, (1,), generator=generator))
    for _ in range(num_chunks):
        chunk = int(torch.randint(0, 10**CHUNK_DIGITS, (1,), generator=generator))
        value = value * 10**CHUNK_DIGITS + chunk
    return value


def _sum(max_digits: int, generator: torch.Generator) -> list[int]:
    a, b = _operand(max_digits, generator), _operand(max_digits, generator)
    tokens = [int(c) for c in str(a)] + [PLUS] + [int(c) for c in str(b)] + [EQUALS]
    return tokens + [int(c) for c in str(a + b)] + [END]


def _chain(
    max_digits: int, max_sums: int, weights: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    count = 1 if max_sums == 1 else int(torch.multinomial(weights, 1, generator=generator)) + 1
    tokens = [token for _ in range(count) for token in _sum(max_digits, generator)]
    return torch.tensor(tokens, dtype=torch.long)


def _labels(sample: torch.Tensor) -> torch.Tensor:
    """The next token where it is an answer token (after "=", up to its <end>), else -100."""
    targets = sample[1:]
    opened = torch.cumsum((sample == EQUALS).long(), 0)[:-1]
    closed = torch.cumsum((sample == END).long(), 0)[:-1]
    return torch.where(opened > closed, targets, torch.full_like(targets, IGNORE))


def collate(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of sequences into (inputs, labels) of shape (samples, longest - 1).

    Labels are the next token on the answer positions (after "=") and -100 everywhere else.
    """
    length = max(len(sample) for sample in samples) - 1
    inputs = torch.full((len(samples), length), PAD, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    for row, sample in enumerate(samples):
        inputs[row, : len(sample) - 1] = sample[:-1]
        labels[row, : len(sample) - 1] = _labels(sample)
    return inputs, labels


def collate_packed(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Pack rows of sequences into (inputs, labels, positions, documents), each (rows, longest row).

    A row holds its sequences one after the other; positions restart at 0 for each sequence and
    documents number the sequences of a row (-1 on padding), so that the model attends only
    within a sequence: the same computation as one row per sequence, with less padding.
    """
    length = max(sum(len(sample) - 1 for sample in row) for row in rows)
    shape = (len(rows), length)
    inputs = torch.full(shape, PAD, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    documents = torch.full(shape, -1, dtype=torch.long)
    for index, row in enumerate(rows):
        start = 0
        for document, sample in enumerate(row):
            stop = start + len(sample) - 1
            inputs[index, start:stop] = sample[:-1]
            labels[index, start:stop] = _labels(sample)
            positions[index, start:stop] = torch.arange(stop - start)
            documents[index, start:stop] = document
            start = stop
    return inputs, labels, positions, documents


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP, no dropout."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.norm2 = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d_model, 4 * d_model),
            torch.nn.GELU(),
            torch.nn.Linear(4 * d_model, d_model),
        )

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(samples, positions, d_model) -> same shape; mask: where a position may attend
        (rows, 1, positions, positions), None: causal."""
        samples, positions, d_model = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).split(d_model, dim=2)
        q, k, v = (
            t.view(samples, positions, self.num_heads, d_model // self.num_heads).transpose(1, 2)
            for t in (q, k, v)  # no -1: a 0-row micro-batch (an empty micro-step) forwards too
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        hidden = hidden + self.proj(attended.transpose(1, 2).reshape(samples, positions, d_model))
        return hidden + self.mlp(self.norm2(hidden))


class TinyGPT(torch.nn.Module):
    """Token and position embeddings, causal blocks, a final LayerNorm and a linear head."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, max_length: int) -> None:
        super().__init__()
        self.token_embedding = torch.nn.Embedding(VOCAB_SIZE, d_model)
        self.position_embedding = torch.nn.Embedding(max_length, d_model)
        self.blocks = torch.nn.ModuleList(Block(d_model, num_heads) for _ in range(num_layers))
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, VOCAB_SIZE)
        self.apply(_init_weights)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of shape (rows, positions, vocabulary) for tokens (rows, positions).

        Packed rows (`collate_packed`) give each token's position within its sequence and the
        number of its sequence in the row: attention is then causal within each sequence only
        (a block-diagonal mask), padding attending to padding.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)
        mask = None
        if documents is not None:
            length = tokens.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
            mask = (documents.unsqueeze(2) == documents.unsqueeze(1)) & causal
            mask = mask.unsqueeze(1)  # one mask for every head
        for block in self.blocks:
            hidden = block(hidden, mask)
        return self.head(self.norm(hidden))


def _init_weights(module: torch.nn.Module) -> None:
    """GPT-2's small normal initialisation: trains stably without a learning-rate warm-up."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def loss_fn(
    model: torch.nn.Module, micro_batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropy over answer tokens, and how many answer tokens there are.

    The micro-batch is (inputs, labels) from `collate`, or packed rows from `collate_packed`.
    """
    inputs, labels, *packed = micro_batch
    logits = model(inputs, *packed)
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum, (labels != IGNORE).sum()


def eval_fn(
    model: torch.nn.Module, micro_batch: tuple[torch.Tensor, ...]
) -> dict[str, tuple[float, float]]:
    """Loss per answer token and teacher-forced exact match (every answer token right) per sample
    (unpacked micro-batches: one sample per row)."""
    inputs, labels = micro_batch[:2]
    with torch.no_grad():
        logits = model(inputs)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        answer = labels != IGNORE
        wrong = (logits.argmax(dim=2) != labels) & answer
        exact = float((~wrong.any(dim=1)).sum())
    return {
        "loss": (float(loss_sum), float(answer.sum())),
        "accuracy": (exact, float(labels.shape[0])),
    }


def _options(config: Mapping[str, Any]) -> dict[str, int]:
    """The recipe's options: defaults, overridden by config["recipe_options"], validated."""
    given = dict(config.get("recipe_options") or {})
    check_options("tinylm", given, list(OPTIONS))
    options = {**OPTIONS, **given}
    for key, value in options.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 1 <= value <= OPTION_LIMITS[key]
        ):
            raise UsageError(
                f"recipe_options.{key} must be an integer in [1, {OPTION_LIMITS[key]:,}], "
                f"got {shorten(value)}"
            )
    if options["d_model"] % options["num_heads"]:
        raise UsageError(
            f"recipe_options.d_model {options['d_model']} must be divisible by "
            f"recipe_options.num_heads {options['num_heads']}"
        )
    return options


def build(config: Mapping[str, Any]) -> Recipe:
    """The `tinylm` recipe; model and data are seeded by config["seed"].

    recipe_options: max_digits (3), num_train_samples (20000), num_eval_samples (500), d_model
    (64), num_layers (2), num_heads (4), max_sums (1: one sum per sample; more: long-tailed
    chains of sums).
    """
    options = _options(config)
    seed = int(config.get("seed", 0) or 0)
    digits, sums = options["max_digits"], options["max_sums"]
    # Each a+b=c<end>: 2 operands, "+", "=", an answer one digit longer, "<end>"; minus the last.
    max_length = sums * (3 * digits + 4) - 1
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = TinyGPT(options["d_model"], options["num_layers"], options["num_heads"], max_length)
    train = AdditionDataset(options["num_train_samples"], digits, 2 * seed + 1, sums)
    evaluation = AdditionDataset(options["num_eval_samples"], digits, 2 * seed + 2, sums)
    return Recipe(
        name="tinylm",
        model=model,
        train_dataset=train,
        eval_dataset=evaluation,
        loss_fn=loss_fn,
        collate_fn=collate,
        eval_fn=eval_fn,
        optimizer="adamw",
        defaults=dict(DEFAULTS),
        collate_packed=collate_packed,
        shard_units=shard_units,
    )


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """What `parallelism: fsdp` shards on its own: the transformer blocks (then the root).

    The head's logits are a view (a Linear over 3-D input), which FSDP2 warns about in every
    run because an in-place op on them would skip its pre-backward hook; this recipe's loss_fn
    makes none, so the warning is silenced for this model only.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"FSDP2-wrapped module \(FSDPTinyGPT\) returned a view tensor",
        category=UserWarning,
    )
    return list(model.blocks)  # type: ignore[arg-type]
