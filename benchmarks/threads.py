"""Step time vs torch's intra-op threads, on a quiet CPU and beside spinning processes.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads it):
``default`` is torch as it starts (one thread per CPU, OpenMP's default spin-waiting), ``N`` is
``torch.set_num_threads(N)`` with spin-waiting, ``N passive`` the same with
``OMP_WAIT_POLICY=PASSIVE``, and ``auto`` what `bigbatch train` does with ``threads: auto``
(`bigbatch.train.threads`): passive waiting and the CPUs this process may use over its local
processes. "Busy" starts as many spinning Python processes as there are CPUs beside it (another
job on the machine). Each cell is the median step time of digits (global batch 256, micro-batch
16, as `bigbatch train` runs it) through `bigbatch.Accumulator`.

    python benchmarks/threads.py            # writes benchmarks/results/threads.md
    python benchmarks/threads.py --smoke    # few steps, prints the table only (CI)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # `common`, also when loaded by path
from common import argument_parser, publish  # noqa: E402


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def settings(smoke: bool = False) -> list[str]:
    """default, 1 and CPUs threads spinning, the same waiting passively, and auto (smoke: the
    default and auto only)."""
    if smoke:
        return ["default", "auto"]
    counts = sorted({1, cpus()})
    return ["default", *map(str, counts), *(f"{n} passive" for n in counts), "auto"]


def spin() -> None:
    """A busy neighbour: one CPU's worth of work, forever."""
    while True:
        pass


def worker(setting: str, steps: int, global_batch_size: int) -> None:
    """Run in a fresh process: apply the setting, time `steps` steps, print their median (s)."""
    import torch

    import bigbatch
    from bigbatch import recipes
    from bigbatch.train import environment

    if setting == "auto":
        environment.apply_threads("auto")
    elif setting != "default":
        torch.set_num_threads(int(setting.split()[0]))
    recipe = recipes.build("digits", {"seed": 0, "recipe_options": {}})
    samples = [recipe.train_dataset[i] for i in range(global_batch_size)]
    window = [
        torch.utils.data.default_collate(samples[start : start + 16])
        for start in range(0, global_batch_size, 16)
    ]
    model = recipe.model
    accumulator = bigbatch.Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    times = []
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        accumulator.step(window, recipe.loss_fn)
        if step:
            times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads()}))


def process_environment(setting: str) -> dict[str, str]:
    """The process environment of a setting: OpenMP's variables set only where it says so."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
    }
    if setting.endswith("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if setting == "auto":
        from bigbatch.train.threads import wait_passively

        wait_passively(env)  # as the command line does before torch loads
    return env


def measure(setting: str, steps: int, global_batch_size: int) -> tuple[float, int]:
    """(median step seconds, torch threads) of a setting, in a fresh process."""
    command = [sys.executable, __file__, "--worker", setting, "--steps", str(steps)]
    command += ["--global-batch-size", str(global_batch_size)]
    output = subprocess.run(
        command,
        env=process_environment(setting),
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return result["step_s"], result["threads"]


def measure_all(
    chosen: list[str], steps: int, global_batch_size: int, busy: bool, rounds: int
) -> dict[str, tuple[float, int]]:
    """Each chosen setting, in `rounds` interleaved rounds (the median of the rounds' medians,
    so that the machine's drift hits every setting alike), with a spinning process per CPU
    beside it when busy."""
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(cpus() * busy)]
    for spinner in spinners:
        spinner.start()
    runs: dict[str, list[tuple[float, int]]] = {setting: [] for setting in chosen}
    try:
        for _ in range(rounds):
            for setting in chosen:
                runs[setting].append(measure(setting, steps, global_batch_size))
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    return {
        setting: (statistics.median(s for s, _ in found), found[0][1])
        for setting, found in runs.items()
    }


def table(quiet: dict[str, tuple[float, int]], busy: dict[str, tuple[float, int]]) -> str:
    """One row per setting: step time and its ratio to the best setting, quiet and busy."""
    best_quiet = min(s for s, _ in quiet.values())
    best_busy = min(s for s, _ in busy.values())
    lines = [
        "| setting | torch threads | quiet: step | quiet / best | busy: step | busy / best |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in quiet:
        (q, n), (b, _) = quiet[setting], busy[setting]
        lines.append(
            f"| {setting} | {n} | {q * 1e3:.1f} ms | {q / best_quiet:.2f} | {b * 1e3:.1f} ms "
            f"| {b / best_busy:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argument_parser(
        __doc__, "default and auto, 1 step of 32 samples, prints the table only"
    )
    parser.add_argument("--worker", help="(internal) run one setting and print its median")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--global-batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per setting")
    parser.add_argument(
        "--settings", help=f"comma-separated, some of: {', '.join(settings())} (default: all)"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.global_batch_size)
        return
    steps, global_batch_size = (1, 32) if args.smoke else (args.steps, args.global_batch_size)
    load = os.getloadavg()[0]
    chosen = args.settings.split(",") if args.settings else settings(args.smoke)
    quiet = measure_all(chosen, steps, global_batch_size, busy=False, rounds=args.rounds)
    busy = measure_all(chosen, steps, global_batch_size, busy=True, rounds=args.rounds)
    note = (
        f"digits, global batch {global_batch_size} in micro-batches of 16, AdamW; median of "
        f"{steps} steps after a warm-up step, each setting in a fresh process, median of "
        f"{args.rounds} interleaved round(s). {cpus()} CPUs ({platform.machine()}), "
        f"load average {load:.1f} before the quiet runs: above 0.5 the quiet column is not "
        f"quiet (other jobs ran beside it) and its figures are noisy. Busy: {cpus()} spinning "
        "processes beside it. Passive: OMP_WAIT_POLICY=PASSIVE."
    )
    publish("threads", table(quiet, busy), note, smoke=args.smoke)


if __name__ == "__main__":
    main()
