"""bigbatch.integrations.huggingface on transformers models built from configs, in float64.

References: a full-batch loss computed here from sliced logits (tests/hf_models.py), the model's
own full-batch loss, and the gradient of one float64 full-batch backward (tests/reference.py).
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import bigbatch  # noqa: E402
from bigbatch.core.loss import MeanLossCheck  # noqa: E402
from bigbatch.integrations.huggingface import (  # noqa: E402
    causal_lm_loss,
    masked_lm_loss,
    sequence_classification_loss,
    training_arguments,
)
from tests import hf_models  # noqa: E402
from tests.reference import full_batch_gradients, relative_error  # noqa: E402

ROWS = 7
SPLITS = [[7], [4, 3], [3, 3, 1], [1, 5, 1], [2, 2, 2, 1]]


def window_of(batch: dict, sizes: list[int]) -> list[dict]:
    window, start = [], 0
    for size in sizes:
        window.append(hf_models.rows_of(batch, start, start + size))
        start += size
    return window


def applied_gradient(model: torch.nn.Module, window: list, loss_fn) -> tuple[dict, float]:
    """One SGD(lr=1) step through Accumulator.step: the applied gradient is before - after."""
    model = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0)).step(
        window, loss_fn
    )
    after = dict(model.named_parameters())
    return {name: before[name] - after[name].detach() for name in before}, result.loss


@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_causal_lm_loss_is_the_full_batch_loss_and_gradient_over_uneven_splits(sizes):
    model = hf_models.gpt2()
    batch = hf_models.causal_batch(ROWS)
    gradient, loss = applied_gradient(model, window_of(batch, sizes), causal_lm_loss)

    losses, mask = hf_models.causal_item_losses(model, batch)
    expected_loss = float((losses * mask).sum().detach() / mask.sum())
    assert abs(loss - expected_loss) <= 1e-12 * abs(expected_loss)
    # transformers computes its own loss from float32 logits: a reference to 1e-6 only.
    assert abs(loss - float(model(**batch).loss.detach())) <= 1e-6 * abs(expected_loss)
    expected = full_batch_gradients(model, lambda m: hf_models.causal_item_losses(m, batch))
    assert relative_error(gradient, expected) < 1e-12


def test_causal_lm_loss_counts_the_shifted_labels():
    model = hf_models.gpt2()
    batch = hf_models.causal_batch(ROWS)
    _, num_items = causal_lm_loss(model, batch)
    # Every row's first label is a real token that no position predicts.
    assert int(num_items) == int((batch["labels"][:, 1:] != hf_models.IGNORE).sum())
    assert int(num_items) == int((batch["labels"] != hf_models.IGNORE).sum()) - ROWS


def test_causal_lm_loss_upcasts_half_precision_logits():
    model = hf_models.gpt2(dtype=torch.bfloat16)
    loss_sum, _ = causal_lm_loss(model, hf_models.causal_batch(3))
    assert loss_sum.dtype == torch.float32


@pytest.mark.parametrize("loss_fn", [causal_lm_loss, masked_lm_loss])
def test_an_empty_micro_batch_gives_zero_loss_no_items_and_zero_gradients(loss_fn):
    """What a rank with nothing left runs to join DDP's sync: GPT-2 itself cannot run 0 rows."""
    model = hf_models.gpt2()
    loss_sum, num_items = loss_fn(model, hf_models.rows_of(hf_models.causal_batch(3), 0, 0))
    assert float(loss_sum) == 0.0 and int(num_items) == 0
    loss_sum.backward()
    gradients = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in gradients)


def test_a_batch_without_labels_is_refused_with_the_fix():
    batch = hf_models.causal_batch(2)
    del batch["labels"]
    with pytest.raises(ValueError, match="'labels'"):
        causal_lm_loss(hf_models.gpt2(), batch)


def tiny_bert(kind: str, **config):
    import transformers

    torch.manual_seed(0)
    settings = dict(
        vocab_size=hf_models.VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    settings.update(config)
    return getattr(transformers, kind)(transformers.BertConfig(**settings)).double()


def check_against_the_full_batch(model, batch, loss_fn, sizes, full_loss):
    """Accumulated loss and gradient equal full_loss(model, batch) and its gradient."""
    gradient, loss = applied_gradient(model, window_of(batch, sizes), loss_fn)
    reference_model = copy.deepcopy(model)
    full = full_loss(reference_model, batch)
    full.backward()
    expected = {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None}
    assert abs(loss - float(full)) <= 1e-12 * abs(float(full))
    assert relative_error({n: gradient[n] for n in expected}, expected) < 1e-12


@pytest.mark.parametrize("sizes", [[4, 3], [3, 3, 1]], ids=str)
def test_masked_lm_loss_equals_the_model_full_batch_loss(sizes):
    batch = hf_models.causal_batch(ROWS, seed=5)
    generator = torch.Generator().manual_seed(6)
    masked = (torch.rand(batch["labels"].shape, generator=generator) < 0.3) & (
        batch["attention_mask"] == 1
    )
    masked[0, 0] = True  # at least one masked token
    batch["labels"] = batch["input_ids"].masked_fill(~masked, hf_models.IGNORE)
    batch["input_ids"] = batch["input_ids"].masked_fill(masked, 1)  # the [MASK] token

    def full_loss(model, batch):  # a mean over the masked tokens, in float64
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, hf_models.VOCAB), batch["labels"].reshape(-1)
        )

    model = tiny_bert("BertForMaskedLM")
    check_against_the_full_batch(model, batch, masked_lm_loss, sizes, full_loss)


@pytest.mark.parametrize(
    ("problem", "num_labels"),
    [("single_label_classification", 3), ("regression", 1), ("regression", 2),
     ("multi_label_classification", 3)],
)  # fmt: skip
def test_sequence_classification_loss_equals_the_model_full_batch_loss(problem, num_labels):
    batch = hf_models.causal_batch(ROWS, seed=7)
    del batch["labels"]
    generator = torch.Generator().manual_seed(8)
    if problem == "single_label_classification":
        batch["labels"] = torch.randint(0, num_labels, (ROWS,), generator=generator)
        batch["labels"][2] = hf_models.IGNORE  # cross-entropy skips it, and so does the count
    elif problem == "regression":
        shape = (ROWS,) if num_labels == 1 else (ROWS, num_labels)
        batch["labels"] = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        batch["labels"] = (torch.rand(ROWS, num_labels, generator=generator) < 0.5).double()
    model = tiny_bert("BertForSequenceClassification", num_labels=num_labels, problem_type=problem)
    # BERT's classification losses stay in the logits' dtype: the model's own loss is a float64
    # reference here (a mean over rows, or over every entry for multi-output problems).
    check_against_the_full_batch(
        model, batch, sequence_classification_loss, [3, 3, 1], lambda m, b: m(**b).loss
    )


def test_the_mean_loss_check_warns_once_and_names_the_helper():
    check = MeanLossCheck()
    batch = hf_models.causal_batch(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            check(torch.tensor(2.0), batch)
    assert len(caught) == 1
    assert "bigbatch.integrations.huggingface.causal_lm_loss" in str(caught[0].message)


@pytest.mark.parametrize(
    "micro_batch",
    [
        {"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": torch.tensor([0, 1, -100, 2])},
        {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3).long()},
        {"x": torch.ones(2, 3), "labels": torch.full((2, 3), -100.0)},  # float: regression
        (torch.ones(2, 3), torch.full((2, 3), -100)),  # no `labels` key
    ],
    ids=["sample-level", "no-ignored", "float-labels", "tuple-batch"],
)
def test_the_mean_loss_check_is_quiet_where_a_mean_is_right(micro_batch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MeanLossCheck()(torch.tensor(2.0), micro_batch)


def test_the_mean_loss_check_is_quiet_for_a_loss_sum_and_count():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MeanLossCheck()((torch.tensor(2.0), 3), hf_models.causal_batch(4))


def test_the_engine_warns_once_for_a_hugging_face_mean_loss():
    model = hf_models.gpt2()
    accumulator = bigbatch.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    window = window_of(hf_models.causal_batch(ROWS), [4, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            accumulator.step(window, lambda m, b: m(**b).loss)
    messages = [str(w.message) for w in caught if "causal_lm_loss" in str(w.message)]
    assert len(messages) == 1


def test_training_arguments_from_a_plan():
    assert training_arguments(256, 8, micro_batch_size=16) == {
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2,
    }
    # The plan picks the even micro-batch 10: 240 = 10 x 8 x 3.
    assert training_arguments(240, 8, micro_batch_size=12) == {
        "per_device_train_batch_size": 10,
        "gradient_accumulation_steps": 3,
    }
    # A memory-budget choice (what bigbatch.tools.autobatch returns) works as the micro-batch.
    choice = types.SimpleNamespace(micro_batch_size=32)
    assert training_arguments(64, 1, micro_batch_size=choice) == {
        "per_device_train_batch_size": 32,
        "gradient_accumulation_steps": 2,
    }


def test_training_arguments_are_accepted_by_the_hf_trainer(tmp_path):
    from transformers import TrainingArguments

    values = training_arguments(96, 2, micro_batch_size=16)
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to="none", **values)
    assert arguments.per_device_train_batch_size * 2 * arguments.gradient_accumulation_steps == 96


def test_an_uneven_plan_is_refused_with_the_arithmetic_and_the_alternatives():
    with pytest.raises(ValueError) as error:
        training_arguments(256, 8, micro_batch_size=12)
    message = str(error.value)
    assert "256 / (8 x 12) = 2.67" in message
    assert "per_device_train_batch_size=8 with gradient_accumulation_steps=4" in message
    assert "global_batch_size 192 or 288" in message
    assert "bigbatch.Accumulator" in message
    with pytest.raises(ValueError, match="global_batch_size 4 or 8"):
        training_arguments(7, 2, micro_batch_size=2)
