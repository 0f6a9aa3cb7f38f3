"""`bigbatch train` answers bad input before torch loads and before anything is written to --out.

Every case runs the command line in one fresh interpreter (torch never loads there, so one process
holds them all) and records, at the moment each one returns, whether torch is in ``sys.modules``.
A missing package is made missing the way Python's import system knows: ``sys.modules[name] =
None``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.train.config import Config
from bigbatch.train.configfile import validate
from bigbatch.train.packages import check_packages, tracker_packages
from bigbatch.train.trainer import Trainer
from bigbatch.units import UsageError

ROOT = Path(__file__).resolve().parents[2]

# What runs in the fresh interpreter: each case's argv and the packages it hides.
RUNNER = """
import contextlib, io, json, sys
from bigbatch.cli import main

results = []
for argv, hidden in json.loads(sys.argv[1]):
    saved = {name: sys.modules.get(name, 0) for name in hidden}
    sys.modules.update(dict.fromkeys(hidden))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    for name, module in saved.items():
        if module == 0:
            del sys.modules[name]
        else:
            sys.modules[name] = module
    results.append({"code": code, "stderr": stderr.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(results))
"""


def test_bad_input_is_answered_before_torch_loads_and_nothing_is_written(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [0.1\n")
    (tmp_path / "a_file").write_text("mine\n")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text("")
    untouched = tmp_path / "out"  # never created by any case
    train = ["train", "--no-progress", "--out", str(untouched)]
    cases = {
        "a value of the wrong type": (["--set", "lr=abc"], [], "config: lr: must be a number"),
        "an unknown key": (["--set", "lrr=0.1"], [], "config: unknown key 'lrr'"),
        "bad YAML": ([str(tmp_path / "bad.yaml")], [], "is not valid YAML"),
        "an out of range value": (["--set", "max_steps=0"], [], "max_steps"),
        "a missing tracker package": (
            ["--set", "trackers=[mlflow]"],
            ["mlflow"],
            "trackers: mlflow needs mlflow, which is not installed: pip install 'bigbatch[mlflow]'",
        ),
        "a missing package of MLflow's SQLite store": (
            ["--set", "trackers=[mlflow]"],
            ["sqlalchemy"],
            "trackers: mlflow needs sqlalchemy",
        ),
        "a missing recipe package": (["--set", "recipe=digits"], ["sklearn"], "needs scikit-learn"),
    }
    argvs = [[*train, *extra] for extra, _, _ in cases.values()]
    hidden = [names for _, names, _ in cases.values()]
    expected = [text for _, _, text in cases.values()]
    # Bad command-line values and a directory that holds a run, before the config is read too.
    argvs += [
        ["train", "--out", str(tmp_path / "a_file")],
        ["train", "--out", str(earlier)],
        ["train", "--resume"],
    ]
    hidden += [[], [], []]
    expected += ["is a file, not a directory", "holds an earlier run", "--resume needs --out"]
    runs = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(list(zip(argvs, hidden)))],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert runs.returncode == 0, runs.stderr[-2000:]
    for argv, text, result in zip(argvs, expected, json.loads(runs.stdout)):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1, (argv, result)
        assert lines[0].startswith("bigbatch train: error: ") and text in lines[0], (argv, lines)
        assert not result["torch"], f"torch was imported before answering {argv}"
    assert not untouched.exists()
    assert sorted(path.name for path in earlier.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "a_file").read_text() == "mine\n"


def config(**settings) -> Config:
    return validate(settings)


def test_packages_are_looked_up_without_importing_them(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UsageError, match=r"^trackers: wandb needs wandb, .*bigbatch\[wandb\]"):
        check_packages(config(trackers=["wandb"], recipe="tinylm"))
    monkeypatch.setitem(sys.modules, "alembic", None)
    with pytest.raises(UsageError, match="trackers: mlflow needs alembic"):
        check_packages(config(trackers=["mlflow"], recipe="tinylm"))
    # A tracking server needs no database package; TensorBoard is optional (a run warns).
    server = config(trackers=["mlflow"], mlflow_tracking_uri="http://tracking:5000")
    assert tracker_packages("mlflow", server.mlflow_tracking_uri) == ("mlflow",)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")
    assert tracker_packages("mlflow") == ("mlflow",)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    check_packages(config(trackers=["tensorboard"], recipe="tinylm"))
    monkeypatch.setitem(sys.modules, "sklearn", None)
    check_packages(config(recipe="tinylm"))
    with pytest.raises(UsageError, match=r"recipe digits-bn needs scikit-learn"):
        check_packages(config(recipe="digits-bn"))


def test_a_trainer_refuses_a_missing_tracker_before_touching_its_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    settings = config(global_batch_size=4, max_steps=1, trackers=["mlflow"], device="cpu")

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).sum(), batch[0].shape[0]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "run"
    trainer = Trainer(model, optimizer, loss_fn, data, settings, run_dir=run_dir, progress=False)
    with pytest.raises(UsageError, match="trackers: mlflow needs mlflow"):
        trainer.fit()
    assert not run_dir.exists()
