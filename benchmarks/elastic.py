"""Elastic runs under torchrun: a node lost and a node joining, the same global batch throughout.

Two torchrun agents on localhost (c10d rendezvous, `--nnodes=1:2`): one with 2 processes (it
hosts the rendezvous store), one with 1, both running `bigbatch train --autoresume` on tinylm
(60 steps, a checkpoint every step). After step 6 the one-process agent is lost, in one of two
ways: `agent` SIGKILLs the agent alone (its worker sees its launcher gone and stops every rank at
the step boundary, with a checkpoint), `node` SIGKILLs the agent and its worker at once (the
survivors' next collective fails on the closed sockets; they resume from the last checkpoint).
The surviving agent restarts its workers, which resume on 2 processes. `join` then starts the
lost agent again once the survivors have trained: the running agent restarts its workers at the
next step boundary (SIGTERM, a checkpoint) and the run goes on with 3. Each row is checked
against an uninterrupted one-process run of the same config: one train line per step, the same
`sample_digest` at every step, and the largest relative difference of the final weights, beside
an uninterrupted 2-process run's (float32 rounding through AdamW: splits differ by about that).

Times (wall clock, this machine, noisy: every process shares 2 cores): from the loss (the kill)
to the first step written by 2 processes, and from the join to the first step written by 3.
Both include torchrun's restart, the rendezvous round (`last_call_timeout`, 5 s here), starting
Python and torch, building the recipe and restoring the checkpoint.

    python benchmarks/elastic.py            # writes benchmarks/results/elastic.md (~15 min)
    python benchmarks/elastic.py --smoke    # 14 steps, the agent case only, writes nothing
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LOST_AFTER = 6
SETTINGS = {
    "recipe": "tinylm",
    "recipe_options": "{d_model: 32, num_layers: 2, num_heads: 4, num_train_samples: 4096, "
    "num_eval_samples: 64}",
    "global_batch_size": "48",
    "micro_batch_size": "8",
    "warmup_steps": "5",
    "checkpoint_every": "1",
    "eval_every": "0",
    "trackers": "[]",
    "collective_timeout": "60",
}


@dataclass(frozen=True)
class Outcome:
    """What one elastic run did, read from its metrics.jsonl and final weights."""

    world_sizes: list[int]
    steps_once: bool
    digests_equal: bool
    difference: float
    loss_to_two_s: float
    join_to_three_s: float | None


def _environment() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        # A fresh rendezvous store every round: none of the last workers' keys (docs/elastic.md).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def _train(steps: int, parallelism: str, out: Path) -> list[str]:
    sets = {**SETTINGS, "max_steps": str(steps), "parallelism": parallelism}
    flags = [part for key, value in sets.items() for part in ("--set", f"{key}={value}")]
    return ["-m", "bigbatch", "train", "--no-progress", *flags, "--out", str(out)]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(
            command, env=_environment(), stdout=output, stderr=subprocess.STDOUT
        )


def _finish(process: subprocess.Popen, log: Path, timeout_s: float = 500) -> None:
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 0:
        raise RuntimeError(f"{log} ended with {process.returncode}:\n{log.read_text()[-3000:]}")


def _agent(port: int, processes: int, train: list[str], log: Path) -> subprocess.Popen:
    command = [
        *TORCHRUN, "--nnodes=1:2", f"--nproc_per_node={processes}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=elastic-benchmark", "--max-restarts=3",
        "--rdzv-conf", "last_call_timeout=5", "--monitor-interval=0.2", *train, "--autoresume",
    ]  # fmt: skip
    return _start(command, log)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # the line being written
            continue
    return [line for line in lines if line.get("kind") == "train"]


def _wait_for(condition, process: subprocess.Popen, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {what} (agent exit {process.poll()})")
        time.sleep(0.02)


def _lose(agent: subprocess.Popen, how: str) -> None:
    """SIGKILL the agent; with ``node``, its workers too (found as its children)."""
    children = subprocess.run(
        ["pgrep", "-P", str(agent.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    agent.send_signal(signal.SIGKILL)
    if how == "node":
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
    agent.wait()


def relative_difference(run: Path, reference: Path) -> float:
    """The largest |a - b| of any final weight, relative to the largest |b| of its tensor."""
    actual = load_file(run / "final.safetensors")
    expected = load_file(reference / "final.safetensors")
    return max(
        float((actual[name] - value).abs().max() / value.abs().max().clamp_min(1e-12))
        for name, value in expected.items()
    )


def elastic_run(work: Path, steps: int, parallelism: str, how: str, join: bool) -> Outcome:
    """Two agents (2 + 1 processes), the one-process agent lost after LOST_AFTER steps, and
    with ``join`` started again once the survivors have trained a few steps."""
    run, port = work / f"elastic-{parallelism}-{how}{'-join' if join else ''}", _free_port()
    train = _train(steps, parallelism, run)
    first = _agent(port, 2, train, run.with_suffix(".agent2.log"))
    second: subprocess.Popen | None = None
    try:
        _wait_for(lambda: _listening(port), first, "rendezvous store")
        second = _agent(port, 1, train, run.with_suffix(".agent1.log"))
        _wait_for(lambda: len(_lines(run)) >= LOST_AFTER, first, f"step {LOST_AFTER}")
        lost_at = time.time()
        _lose(second, how)
        _wait_for(lambda: 2 in [line["world_size"] for line in _lines(run)], first, "2 ranks")
        joined_at = None
        if join:
            _wait_for(
                lambda: _lines(run)[-1]["world_size"] == 2 and len(_lines(run)) >= 20,
                first,
                "step 20",
            )
            joined_at = time.time()
            second = _agent(port, 1, train, run.with_suffix(".agent1-again.log"))
        _finish(first, run.with_suffix(".agent2.log"))
        if second is not None and join:
            _finish(second, run.with_suffix(".agent1-again.log"))
    finally:
        for agent in (first, second):
            if agent is not None and agent.poll() is None:
                agent.kill()
    lines = _lines(run)
    reference = _lines(work / "one")
    sizes = [line["world_size"] for line in lines]
    first_two = next(line for line in lines if line["world_size"] == 2)
    later_three = [line for line in lines[sizes.index(2) :] if line["world_size"] == 3]
    return Outcome(
        world_sizes=sizes,
        steps_once=[line["step"] for line in lines] == list(range(1, steps + 1)),
        digests_equal=[line["sample_digest"] for line in lines]
        == [line["sample_digest"] for line in reference],
        difference=relative_difference(run, work / "one"),
        loss_to_two_s=first_two["time"] - lost_at,
        join_to_three_s=later_three[0]["time"] - joined_at if joined_at and later_three else None,
    )


def _sizes(world_sizes: list[int]) -> str:
    """``3 x 6, 2 x 54``: the world size of consecutive steps, run-length encoded."""
    runs: list[list[int]] = []
    for size in world_sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    return ", ".join(f"{size} x {count}" for size, count in runs)


def main() -> None:
    parser = argument_parser(__doc__, "14 steps, the agent case only (writes nothing)")
    args = parser.parse_args()
    steps = 14 if args.smoke else 60
    cases = [("ddp", "agent", False)]
    if not args.smoke:
        cases += [("fsdp", "agent", False), ("ddp", "node", False), ("ddp", "agent", True)]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        one = _start([sys.executable, *_train(steps, "ddp", work / "one")], work / "one.log")
        _finish(one, work / "one.log")
        baselines = {}
        for parallelism in dict.fromkeys(case[0] for case in cases):
            out = work / f"two-{parallelism}"
            two = [
                *TORCHRUN,
                "--standalone",
                "--nproc_per_node=2",
                *_train(steps, parallelism, out),
            ]
            _finish(_start(two, out.with_suffix(".log")), out.with_suffix(".log"))
            baselines[parallelism] = relative_difference(out, work / "one")
        for parallelism, how, join in cases:
            outcome = elastic_run(work, steps, parallelism, how, join)
            lost = {"agent": "agent SIGKILLed", "node": "agent and worker SIGKILLed"}[how]
            rows.append(
                f"| {lost}{', then back' if join else ''} | {parallelism} | "
                f"{_sizes(outcome.world_sizes)} | {outcome.loss_to_two_s:.1f} | "
                + (f"{outcome.join_to_three_s:.1f}" if outcome.join_to_three_s else "-")
                + f" | {'yes' if outcome.steps_once else 'NO'} | "
                f"{'yes' if outcome.digests_equal else 'NO'} | {outcome.difference:.1e} | "
                f"{baselines[parallelism]:.1e} |"
            )
    table = "\n".join(
        [
            f"| after step {LOST_AFTER} of {steps} | parallelism | world size by step | "
            "loss -> first step on 2 (s) | join -> first step on 3 (s) | one line per step | "
            "sample_digest = 1 process | weights vs 1 process | 2 processes vs 1 process |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    note = (
        "tinylm (d_model 32, 2 layers), global batch 48, micro-batch 8, checkpoint_every 1, "
        "CPU (gloo), 2 cores shared by every process: the times are noisy. Weights: the largest "
        "relative difference of any final tensor to the uninterrupted one-process run."
    )
    publish("elastic", table, note, smoke=args.smoke)


if __name__ == "__main__":
    main()
