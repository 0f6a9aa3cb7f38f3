"""Metrics: one JSONL line per step (also after resume), the trackers, progress bar."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from bigbatch.train.metrics import MetricsLogger, ProgressBar, read_metrics


def strict_json_lines(path) -> list[dict]:
    """Parse every line as strict JSON (NaN/Infinity refused), independently of read_metrics."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def log_run(run_dir, steps, *, resume_step=None, offset=0.0, trackers=()):
    with MetricsLogger(run_dir, resume_step=resume_step, trackers=trackers) as metrics:
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
    before = time.time()
    with MetricsLogger(tmp_path, trackers=()) as metrics:
        metrics.log_step(1, {"loss": math.nan, "skipped": True})
        metrics.log_step(2, {"loss": 0.5, "grad_norm": math.inf})
        metrics.log_eval(2, {"loss": 0.75, "accuracy": 0.875})
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    times = [line.pop("time") for line in lines]
    assert all(before - 1e-3 <= moment <= time.time() + 1e-3 for moment in times)
    assert times == sorted(times)
    assert lines == [
        {"step": 1, "kind": "train", "loss": None, "skipped": True},
        {"step": 2, "kind": "train", "loss": 0.5, "grad_norm": None},
        {"step": 2, "kind": "eval", "eval/loss": 0.75, "eval/accuracy": 0.875},
    ]
    eval_lines = read_metrics(tmp_path / "metrics.jsonl", kind="eval")
    assert [{k: v for k, v in r.items() if k != "time"} for r in eval_lines] == lines[2:]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")] == [1, 2]


def test_resume_also_drops_later_eval_lines(tmp_path):
    with MetricsLogger(tmp_path, trackers=()) as metrics:
        for step in (1, 2, 3):
            metrics.log_step(step, {"loss": 1.0})
            metrics.log_eval(step, {"loss": 2.0})
    MetricsLogger(tmp_path, resume_step=2, trackers=()).close()
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

    log_run(tmp_path, range(1, 5), trackers=("tensorboard",))
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


CONFIG = {"lr": 0.1, "seed": 3, "lr_scaling": {"rule": "sqrt", "base_batch_size": 64}}


def test_tensorboard_gets_the_config_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, trackers=("tensorboard",), config=CONFIG) as metrics:
        metrics.log_step(1, {"loss": 1.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    text = accumulator.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr_scaling.rule | sqrt |" in text and "| seed | 3 |" in text


def test_mlflow_runs_are_read_back_with_mlflows_defaults(tmp_path, monkeypatch):
    """A plain client on the run's own SQLite store reads the run back (no file-store switch); a
    resumed run continues its MLflow run; MLFLOW_TRACKING_URI, and above it the config's
    mlflow_tracking_uri, send the run elsewhere (one database here, as a server would be)."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    own = tmp_path / "own"
    with MetricsLogger(own, trackers=("mlflow",), config=CONFIG) as metrics:
        for step in (1, 2, 3):
            metrics.log_step(step, {"loss": 1.0 / step, "skipped": False})
        metrics.log_eval(3, {"accuracy": 0.75})
    with MetricsLogger(own, resume_step=2, trackers=("mlflow",), config=CONFIG) as metrics:
        metrics.log_step(3, {"loss": 0.25})
    database = f"sqlite:///{own.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database)
    with MetricsLogger(tmp_path / "by_environment", trackers=("mlflow",), config=CONFIG) as m:
        m.log_step(1, {"loss": 2.0})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.resolve()}/no/such/dir.db")
    by_config = {**CONFIG, "mlflow_tracking_uri": database}
    with MetricsLogger(tmp_path / "by_config", trackers=("mlflow",), config=by_config) as m:
        m.log_step(1, {"loss": 3.0})

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert sorted(path.name for path in tmp_path.rglob("*.db")) == ["mlflow.db"]
    client = mlflow.MlflowClient(database)
    experiment = client.get_experiment_by_name("bigbatch")
    # Artifacts, were any logged, would stay in the run directory, not the working directory.
    assert experiment.artifact_location == (own.resolve() / "mlartifacts").as_uri()
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["by_config", "by_environment", "own"]  # own: resumed, not doubled
    run = runs["own"]
    assert run.data.params["lr_scaling.rule"] == "sqrt" and run.data.params["seed"] == "3"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (3, 0.25)]
    accuracy = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(3, 0.75)]
    assert run.info.status == "FINISHED"
    for name, loss in (("by_environment", 2.0), ("by_config", 3.0)):
        assert runs[name].data.tags["bigbatch.run_dir"] == str((tmp_path / name).resolve())
        history = client.get_metric_history(runs[name].info.run_id, "train/loss")
        assert [m.value for m in history] == [loss]


def read_wandb_records(run_file):
    """The records of a W&B offline run file, parsed with wandb's own protobuf definitions.

    The file is a log of 32 KiB blocks after a 7-byte header; each record has a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a serialized `Record`.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_is_read_back_with_wandb(tmp_path):
    pytest.importorskip("wandb")
    with MetricsLogger(tmp_path, trackers=("wandb",), config=CONFIG) as metrics:
        for step in (1, 2):
            metrics.log_step(step, {"loss": 1.0 / step})
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    history = [
        {
            "/".join(item.nested_key) or item.key: json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 1.0), (2, 0.5)]
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["lr"] == {"value": 0.1} or config["lr"] == 0.1


def test_a_missing_tracker_library_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError("No module named 'mlflow'", name="mlflow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ValueError, match=r"trackers: mlflow needs mlflow.*bigbatch\[mlflow\]"):
        MetricsLogger(tmp_path, trackers=("mlflow",))
