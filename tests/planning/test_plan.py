"""Plan invariants, as properties over many inputs, and its error messages."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import bigbatch
from bigbatch.train.schedules import BatchSizeSchedule, scale_learning_rate
from bigbatch.units import UsageError


@st.composite
def global_world_micro(draw):
    global_batch_size = draw(st.integers(1, 5000))
    world_size = draw(st.integers(1, min(64, global_batch_size)))
    micro = draw(st.integers(1, math.ceil(global_batch_size / world_size)))
    return global_batch_size, world_size, micro


@given(global_world_micro())
def test_global_and_micro_spread_evenly(args):
    global_batch_size, world_size, micro = args
    p = bigbatch.plan(global_batch_size, world_size, micro_batch_size=micro)
    sizes = [size for rank in range(world_size) for size in p.micro_batch_sizes(rank)]
    assert sum(sizes) == global_batch_size
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= micro
    assert p.gradient_accumulation_steps == math.ceil(global_batch_size / (world_size * micro))
    assert all(
        len(p.micro_batch_sizes(r)) == p.gradient_accumulation_steps for r in range(world_size)
    )
    # An empty micro-batch only where items run short of slots.
    if min(sizes) == 0:
        assert global_batch_size < world_size * p.gradient_accumulation_steps
    rank_totals = [sum(p.micro_batch_sizes(r)) for r in range(world_size)]
    assert max(rank_totals) - min(rank_totals) <= 1
    assert p.micro_batch_size == max(sizes)


@given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 64))
def test_global_and_accumulation(global_batch_size, world_size, steps):
    if world_size > global_batch_size or steps > math.ceil(global_batch_size / world_size):
        with pytest.raises(ValueError):
            bigbatch.plan(global_batch_size, world_size, gradient_accumulation_steps=steps)
        return
    p = bigbatch.plan(global_batch_size, world_size, gradient_accumulation_steps=steps)
    assert p.gradient_accumulation_steps == steps
    assert p.micro_batch_size == math.ceil(global_batch_size / (world_size * steps))
    assert sum(map(sum, p.sizes)) == global_batch_size


@given(st.integers(1, 64), st.integers(1, 32), st.integers(1, 16))
def test_all_three_must_multiply(micro, world_size, steps):
    global_batch_size = micro * world_size * steps
    p = bigbatch.plan(global_batch_size, world_size, micro, steps)
    assert p.is_even and p.micro_batch_size == micro
    assert bigbatch.plan(None, world_size, micro, steps) == p
    with pytest.raises(ValueError, match="needs gradient_accumulation_steps"):
        bigbatch.plan(global_batch_size + 1, world_size, micro, steps)


def test_seed_example():
    p = bigbatch.plan(224, world_size=16, micro_batch_size=7)
    assert p.gradient_accumulation_steps == 2
    assert p.to_dict()["micro_batch_sizes"] == [[7, 7]] * 16
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    text = str(p)
    assert "224" in text and "7 (micro)" in text and "2 (accumulation)" in text


def test_mismatch_names_the_arithmetic_and_nearest_choices():
    with pytest.raises(ValueError) as error:
        bigbatch.plan(224, world_size=16, micro_batch_size=7, gradient_accumulation_steps=3)
    assert "224 / (16 x 7) = 2, got 3" in str(error.value)
    with pytest.raises(ValueError) as error:
        bigbatch.plan(224, world_size=16, micro_batch_size=5, gradient_accumulation_steps=3)
    assert "160 or 240" in str(error.value)


def test_more_slots_than_items_leaves_trailing_empty_micro_batches():
    p = bigbatch.plan(10, world_size=4, micro_batch_size=1)
    assert p.sizes == ((1, 1, 1), (1, 1, 1), (1, 1, 0), (1, 1, 0))
    assert p.rank_offsets() == [0, 3, 6, 8]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"global_batch_size": 2.5}, TypeError, "global_batch_size must be a positive integer"),
        ({"global_batch_size": True}, TypeError, "global_batch_size"),
        ({"global_batch_size": 0}, ValueError, "global_batch_size must be a positive integer"),
        ({"global_batch_size": 8, "world_size": -1}, ValueError, "world_size"),
        ({"global_batch_size": 8, "world_size": 9}, ValueError, "world_size 9 is larger"),
        ({"global_batch_size": 8, "micro_batch_size": "4"}, TypeError, "micro_batch_size"),
        ({"global_batch_size": 8, "world_size": 2, "micro_batch_size": 5}, ValueError, "share"),
        ({"global_batch_size": 8, "gradient_accumulation_steps": 0}, ValueError, "gradient_acc"),
        ({"global_batch_size": None, "micro_batch_size": 4}, ValueError, "required"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        bigbatch.plan(**kwargs)


def test_micro_batch_sizes_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        bigbatch.plan(8, world_size=2).micro_batch_sizes(2)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("linear", 0.1 * 1024 / 256), ("sqrt", 0.1 * (1024 / 256) ** 0.5), ("none", 0.1)],
)
def test_learning_rate_scaling_formulas(rule, expected):
    assert scale_learning_rate(0.1, 1024, 256, rule) == pytest.approx(expected)


def test_learning_rate_scaling_rejects_unknown_rule():
    with pytest.raises(ValueError, match="lr_scaling.rule"):
        scale_learning_rate(0.1, 1024, 256, "cubic")


def test_batch_size_schedule_steps_and_errors():
    schedule = BatchSizeSchedule.from_value([[0, 512], [10, 256], [20, 128]])
    assert [schedule.at(s) for s in (0, 9, 10, 19, 20, 1000)] == [512, 512, 256, 256, 128, 128]
    assert BatchSizeSchedule.from_value(64).at(5) == 64
    for bad, match in [
        ([[1, 64]], "start at step 0"),
        ([[0, 64], [0, 32]], "increase"),
        ([[0, 0]], "global_batch_size"),
        ("x", "pairs"),
    ]:
        with pytest.raises(ValueError, match=match):
            BatchSizeSchedule.from_value(bad)


def reference_sizes(global_batch_size, world_size, steps):
    """The spread written out slot by slot: extra items go to the first slots, step-major."""
    slots = world_size * steps
    base, extra = global_batch_size // slots, global_batch_size % slots
    return tuple(
        tuple(base + (1 if step * world_size + rank < extra else 0) for step in range(steps))
        for rank in range(world_size)
    )


@given(st.integers(1, 3000), st.integers(1, 40), st.integers(1, 40))
def test_derived_sizes_match_the_slot_by_slot_spread(global_batch_size, world_size, steps):
    p = bigbatch.Plan(global_batch_size, world_size, steps)
    expected = reference_sizes(global_batch_size, world_size, steps)
    assert p.sizes == expected
    assert p.rank_offsets() == [sum(map(sum, expected[:rank])) for rank in range(world_size)]
    assert p.micro_batch_size == max(map(max, expected))
    assert p.is_even == (len({size for sizes in expected for size in sizes}) == 1)
    assert p.for_items(global_batch_size // 2 + 1).sizes == reference_sizes(
        global_batch_size // 2 + 1, world_size, steps
    )


def test_a_huge_plan_is_answered_at_once_in_constant_memory():
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    p = bigbatch.plan(10**18, world_size=1024, micro_batch_size=1)
    text, described = str(p), p.to_dict()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 5 * 2**20
    assert p.gradient_accumulation_steps == -(-(10**18) // 1024)
    assert "1 x 976562500000000" in text  # runs of sizes, not one entry per micro-batch
    assert "micro_batch_sizes" not in described
    assert described["micro_batch_size_runs"][0] == [[1, 976562500000000]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"global_batch_size": 10**20}, "global_batch_size 100000000000000000000 is impossible"),
        ({"global_batch_size": 10**5000}, "an integer of 5001 digits"),
        ({"global_batch_size": 2**40, "world_size": 2**21}, "world_size 2097152 is impossible"),
        (
            {
                "global_batch_size": None,
                "micro_batch_size": 2**40,
                "gradient_accumulation_steps": 2**40,
            },
            "2\\*\\*63 - 1",
        ),
    ],
)
def test_impossible_sizes_are_refused_in_one_short_line(kwargs, match):
    with pytest.raises(UsageError, match=match) as error:
        bigbatch.plan(**kwargs)
    assert len(str(error.value)) < 200 and "\n" not in str(error.value)
