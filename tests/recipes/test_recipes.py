"""Recipes: seeded, offline, sized as documented; tinylm items vary, only answers carry loss."""

from __future__ import annotations

import torch

from bigbatch.recipes import build, tinylm

SMALL_LM = {"num_train_samples": 64, "num_eval_samples": 16}


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_same_seed_same_model_and_data_other_seed_other_model():
    for name, options in (("digits", {}), ("tinylm", SMALL_LM)):
        first = build(name, {"seed": 3, "recipe_options": options})
        second = build(name, {"seed": 3, "recipe_options": options})
        other = build(name, {"seed": 4, "recipe_options": options})
        assert all(torch.equal(a, b) for a, b in zip(_weights(first.model), _weights(second.model)))
        assert not all(
            torch.equal(a, b) for a, b in zip(_weights(first.model), _weights(other.model))
        )
        for index in (0, 5):
            a, b = first.train_dataset[index], second.train_dataset[index]
            assert (
                all(torch.equal(x, y) for x, y in zip(a, b))
                if name == "digits"
                else (torch.equal(a, b))
            )


def test_digits_split_shapes_defaults_and_no_batchnorm():
    recipe = build("digits", {"seed": 0})
    images, labels = recipe.train_dataset.tensors  # type: ignore[attr-defined]
    test_images, _ = recipe.eval_dataset.tensors  # type: ignore[union-attr]
    assert images.shape[1:] == (1, 8, 8) and len(images) + len(test_images) == 1797
    assert float(images.max()) <= 1.0 and set(labels.tolist()) == set(range(10))
    assert recipe.defaults["global_batch_size"] == 256 and recipe.defaults["micro_batch_size"] == 16
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in recipe.model.modules())
    bn = build("digits-bn", {"seed": 0})
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.model.modules()) == 2


def test_digits_loss_is_a_sum_over_samples():
    recipe = build("digits", {"seed": 0})
    images, labels = recipe.train_dataset.tensors  # type: ignore[attr-defined]
    batch = (images[:5], labels[:5])
    loss_sum, count = recipe.loss_fn(recipe.model, batch)
    expected = torch.nn.functional.cross_entropy(recipe.model(images[:5]), labels[:5]) * 5
    assert count == 5 and torch.allclose(loss_sum, expected)
    metrics = recipe.eval_fn(recipe.model, batch)  # type: ignore[misc]
    assert metrics["accuracy"][1] == 5 and 0 <= metrics["accuracy"][0] <= 5


def test_tinylm_sequences_are_sums_and_only_answers_carry_loss():
    recipe = build("tinylm", {"seed": 1, "recipe_options": SMALL_LM})
    samples = [recipe.train_dataset[i] for i in range(16)]
    answer_lengths = set()
    for sample in samples:
        text = "".join(
            "+"
            if t == tinylm.PLUS
            else "="
            if t == tinylm.EQUALS
            else "$"
            if t == tinylm.END
            else str(int(t))
            for t in sample
        )
        left, answer = text.rstrip("$").split("=")
        a, b = left.split("+")
        assert int(a) + int(b) == int(answer)  # an independent check of the data
        answer_lengths.add(len(answer))
    assert len(answer_lengths) > 1  # items per sample vary
    inputs, labels = recipe.collate_fn(samples)  # type: ignore[misc]
    for row, sample in enumerate(samples):
        equals = int((sample == tinylm.EQUALS).nonzero()[0])
        carrying = (labels[row] != tinylm.IGNORE).nonzero().flatten().tolist()
        # next-token targets: the answer digits and the end token, nothing else
        assert carrying == list(range(equals, len(sample) - 1))
        assert labels[row, carrying].tolist() == sample[equals + 1 :].tolist()
    loss_sum, count = recipe.loss_fn(recipe.model, (inputs, labels))
    assert int(count) == sum(len(s) - 1 - int((s == tinylm.EQUALS).nonzero()[0]) for s in samples)
    assert loss_sum.dim() == 0


def _sums(sample: torch.Tensor) -> list[tuple[str, str, str]]:
    """The (a, b, answer) digit strings of a chain of sums "a+b=c<end>..."."""
    text = "".join(
        {tinylm.PLUS: "+", tinylm.EQUALS: "=", tinylm.END: "$"}.get(t, str(t))
        for t in sample.tolist()
    )
    sums = []
    for part in text.split("$")[:-1]:
        left, answer = part.split("=")
        a, b = left.split("+")
        sums.append((a, b, answer))
    return sums


def test_tinylm_at_its_largest_max_digits_sums_past_int64_are_right():
    """The largest max_digits builds (it overflowed int64 above 18 digits) and every sum is right,
    checked with Python integers; operands cover every digit count, with no leading zero."""
    largest = tinylm.OPTION_LIMITS["max_digits"]
    options = {
        "max_digits": largest,
        "num_train_samples": 300,
        "num_eval_samples": 8,
        "max_sums": 2,
    }
    recipe = build("tinylm", {"seed": 0, "recipe_options": options})
    lengths = set()
    for sample in (recipe.train_dataset[i] for i in range(len(recipe.train_dataset))):
        for a, b, answer in _sums(sample):
            assert int(a) + int(b) == int(answer)
            for number in (a, b, answer):
                assert number == "0" or not number.startswith("0"), number
            lengths |= {len(a), len(b)}
    assert lengths == set(range(1, largest + 1))
    assert largest > len(str(2**63 - 1))  # past what an int64 holds


def test_tinylm_padding_does_not_change_the_loss():
    """Right padding under causal attention: a sample's loss is the same alone or padded."""
    recipe = build("tinylm", {"seed": 0, "recipe_options": SMALL_LM})
    short = min((recipe.train_dataset[i] for i in range(64)), key=len)
    long = max((recipe.train_dataset[i] for i in range(64)), key=len)
    assert len(short) < len(long)
    alone, _ = recipe.loss_fn(recipe.model, recipe.collate_fn([short]))  # type: ignore[misc]
    padded, _ = recipe.loss_fn(recipe.model, recipe.collate_fn([short, long]))  # type: ignore[misc]
    other, _ = recipe.loss_fn(recipe.model, recipe.collate_fn([long]))  # type: ignore[misc]
    assert torch.allclose(alone + other, padded, atol=1e-5)


def test_tinylm_rejects_unknown_options():
    import pytest

    with pytest.raises(ValueError, match="recipe_options"):
        build("tinylm", {"seed": 0, "recipe_options": {"max_digit": 2}})
    with pytest.raises(ValueError, match="max_digits"):
        build("tinylm", {"seed": 0, "recipe_options": {"max_digits": 0}})
