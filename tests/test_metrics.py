"""Metrics: one JSONL line per step (also after resume), TensorBoard, progress bar."""

from __future__ import annotations

import json
import math

import pytest

from bigbatch.train.metrics import MetricsLogger, ProgressBar, read_metrics


def strict_json_lines(path) -> list[dict]:
    """Parse every line as strict JSON (NaN/Infinity refused), independently of read_metrics."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def log_run(run_dir, steps, *, resume_step=None, offset=0.0, tensorboard=False):
    with MetricsLogger(run_dir, resume_step=resume_step, tensorboard=tensorboard) as metrics:
        for step in steps:
            metrics.log_step(step, {"loss": offset + 1.0 / step, "lr": 0.1, "grad_norm": 2.0})


def test_one_line_per_step(tmp_path):
    log_run(tmp_path, range(1, 7))
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert all(line["kind"] == "train" for line in lines)
    assert lines[3]["loss"] == 1.0 / 4 and lines[3]["lr"] == 0.1


def test_resume_drops_later_lines_and_keeps_one_per_step(tmp_path):
    log_run(tmp_path, range(1, 7))  # killed after step 6, last checkpoint at step 4
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "kind": "tr')  # the half-written line of the kill
    log_run(tmp_path, range(5, 9), resume_step=4, offset=10.0)
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 9))
    losses = [line["loss"] for line in lines]
    assert losses == [1.0 / s for s in range(1, 5)] + [10.0 + 1.0 / s for s in range(5, 9)]
    assert read_metrics(tmp_path / "metrics.jsonl") == lines


def test_new_run_replaces_old_file(tmp_path):
    log_run(tmp_path, range(1, 4))
    log_run(tmp_path, range(1, 3))
    assert [line["step"] for line in strict_json_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_eval_lines_and_nonfinite_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        metrics.log_step(1, {"loss": math.nan, "skipped": True})
        metrics.log_step(2, {"loss": 0.5, "grad_norm": math.inf})
        metrics.log_eval(2, {"loss": 0.75, "accuracy": 0.875})
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert lines == [
        {"step": 1, "kind": "train", "loss": None, "skipped": True},
        {"step": 2, "kind": "train", "loss": 0.5, "grad_norm": None},
        {"step": 2, "kind": "eval", "eval/loss": 0.75, "eval/accuracy": 0.875},
    ]
    assert read_metrics(tmp_path / "metrics.jsonl", kind="eval") == lines[2:]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")] == [1, 2]


def test_resume_also_drops_later_eval_lines(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        for step in (1, 2, 3):
            metrics.log_step(step, {"loss": 1.0})
            metrics.log_eval(step, {"loss": 2.0})
    MetricsLogger(tmp_path, resume_step=2, tensorboard=False).close()
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [(line["step"], line["kind"]) for line in lines] == [
        (1, "train"),
        (1, "eval"),
        (2, "train"),
        (2, "eval"),
    ]


def test_disabled_logger_and_bar_write_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics = MetricsLogger(run_dir, enabled=False, resume_step=3)
    metrics.log_step(1, {"loss": 1.0})
    metrics.log_eval(1, {"loss": 1.0})
    metrics.close()
    bar = ProgressBar(10, enabled=False)
    bar.update(1, {"loss": 1.0})
    bar.close()
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_progress_bar_shows_steps_and_figures(capsys):
    bar = ProgressBar(10, initial=2, desc="train")
    bar.update(3, {"loss": 0.25, "lr": 3e-4, "samples_per_s": 1500.0})
    bar.update(5, {"loss": 0.125, "lr": 3e-4, "peak_memory_bytes": 3 * 2**30})
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err
    assert "loss 0.125" in err and "lr 3.00e-04" in err and "mem 3.00 GiB" in err


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_run(tmp_path, range(1, 5), tensorboard=True)
    with MetricsLogger(tmp_path, resume_step=4) as metrics:
        metrics.log_eval(4, {"accuracy": 0.5})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3, 4]
    assert [event.value for event in losses] == pytest.approx([1.0, 0.5, 1 / 3, 0.25], rel=1e-6)
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/accuracy")] == [(4, 0.5)]
