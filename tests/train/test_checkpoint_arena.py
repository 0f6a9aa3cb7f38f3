"""The shared block between a training process and its checkpoint writer: what goes in comes out
(every dtype, 0-dim, empty, non-contiguous and non-strided tensors, nested containers), each
tensor over its own bytes, a copy that later training cannot change, and the refusals of what a
checkpoint cannot hold. The reference is the state itself, compared bit for bit."""

from __future__ import annotations

import collections
import io
from typing import Any

import pytest
import torch

from bigbatch.train import checkpoint_arena
from bigbatch.train.checkpoint_arena import Arena, fill, open_block, tensors_of

pytestmark = pytest.mark.skipif(not checkpoint_arena.available(), reason="needs memfd and /proc")


def read_back(staged: checkpoint_arena.Staged) -> tuple[Any, dict[str, Any]]:
    """What a writer process reads: the block mapped again (here, from this process)."""
    tensors = tensors_of(staged, open_block(staged.block))
    return fill(staged.training_state, tensors), fill(staged.model_state, tensors)


def assert_identical(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert (actual.dtype, actual.shape, actual.layout) == (
            expected.dtype,
            expected.shape,
            expected.layout,
        )
        assert torch.equal(actual.to_dense(), expected.to_dense())
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_identical(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for one, other in zip(actual, expected, strict=True):
            assert_identical(one, other)
    else:
        assert actual == expected


def odd_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    return {
        "moments": collections.OrderedDict(
            step=torch.tensor(7.0),  # 0-dim
            exp_avg=torch.randn(3, 5, generator=generator).to(torch.bfloat16),
            transposed=wide.t(),  # not contiguous
            empty=torch.empty(0, 3, dtype=torch.float16),
        ),
        "flags": [torch.tensor([True, False, True]), (torch.arange(5, dtype=torch.int64), 3)],
        "bytes": torch.tensor([1, 255, 0], dtype=torch.uint8),
        "sparse": torch.sparse_coo_tensor([[0, 2]], [1.5, -2.0], (4,), check_invariants=True),
        "numbers": {"lr": 0.1, "name": "adamw", "none": None, "dtype": torch.float32, 3: b"x"},
    }


def test_what_is_staged_is_what_the_writer_reads():
    state = odd_state()
    weights = {"linear.weight": torch.randn(4, 3), "linear.bias": torch.zeros(4)}
    arena = Arena()  # the block lives as long as its arena
    staged = arena.stage(state, weights)
    training_state, model_state = read_back(staged)
    assert_identical(training_state, state)
    assert_identical(model_state, weights)


def test_each_tensor_is_saved_alone_not_the_whole_block():
    arena = Arena()
    staged = arena.stage({"a": torch.ones(3), "b": torch.full((1000,), 2.0)}, {})
    training_state, _ = read_back(staged)
    saved, alone = io.BytesIO(), io.BytesIO()
    torch.save(training_state["a"], saved)
    torch.save(torch.ones(3), alone)
    assert len(saved.getvalue()) == len(alone.getvalue())  # 12 bytes of data, not the block
    assert training_state["a"].untyped_storage().nbytes() == 12


def test_the_copy_is_taken_at_staging_and_places_are_reused():
    arena = Arena()
    tensor = torch.arange(4.0)
    first = arena.stage({"t": tensor}, {})
    tensor.add_(100.0)  # training goes on: the staged copy keeps the values it had
    assert torch.equal(read_back(first)[0]["t"], torch.arange(4.0))
    second = arena.stage({"t": tensor}, {})  # the same shapes: the same block, the same places
    assert second.block == first.block and second.slots == first.slots
    assert torch.equal(read_back(second)[0]["t"], torch.arange(4.0) + 100.0)


def test_a_larger_state_gets_a_larger_block():
    arena = Arena()
    small = arena.stage({"t": torch.ones(4)}, {})
    large = arena.stage({"t": torch.ones(4), "u": torch.arange(100_000.0)}, {})
    assert large.block.name != small.block.name and large.block.size >= 400_016
    assert torch.equal(read_back(large)[0]["u"], torch.arange(100_000.0))


def test_what_a_checkpoint_cannot_hold_is_refused_naming_the_place():
    with pytest.raises(TypeError, match=r"training_state\['odd'\]\[0\]"):
        Arena().stage({"odd": [object()]}, {})
    with pytest.raises(TypeError, match=r"model_state\['bias'\] is a float"):
        Arena().stage({}, {"bias": 0.5})
