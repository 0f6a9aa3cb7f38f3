"""Checkpoints: exact round trip, retention, fallback past damaged ones, no code execution."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import pathlib
import random

import numpy as np
import pytest
import torch

from bigbatch.train import checkpoint_files
from bigbatch.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from bigbatch.train.checkpoint_rng import capture_rng_state, restore_rng_state
from bigbatch.train.checkpoint_weights import cpu_copy
from tests import models


def adamw_run(steps: int, seed: int = 0):
    """An mlp trained a few AdamW steps with a scheduler: the state a trainer checkpoints."""
    model = models.mlp(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    x, y = models.regression_data(16)
    for _ in range(steps):
        adamw_step(model, optimizer, scheduler, x, y)
    return model, optimizer, scheduler, (x, y)


def adamw_step(model, optimizer, scheduler, x, y) -> None:
    optimizer.zero_grad()
    models.mse_per_sample(model, x, y).mean().backward()
    optimizer.step()
    scheduler.step()


def training_state(optimizer, scheduler) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": {"epoch": 1, "position": 40, "seed": 7},
        "plan": {"global_batch_size": 16, "world_size": 1, "sizes": [[8, 8]]},
        "config": {"model": "mlp", "lr": 0.01, "schedule": [[0, 16], [10, 32]], "note": None},
    }


def draws() -> list[float]:
    return [
        *torch.rand(4).tolist(),
        *np.random.rand(4).tolist(),
        random.random(),
        random.gauss(0, 1),
    ]


def save_steps(directory: pathlib.Path, steps, keep=None) -> None:
    for step in steps:
        weights = {"w": torch.full((3,), float(step))}
        save_checkpoint(directory, step, weights, {"step": step}, keep=keep)


def rewrite_meta_checksum(path: pathlib.Path, name: str) -> None:
    """Make meta.json agree with a tampered file, so that only the loader can catch it."""
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))


def test_round_trip_is_exact_and_training_continues_bitwise(tmp_path):
    model, optimizer, scheduler, (x, y) = adamw_run(steps=3)
    path = save_checkpoint(tmp_path, 3, model.state_dict(), training_state(optimizer, scheduler))
    assert path == tmp_path / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]
    expected_draws = draws()

    # The reference: the uninterrupted run, two more steps.
    for _ in range(2):
        adamw_step(model, optimizer, scheduler, x, y)

    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 3 and loaded.path == path
    resumed = models.mlp(seed=99)
    resumed.load_state_dict(loaded.model_state)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.5)
    resumed_optimizer.load_state_dict(loaded.training_state["optimizer"])
    resumed_scheduler = torch.optim.lr_scheduler.StepLR(resumed_optimizer, step_size=9)
    resumed_scheduler.load_state_dict(loaded.training_state["scheduler"])
    restore_rng_state(loaded.training_state["rng"])
    assert draws() == expected_draws
    assert loaded.training_state["data"] == {"epoch": 1, "position": 40, "seed": 7}
    assert loaded.training_state["config"]["schedule"] == [[0, 16], [10, 32]]

    for _ in range(2):
        adamw_step(resumed, resumed_optimizer, resumed_scheduler, x, y)
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name
    expected_state = optimizer.state_dict()["state"]
    actual_state = resumed_optimizer.state_dict()["state"]
    for index, moments in expected_state.items():
        for key, value in moments.items():
            assert torch.equal(actual_state[index][key], value), (index, key)


def test_rng_restore_replays_every_generator():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    state = capture_rng_state()
    expected = draws()
    draws()
    restore_rng_state(state)
    assert draws() == expected


class TiedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TiedModel()
    save_checkpoint(tmp_path, 1, model.state_dict(), {})
    fresh = TiedModel()
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None
    fresh.load_state_dict(loaded.model_state)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert torch.equal(fresh.out.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_leaves_exactly_the_newest(tmp_path, keep):
    save_steps(tmp_path, [10, 20, 30, 40, 50], keep=keep)
    expected = [f"step-{step:08d}" for step in [10, 20, 30, 40, 50][-keep:]]
    assert [p.name for p in list_checkpoints(tmp_path)] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_saving_a_step_twice_replaces_it(tmp_path):
    save_steps(tmp_path, [1, 2])
    save_checkpoint(tmp_path, 2, {"w": torch.full((3,), -1.0)}, {"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.training_state == {"again": True}
    assert torch.equal(loaded.model_state["w"], torch.full((3,), -1.0))


def test_saving_a_step_twice_without_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_files, "_exchange", lambda first, second: False)
    save_steps(tmp_path, [1, 2])
    save_checkpoint(tmp_path, 2, {"w": torch.full((3,), -1.0)}, {"again": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.training_state == {"again": True}


def test_scheduler_and_grad_scaler_states_are_accepted(tmp_path):
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = {"scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict()}
    save_checkpoint(tmp_path, 1, model.state_dict(), state)
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.training_state["grad_scaler"]["scale"] == 1024.0
    assert loaded.training_state["scheduler"]["last_epoch"] == scheduler.last_epoch


def assert_fell_back(tmp_path, caplog, damaged: str, reason: str) -> None:
    with caplog.at_level(logging.WARNING, logger="bigbatch.train.checkpoint"):
        loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 2
    assert torch.equal(loaded.model_state["w"], torch.full((3,), 2.0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(tmp_path / damaged) in warnings[0] and reason in warnings[0]


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["checksum", "loader"])
def test_truncated_weights_fall_back(tmp_path, caplog, fix_checksum):
    save_steps(tmp_path, [1, 2, 3])
    weights = tmp_path / "step-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])
    if fix_checksum:
        rewrite_meta_checksum(weights.parent, "model.safetensors")
    reason = "SafetensorError" if fix_checksum else "model.safetensors does not match its sha256"
    assert_fell_back(tmp_path, caplog, "step-00000003", reason)


@pytest.mark.parametrize("fix_checksum", [False, True], ids=["checksum", "loader"])
def test_garbage_state_falls_back(tmp_path, caplog, fix_checksum):
    save_steps(tmp_path, [1, 2, 3])
    state = tmp_path / "step-00000003" / "state.pt"
    state.write_bytes(b"\x00garbage" * 10)
    if fix_checksum:
        rewrite_meta_checksum(state.parent, "state.pt")
    reason = "not a weights_only file" if fix_checksum else "state.pt does not match its sha256"
    assert_fell_back(tmp_path, caplog, "step-00000003", reason)


@pytest.mark.parametrize("meta", [None, "{not json", '{"format_version": 99}', '{"step": 3}'])
def test_missing_or_bad_meta_falls_back(tmp_path, caplog, meta):
    save_steps(tmp_path, [1, 2, 3])
    meta_path = tmp_path / "step-00000003" / "meta.json"
    if meta is None:
        meta_path.unlink()
    else:
        meta_path.write_text(meta)
    assert_fell_back(tmp_path, caplog, "step-00000003", "meta.json")


class Payload:
    """Unpickling this touches a file: the proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_is_refused_not_executed(tmp_path, caplog):
    save_steps(tmp_path, [1, 2, 3])
    marker = tmp_path / "code-ran"
    state = tmp_path / "step-00000003" / "state.pt"
    torch.save({"step": 3, "evil": Payload(marker)}, state)
    rewrite_meta_checksum(state.parent, "state.pt")
    assert_fell_back(tmp_path, caplog, "step-00000003", "holds arbitrary objects")
    assert not marker.exists()


def test_interrupted_save_is_ignored_then_removed(tmp_path):
    save_steps(tmp_path, [1, 2])
    # An interrupted save of step 3: complete-looking files under the temporary name.
    partial = tmp_path / "step-00000003.tmp-1234abcd"
    (tmp_path / "step-00000002").rename(partial)
    save_steps(tmp_path, [2])
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    save_steps(tmp_path, [4])
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000001",
        "step-00000002",
        "step-00000004",
    ]


def test_failed_save_leaves_previous_checkpoints(tmp_path, monkeypatch):
    save_steps(tmp_path, [1])

    def crash(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(checkpoint_files.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        save_steps(tmp_path, [2], keep=1)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step == 1


def test_no_checkpoint_gives_none(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None
    (tmp_path / "step-00000001").mkdir()
    assert load_latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"data": {"order": np.arange(3)}}, "training_state['data']['order']"),
        ({"obj": object()}, "training_state['obj']"),
        ({"items": [1, {2.0: 3}]}, "training_state['items'][1]"),
    ],
)
def test_unloadable_training_state_is_refused_at_save(tmp_path, state, where):
    with pytest.raises(TypeError) as error:
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, state)
    assert where in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_copy_for_the_background_is_fresh_memory_and_refuses_what_would_not_load():
    Pair = collections.namedtuple("Pair", "first second")
    weights = torch.arange(6.0).reshape(2, 3)
    state = collections.OrderedDict(
        w=weights.t(), sizes=(torch.Size([2, 3]), [1, "a", None, 2.5]), pair=Pair(weights, 3)
    )
    copied = cpu_copy(state, "training_state")
    assert type(copied) is collections.OrderedDict and list(copied) == ["w", "sizes", "pair"]
    assert type(copied["pair"]) is Pair and copied["pair"].second == 3
    assert copied["sizes"] == (torch.Size([2, 3]), [1, "a", None, 2.5])
    assert type(copied["sizes"][0]) is torch.Size
    weights.add_(100.0)  # training changes its tensors in place: the copy keeps the old values
    expected = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(copied["w"], expected.t()) and torch.equal(copied["pair"].first, expected)
    assert copied["w"].untyped_storage().data_ptr() != weights.untyped_storage().data_ptr()
    with pytest.raises(TypeError, match=r"training_state\['items'\]\[1\] has a key 2.0"):
        cpu_copy({"items": [1, {2.0: 3}]}, "training_state")
    with pytest.raises(TypeError, match=r"training_state\['data'\]\['order'\] is a numpy"):
        cpu_copy({"data": {"order": np.arange(3)}}, "training_state")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, {}, keep=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {})
    with pytest.raises(TypeError, match=r"model_state\['w'\]"):
        save_checkpoint(tmp_path, 1, {"w": [1.0]}, {})  # type: ignore[dict-item]


SAVE_FOREVER = """
import sys, torch
from bigbatch.train.checkpoint import save_checkpoint
directory = sys.argv[1]
weights = {"w": torch.zeros(256, 1024)}
for step in range(1, 10**6):
    weights["w"].fill_(float(step))
    save_checkpoint(directory, step, weights, {"step": step, "pad": torch.zeros(100_000)}, keep=2)
    print(step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_during_saves_leaves_a_valid_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for _ in range(5):  # let a few saves complete, then kill in the middle of the next ones
        process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded.step >= 5
    assert loaded.training_state["step"] == loaded.step
    assert torch.equal(loaded.model_state["w"], torch.full((256, 1024), float(loaded.step)))
