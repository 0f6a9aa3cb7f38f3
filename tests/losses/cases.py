"""The loss matrix's cases: tiny models, global batches, splits, and float64 full-batch references.

Every reference is written here from the loss's formula with plain autograd over the whole batch
and imports nothing from bigbatch: the code under test is never its own reference. The models are
position-wise (a token's logits depend on that token alone), so packing rows changes no logit and
a packed batch has the unpacked batch's full-batch loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

VOCABULARY = 32
LOG_VOCABULARY = math.log(VOCABULARY)  # a uniform policy's log-prob of a token is -this
WIDTH = 16
CLASSES = 3
ROWS = 8  # rows of every global batch (packed cases: 16 sequences, two to a row)
POSITIONS = 5
MAX_LENGTH = 7  # Dr. GRPO's constant: more slots than positions
BETA = 0.1
CLIP = 0.2
KL_COEF = 0.05
HEAD_SCALE = 8.0

# How the 8 rows of a global batch are cut: micro-batch sizes of each rank's window, with a 1-row
# micro-batch, empty ones, and a rank with no rows.
SPLITS: dict[int, list[tuple[tuple[int, ...], ...]]] = {
    1: [((8,),), ((1, 7),), ((3, 0, 5),), ((2, 2, 2, 2),), ((5, 2, 1),), ((1, 1, 1, 1, 4),)],
    2: [
        ((4,), (4,)),
        ((1, 3), (2, 2)),
        ((3, 0, 2), (1, 2)),
        ((8,), (0,)),
        ((1,), (7,)),
        ((2, 1), (5, 0)),
    ],
}
DTYPES = (torch.float64, torch.bfloat16)


class TokenModel(torch.nn.Module):
    """Per-position logits from per-position token ids: embedding, tanh, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCABULARY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embedding(ids)))


class Classifier(torch.nn.Module):
    """Masked mean of the token embeddings, then a linear head: one row, one prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCABULARY, WIDTH)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.to(self.embedding.weight.dtype).unsqueeze(-1)
        pooled = (torch.tanh(self.embedding(ids)) * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)


def token_logps(
    model: torch.nn.Module, context: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """log p(tokens[r, t] | context[r, t]) in at least float32 (what a user's loss_fn computes)."""
    logits = model(context)
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Case:
    """One loss (with its kind or normalisation, packed or not).

    Attributes:
        name: how the tests name it.
        model: builds the model (seeded by the caller).
        batch: the global batch (a dict of tensors with ``ROWS`` rows), given a generator.
        loss_fn: ``loss_fn(model, micro_batch)`` through bigbatch.losses, built lazily.
        reference: the full-batch loss of a global batch, written from the formula, as
            (sum over the items, number of items): the loss is their quotient.
    """

    name: str
    model: Callable[[], torch.nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    loss_fn: Callable[[], Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]]
    reference: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]


def lengths(generator: torch.Generator, count: int) -> torch.Tensor:
    return torch.randint(1, POSITIONS + 1, (count,), generator=generator)


def padding_mask(row_lengths: torch.Tensor, positions: int = POSITIONS) -> torch.Tensor:
    return torch.arange(positions).unsqueeze(0) < row_lengths.unsqueeze(1)


def pack_pairs(tensor: torch.Tensor, row_lengths: torch.Tensor, fill: Any) -> torch.Tensor:
    """Sequences 2i and 2i + 1 (their first row_lengths entries) packed into row i, then fill."""
    rows = []
    for first in range(0, tensor.shape[0], 2):
        parts = [tensor[s, : row_lengths[s]] for s in (first, first + 1)]
        row = torch.cat(parts)
        pad = row.new_full((2 * POSITIONS - row.shape[0], *row.shape[1:]), fill)
        rows.append(torch.cat([row, pad]))
    return torch.stack(rows)


# -- token cross-entropy ----------------------------------------------------------------------


def text(generator: torch.Generator, count: int = ROWS) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCABULARY, (count, POSITIONS), generator=generator)
    size = lengths(generator, count)
    return {"ids": ids, "labels": ids.masked_fill(~padding_mask(size), -100), "lengths": size}


def packed_text(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """16 sequences two to a row; every sequence's first label ignored, so that no position is
    scored against the next sequence (that label is never a target unpacked either)."""
    sequences = text(generator, 2 * ROWS)
    size = sequences["lengths"]
    labels = sequences["labels"].clone()
    labels[:, 0] = -100
    return {
        "ids": pack_pairs(sequences["ids"], size, 0),
        "labels": pack_pairs(labels, size, -100),
        # The same 16 sequences, padded one to a slot (row i holds sequences 2i and 2i + 1).
        "unpacked_ids": sequences["ids"].reshape(ROWS, -1),
        "unpacked_labels": sequences["labels"].reshape(ROWS, -1),
    }


def causal_reference(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    """Mean next-token loss over every scored token, by slicing (position t meets label t + 1)."""
    logp = model(ids)[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    scored = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * scored).sum(), scored.sum()


def unpacked(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed batch's 16 sequences again, one to a row."""
    return (
        batch["unpacked_ids"].reshape(2 * ROWS, POSITIONS),
        batch["unpacked_labels"].reshape(2 * ROWS, POSITIONS),
    )


def unshifted_reference(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor):
    """Mean loss over every labelled position, position t against label t."""
    logp = model(ids).log_softmax(-1)
    scored = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * scored).sum(), scored.sum()


def upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype == torch.bfloat16 else logits


def token_cases() -> list[Case]:
    def through(shift: bool):
        def make():
            from bigbatch.losses import token_cross_entropy

            return lambda model, b: token_cross_entropy(model(b["ids"]), b["labels"], shift=shift)

        return make

    def packed_reference(model, b):
        ids, labels = b["unpacked_ids"], b["unpacked_labels"]
        ids, labels = ids.reshape(-1, POSITIONS), labels.reshape(-1, POSITIONS)
        return causal_reference(upcast_model(model), ids, labels)

    return [
        Case("causal", TokenModel, text, through(True), lambda m, b: causal(m, b)),
        Case("masked", TokenModel, text, through(False), lambda m, b: unshifted(m, b)),
        Case("causal-packed", TokenModel, packed_text, through(True), packed_reference),
    ]


def causal(model, b):
    return causal_reference(upcast_model(model), b["ids"], b["labels"])


def unshifted(model, b):
    return unshifted_reference(upcast_model(model), b["ids"], b["labels"])


def upcast_model(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model with its logits in at least float32, as the losses compute them."""
    return lambda ids: upcast(model(ids))


# -- sequence classification ------------------------------------------------------------------


def labelled_rows(generator: torch.Generator, multi_label: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCABULARY, (ROWS, POSITIONS), generator=generator)
    mask = padding_mask(lengths(generator, ROWS))
    if multi_label:
        labels = torch.randint(0, 2, (ROWS, CLASSES), generator=generator).double()
    else:
        labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
        labels[torch.randperm(ROWS, generator=generator)[:3]] = -100  # rows that carry no loss
    return {"ids": ids, "mask": mask, "labels": labels}


def classification_cases() -> list[Case]:
    def make():
        from bigbatch.losses import sequence_classification

        return lambda model, b: sequence_classification(model(b["ids"], b["mask"]), b["labels"])

    def single(model, b):
        logp = upcast(model(b["ids"], b["mask"])).log_softmax(-1)
        kept = b["labels"] != -100
        return -logp[kept].gather(-1, b["labels"][kept].unsqueeze(-1)).sum(), kept.sum()

    def multi(model, b):
        logits = upcast(model(b["ids"], b["mask"]))
        bce = F.softplus(logits) - b["labels"] * logits  # BCE with logits, by hand
        return bce.sum(), bce.numel()

    return [
        Case("classification", Classifier, lambda g: labelled_rows(g, False), make, single),
        Case("multi-label", Classifier, lambda g: labelled_rows(g, True), make, multi),
    ]


# -- preference pairs -------------------------------------------------------------------------


def pairs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_context"] = torch.randint(
            0, VOCABULARY, (ROWS, POSITIONS), generator=generator
        )
        batch[f"{side}_tokens"] = torch.randint(
            0, VOCABULARY, (ROWS, POSITIONS), generator=generator
        )
        batch[f"{side}_mask"] = padding_mask(lengths(generator, ROWS))
        # A reference model's summed log-probs: about -LOG_VOCABULARY per token, shifted at random.
        size = batch[f"{side}_mask"].sum(1).double()
        batch[f"ref_{side}"] = -LOG_VOCABULARY * size + torch.randn(
            ROWS, generator=generator, dtype=torch.float64
        )
    return batch


def pair_logps(model: torch.nn.Module, b: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    logps = token_logps(model, b[f"{side}_context"], b[f"{side}_tokens"])
    return (logps * b[f"{side}_mask"]).sum(1)


def preference_cases() -> list[Case]:
    def through(kind: str):
        def make():
            from bigbatch.losses import dpo_loss

            def loss_fn(model, b):
                chosen, rejected = pair_logps(model, b, "chosen"), pair_logps(model, b, "rejected")
                return dpo_loss(chosen, rejected, b["ref_chosen"], b["ref_rejected"], BETA, kind)

            return loss_fn

        return make

    def reference(kind: str):
        def loss(model, b):
            u = (pair_logps(model, b, "chosen") - b["ref_chosen"]) - (
                pair_logps(model, b, "rejected") - b["ref_rejected"]
            )
            if kind == "sigmoid":
                return F.softplus(-BETA * u).sum(), len(u)  # -log sigmoid(x) = softplus(-x)
            if kind == "ipo":
                return ((u - 1 / (2 * BETA)) ** 2).sum(), len(u)
            return (1 - BETA * u).clamp(min=0).sum(), len(u)

        return loss

    return [
        Case(f"dpo-{kind}", TokenModel, pairs, through(kind), reference(kind))
        for kind in ("sigmoid", "ipo", "hinge")
    ]


# -- policy gradient --------------------------------------------------------------------------


def rollouts(generator: torch.Generator, count: int = ROWS) -> dict[str, torch.Tensor]:
    shape = (count, POSITIONS)
    size = lengths(generator, count)
    size[0] = 0  # a sequence with no loss token (GRPO counts it, with loss 0)
    return {
        "context": torch.randint(0, VOCABULARY, shape, generator=generator),
        "tokens": torch.randint(0, VOCABULARY, shape, generator=generator),
        "mask": padding_mask(size),
        # Sampled by an older policy: ratios spread around 1, many outside the clip range.
        "old_logps": -LOG_VOCABULARY
        + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64),
        "ref_logps": -LOG_VOCABULARY
        + 0.4 * torch.randn(shape, generator=generator, dtype=torch.float64),
        "advantages": torch.randn(count, generator=generator, dtype=torch.float64),
        "lengths": size,
    }


def packed_rollouts(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """16 rollouts two to a row, advantages per token; the unpacked ones kept for the reference."""
    sequences = rollouts(generator, 2 * ROWS)
    size = sequences["lengths"]
    per_token = sequences["advantages"].unsqueeze(1).expand(-1, POSITIONS)
    packed = {
        key: pack_pairs(sequences[key], size, fill)
        for key, fill in (
            ("context", 0),
            ("tokens", 0),
            ("mask", False),
            ("old_logps", 0.0),
            ("ref_logps", 0.0),
        )
    }
    packed["advantages"] = pack_pairs(per_token, size, 0.0)
    for key in ("context", "tokens", "mask", "old_logps", "ref_logps"):
        packed[f"unpacked_{key}"] = sequences[key].reshape(ROWS, -1)
    packed["unpacked_advantages"] = sequences["advantages"].reshape(ROWS, 2)
    return packed


def surrogate(model: torch.nn.Module, b: dict[str, torch.Tensor], kl_coef: float) -> torch.Tensor:
    """PPO-clip per token written by the advantage's sign: for A >= 0 the ratio is capped at
    1 + eps, for A < 0 floored at 1 - eps; plus kl_coef times the k3 KL estimator."""
    logps = token_logps(model, b["context"], b["tokens"])
    ratio = torch.exp(logps - b["old_logps"])
    advantage = b["advantages"]
    advantage = advantage.unsqueeze(1) if advantage.dim() == 1 else advantage
    capped = torch.where(
        advantage >= 0, torch.clamp(ratio, max=1 + CLIP), torch.clamp(ratio, min=1 - CLIP)
    )
    loss = -capped * advantage
    log_ratio = b["ref_logps"] - logps
    return loss + kl_coef * (log_ratio.exp() - log_ratio - 1)


def policy_cases() -> list[Case]:
    def through(normalization: str, kl_coef: float, prefix: str = ""):
        def make():
            from bigbatch.losses import policy_gradient_loss

            def loss_fn(model, b):
                logps = token_logps(model, b["context"], b["tokens"])
                return policy_gradient_loss(
                    logps, b["old_logps"], b["advantages"], b["mask"], normalization,
                    max_length=MAX_LENGTH, clip_range=CLIP, ref_logps=b["ref_logps"],
                    kl_coef=kl_coef,
                )  # fmt: skip

            return loss_fn

        return make

    def reference(normalization: str, kl_coef: float):
        def loss(model, b):
            mask = b["mask"].double()
            masked = surrogate(model, b, kl_coef) * mask
            if normalization == "sequence":
                rows = [
                    masked[s].sum() / mask[s].sum() if mask[s].sum() > 0 else masked[s].sum()
                    for s in range(mask.shape[0])
                ]
                return torch.stack(rows).sum(), len(rows)
            if normalization == "token":
                return masked.sum(), mask.sum()
            return masked.sum(), mask.shape[0] * MAX_LENGTH

        return loss

    def packed_reference(model, b):
        unpacked = {
            key: b[f"unpacked_{key}"].reshape(2 * ROWS, -1)
            for key in ("context", "tokens", "mask", "old_logps", "ref_logps")
        }
        unpacked["advantages"] = b["unpacked_advantages"].reshape(-1)
        return reference("token", KL_COEF)(model, unpacked)

    cases = [
        Case(f"pg-{normalization}{'-kl' if kl else ''}", TokenModel, rollouts,
             through(normalization, kl), reference(normalization, kl))
        for normalization in ("sequence", "token", "constant")
        for kl in (0.0, KL_COEF)
    ]  # fmt: skip
    cases.append(
        Case("pg-token-kl-packed", TokenModel, packed_rollouts, through("token", KL_COEF),
             packed_reference)
    )  # fmt: skip
    return cases


CASES = token_cases() + classification_cases() + preference_cases() + policy_cases()


# -- running a configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration of the matrix: a case, a split over ranks, a parameter dtype."""

    case: str
    sizes: tuple[tuple[int, ...], ...]  # micro-batch sizes of each rank's window
    dtype: torch.dtype

    @property
    def world_size(self) -> int:
        return len(self.sizes)


def configurations(world_size: int) -> list[Config]:
    return [
        Config(case.name, sizes, dtype)
        for case in CASES
        for sizes in SPLITS[world_size]
        for dtype in DTYPES
    ]


def case_named(name: str) -> Case:
    return next(case for case in CASES if case.name == name)


def global_batch(case: Case) -> dict[str, torch.Tensor]:
    return case.batch(torch.Generator().manual_seed(sum(map(ord, case.name))))


def initial_model(case: Case, dtype: torch.dtype) -> torch.nn.Module:
    """The case's model, seeded, in float64 or rounded to bf16 (the same weights for each use).

    The head is scaled up so that logits spread over a few units, as a trained model's do.
    """
    torch.manual_seed(7)
    model = case.model().double()
    with torch.no_grad():
        model.head.weight.mul_(HEAD_SCALE)
    return model.to(dtype)


def rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {key: value[start:stop] for key, value in batch.items()}


def window_of(config: Config, rank: int, batch: dict[str, torch.Tensor]) -> list[dict]:
    """This rank's micro-batches: the ranks take consecutive rows of the global batch."""
    start = sum(sum(sizes) for sizes in config.sizes[:rank])
    window = []
    for size in config.sizes[rank]:
        window.append(rows(batch, start, start + size))
        start += size
    return window


class Recorder(torch.optim.Optimizer):
    """Records the gradient the step would apply, in float64, and changes nothing."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.0})
        self.gradients: dict[int, torch.Tensor] = {}

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        parameters = [p for group in self.param_groups for p in group["params"]]
        self.gradients = {i: p.grad.double().clone() for i, p in enumerate(parameters)}


def bigbatch_gradient(config: Config, rank: int = 0) -> list[torch.Tensor]:
    """The gradient `Accumulator.step` applies for the configuration, on this rank."""
    import bigbatch

    case = case_named(config.case)
    model = initial_model(case, config.dtype)
    if config.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    recorder = Recorder(model.parameters())
    accumulator = bigbatch.Accumulator(model, recorder, check_ranks_every=None)
    accumulator.step(window_of(config, rank, global_batch(case)), case.loss_fn())
    accumulator.close()
    return [recorder.gradients[i] for i in sorted(recorder.gradients)]


def full_batch_gradient(case: Case, dtype: torch.dtype, compute: torch.dtype) -> list[torch.Tensor]:
    """Plain autograd on the whole batch: the case's model in ``dtype`` (its bf16 weights for
    a bf16 configuration) computed in ``compute``; the loss sum over the item count, backward."""
    model = initial_model(case, dtype).to(compute)
    loss_sum, count = case.reference(model, global_batch(case))
    (loss_sum / count).backward()
    return [p.grad.double() for p in model.parameters()]


def full_batch_sum_gradient(case: Case, dtype: torch.dtype) -> list[torch.Tensor]:
    """One full-batch step in ``dtype`` that backpropagates the loss sum and divides the gradient
    by the item count once (the order of any sum-then-normalise accumulation, unsplit): the
    gradient rounds to ``dtype`` in the backward and again after the division."""
    model = initial_model(case, dtype)
    loss_sum, count = case.reference(model, global_batch(case))
    loss_sum.backward()
    return [(p.grad.double() / float(count)).to(dtype).double() for p in model.parameters()]


def relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    difference = sum(float((a - e).pow(2).sum()) for a, e in zip(actual, expected, strict=True))
    return (difference / sum(float(e.pow(2).sum()) for e in expected)) ** 0.5


def two_process_gradients(rank: int, world_size: int, configs: list[Config]) -> list[list]:
    """Every 2-process configuration in one process-group launch: the gradients, per config."""
    return [bigbatch_gradient(config, rank) for config in configs]
