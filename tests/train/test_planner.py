"""The one planner for samples and tokens: the probe once, state round trips, the loader it builds.

Expected values are written by hand from the config (stages, probed values, granularity =
micro x world size), never read back from the planner under test.
"""

from __future__ import annotations

import itertools
import signal

import pytest
import torch

from bigbatch.train.configfile import validate
from bigbatch.train.planner import BatchPlanner


class Sequences(torch.utils.data.Dataset):
    """Sample i is a sequence of lengths[i] values, each 1 when this process ignores SIGUSR1."""

    def __init__(self, lengths):
        self.lengths = list(lengths)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        return torch.full((self.lengths[index],), int(ignored))


def pad_collate(samples):
    length = max(len(s) for s in samples)
    padded = torch.full((len(samples), length), -1)
    for row, sample in enumerate(samples):
        padded[row, : len(sample)] = sample
    return padded


class Probe:
    """Returns a fixed micro setting and counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def __call__(self, unit):
        self.calls.append(unit.name)
        return self.value


def refuse(unit):
    raise AssertionError("a resumed planner must not probe again")


SAMPLES = dict(
    global_batch_size=64,
    micro_batch_size="auto",
    batch_size_schedule="adaptive",
    max_global_batch_size=512,
    epochs=2,
)
TOKENS = dict(
    global_batch_tokens=300,
    micro_batch_tokens="auto",
    batch_size_schedule="adaptive",
    max_global_batch_tokens=3000,
    epochs=2,
)


def test_the_probe_runs_once_and_the_unit_follows_the_config():
    probe = Probe(8)
    planner = BatchPlanner(validate(SAMPLES), 2, range(1000), probe=probe)  # type: ignore[arg-type]
    assert planner.unit.name == "samples" and planner.first_global_batch == 64
    planner.start()
    planner.plan_for(128), planner.state_dict(), planner.micro_batch_size  # noqa: B018
    assert probe.calls == ["samples"]
    assert planner.adaptive is not None and planner.adaptive.granularity == 8 * 2
    tokens = BatchPlanner(validate(TOKENS), 2, Sequences([10, 30, 20] * 5), probe=Probe(60))
    assert tokens.unit.name == "tokens" and tokens.first_global_batch == 300
    assert tokens.start().micro_batch_size == 60 // 30  # rows of the longest sample


@pytest.mark.parametrize(
    ("config", "dataset", "probed", "state"),
    [
        (
            SAMPLES,
            range(1000),
            8,
            {"micro_batch_size": 8, "micro_batch_tokens": None},
        ),
        (
            TOKENS,
            Sequences([10, 30, 20] * 20),
            90,
            {"micro_batch_size": 90 // 30, "micro_batch_tokens": 90},
        ),
    ],
    ids=["samples", "tokens"],
)
def test_the_state_round_trips_the_probed_value_and_the_stages(config, dataset, probed, state):
    config = validate(config)
    first = BatchPlanner(config, 2, dataset, probe=Probe(probed))
    first.start()
    assert first.adaptive is not None
    bigger = 2 * first.first_global_batch
    first.adaptive.update(50, 2.0 * bigger)  # the critical batch far above: the batch grows
    stages = [[0, first.first_global_batch], [50, first.adaptive.target(2.0 * bigger)]]
    saved = first.state_dict()
    assert saved == {**state, "adaptive": {"stages": stages}}

    # Loaded before start (no probe at all), or after a start that probed a different value.
    before = BatchPlanner(config, 2, dataset, probe=refuse)
    before.load_state_dict(saved)
    before.start()
    after = BatchPlanner(config, 2, dataset, probe=Probe(probed // 2))
    after.start()
    after.load_state_dict(saved)
    for planner in (before, after):
        assert planner.unit.micro == probed
        assert planner.adaptive is not None
        assert planner.adaptive.stages == [tuple(stage) for stage in stages]
        assert planner.adaptive.granularity == probed * 2
        assert planner.at(49) == stages[0][1] and planner.at(50) == stages[1][1]
        assert planner.state_dict() == saved


def test_a_warmup_longer_than_a_token_run_is_refused():
    config = validate(dict(global_batch_tokens=50, max_steps=None, epochs=1, warmup_steps=5))
    planner = BatchPlanner(config, 1, Sequences([10] * 20), probe=refuse)
    # 200 tokens an epoch in budgets of 50: 4 steps.
    with pytest.raises(ValueError, match="warmup_steps 5 is longer than the run \\(4 steps\\)"):
        planner.total_steps()


@pytest.mark.parametrize("unit", ["samples", "tokens"])
def test_the_loader_workers_leave_the_stop_signals_to_the_main_process(unit):
    """By construction: a run in tokens gets the workers' signal handling of a run in samples."""
    budget = dict(global_batch_size=4) if unit == "samples" else dict(global_batch_tokens=40)
    config = validate(dict(budget, max_steps=3))
    dataset = Sequences([10, 30, 20, 5, 15, 25] * 2)
    planner = BatchPlanner(config, 1, dataset, probe=refuse)
    planner.start()
    assert signal.getsignal(signal.SIGUSR1) != signal.SIG_IGN  # the main process acts on it
    loader = planner.window_loader(
        dataset,
        rank=0,
        collate_fn=pad_collate,
        num_workers=1,
        worker_ignored_signals=[signal.SIGUSR1],
    )
    windows = list(itertools.islice(loader, 3))
    values = {int(v) for w in windows for m in w.micro_batches for v in m[m != -1].tolist()}
    assert values == {1}  # every sample was read in a worker that ignores SIGUSR1
    assert loader.state_dict()["step"] == 3
