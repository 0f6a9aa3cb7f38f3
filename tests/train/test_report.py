"""The end-of-run report: summary figures, report.md, the curves' PNG and the closing lines."""

from __future__ import annotations

import math

import bigbatch
from bigbatch.train.curves import plot_panels, plot_run
from bigbatch.train.report import format_summary, summarize_metrics, write_report


def sample_metrics() -> list[dict]:
    records = []
    for step in range(1, 41):
        records.append(
            {
                "step": step,
                "kind": "train",
                "loss": 2.0 / math.sqrt(step),
                "lr": 0.01 * min(1.0, step / 10),
                "global_batch_size": 64 if step <= 20 else 128,
                "critical_batch_size": None if step < 5 else 40.0 + 3 * step,
                "samples_per_s": 100.0 if step == 1 else 300.0,
                "peak_memory_bytes": 2**30 + step,
                "skipped_steps": 0 if step < 30 else 1,
            }
        )
        if step % 10 == 0:
            records.append(
                {
                    "step": step,
                    "kind": "eval",
                    "eval/loss": 2.2 / math.sqrt(step),
                    "eval/accuracy": 0.5 + step / 100,
                }  # fmt: skip
            )
    return records


def test_plot_is_a_png(tmp_path):
    from matplotlib.image import imread

    path = plot_run(sample_metrics(), tmp_path / "plots" / "training.png")
    assert path == tmp_path / "plots" / "training.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 400
    assert plot_run([], tmp_path / "empty.png") is None


def test_report_holds_the_numbers(tmp_path):
    plot = plot_run(sample_metrics(), tmp_path / "training.png")
    summary = {
        "recipe": "digits",
        "plan": {"global_batch_size": 64, "world_size": 1, "gradient_accumulation_steps": 4},
        "wall_time_s": 83.0,
        "sections": {"Gradient noise": "critical batch size ~ 160 items"},
    }
    path = write_report(tmp_path, summary, sample_metrics(), plot=plot)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    final_loss = 2.0 / math.sqrt(40)
    for expected in [
        "| recipe | digits |",
        "| steps | 40 |",
        f"| final train loss | {final_loss:.4g} |",
        f"| final eval loss | {2.2 / math.sqrt(40):.4g} |",
        "| final eval accuracy | 90.00% |",
        "| samples/s | 300 |",  # the mean over steps after the first
        "| peak memory | 1.00 GiB |",
        "| skipped steps | 1 |",
        "| wall time | 1 min 23 s |",
        "gradient_accumulation_steps: 4",
        "## Gradient noise",
        "critical batch size ~ 160 items",
        "![training curves](training.png)",
    ]:
        assert expected in text, expected


def test_summary_given_wins_over_metrics_and_prints_briefly(tmp_path):
    summary = {"steps": 40, "final_loss": 0.125, "samples_per_s": 1234.4, "plan": "global 64"}
    text = write_report(tmp_path, summary, sample_metrics()).read_text()
    assert "| final train loss | 0.125 |" in text and "| samples/s | 1,234 |" in text
    assert "global 64" in text
    line = format_summary({**summary, "report": "runs/x/report.md", "peak_memory_bytes": 2**31})
    assert line.splitlines() == [
        "done: 40 steps, loss 0.125, 1,234 samples/s, 2.00 GiB peak memory",
        "report: runs/x/report.md",
    ]


def test_summary_of_the_records_matches_the_formulas():
    final_step = 40
    assert summarize_metrics(sample_metrics()) == {
        "steps": final_step,
        "final_loss": 2.0 / math.sqrt(final_step),
        "final_eval_loss": 2.2 / math.sqrt(final_step),
        "final_eval_accuracy": 0.5 + final_step / 100,
        "samples_per_s": 300.0,  # step 1 (warm-up, 100 samples/s) left out of the mean
        "peak_memory_bytes": 2**30 + final_step,
        "skipped_steps": 1,
    }
    assert summarize_metrics([]) == {}


def test_panels_show_what_varies_and_drop_constants():
    records = sample_metrics()
    for record in records:
        if record["kind"] == "train":
            record["grad_norm"] = 1.0 + record["step"] / 10
            record["items_per_s"] = 900.0  # constant, but drawn beside the varying samples/s
    titles = [title for title, _ in plot_panels(records)]
    assert titles == [
        "loss",
        "eval accuracy",
        "learning rate",
        "gradient norm",
        "batch size (samples)",
        "throughput (per s)",
        "peak memory (MiB)",
    ]
    for record in records:
        record.update(grad_norm=2.0, peak_memory_bytes=2**30, lr=0.01)  # constant from now on
    titles = [title for title, _ in plot_panels(records)]
    assert "gradient norm" not in titles and "peak memory (MiB)" not in titles
    assert "learning rate" not in titles and "loss" in titles
    memory = dict(plot_panels(sample_metrics()))["peak memory (MiB)"]
    assert memory[0][0][0]["peak_memory_mib"] == (2**30 + 1) / 2**20


def test_report_states_config_seed_versions_device_and_date(tmp_path):
    import datetime
    import importlib.metadata

    import torch
    import yaml

    config = {"recipe": "digits", "seed": 7, "lr_scaling": {"rule": "sqrt", "base_batch_size": 64}}
    text = write_report(
        tmp_path, {"recipe": "digits"}, sample_metrics(), config=config, device="cpu (2 threads)"
    ).read_text()
    rows = dict(
        line.strip("|").split("|")[:2] for line in text.splitlines() if line.startswith("| ")
    )
    rows = {key.strip(): value.strip() for key, value in rows.items()}
    assert rows["seed"] == "7" and rows["device"] == "cpu (2 threads)"
    assert f"torch {torch.__version__}" in rows["versions"]
    # the one version of the package (pyproject.toml's), the package face's too
    assert rows["versions"].startswith(f"bigbatch {importlib.metadata.version('bigbatch')},")
    assert bigbatch.__version__ == importlib.metadata.version("bigbatch")
    date = datetime.datetime.strptime(rows["date"], "%Y-%m-%d %H:%M:%S UTC")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - date).total_seconds()) < 60
    block = text.split("## Config\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == config
