"""Run the benchmark scripts in turn (what `make bench` runs); `--smoke` passes through.

By default the scripts of a few minutes each; `--all` adds the long ones (LONG: activation
checkpointing's budgets, torchrun elastic runs, checkpoint cost and the CPU of a sharded save,
threads beside a busy load, compile), which take tens of minutes on 2 CPU cores.

Each script writes its table and plot under benchmarks/results/ (smoke runs print only). A script
that fails is reported and the others still run; the exit status is 1 if any failed. A progress
line before and after each script says which one runs, how many are left and the time so far
(docs/performance.md gives what each script takes).

    python benchmarks/run_all.py            # the quick figures (docs/performance.md: how long)
    python benchmarks/run_all.py --all      # every figure, the long scripts too
    python benchmarks/run_all.py --smoke    # every code path (with --all: the long ones too)
    python benchmarks/run_all.py memory ddp # only some scripts, by name
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = (
    "overhead",
    "alternatives",
    "hf_trainer",
    "trl_losses",
    "ddp",
    "memory",
    "plan_quality",
    "gpu",
    "batchnorm",
    "noise_scale",
    "token_batches",
    "sharded",
)
LONG = ("checkpointing", "elastic", "checkpoint_cost", "shard_save_cpu", "threads", "compile")
EVERY = SCRIPTS + LONG


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every script")
    parser.add_argument("--all", action="store_true", help=f"also {', '.join(LONG)}")
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(EVERY)}")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(EVERY))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(EVERY)}")
    failed, durations = [], {}
    chosen = args.names or (EVERY if args.all else SCRIPTS)
    began = time.perf_counter()
    for index, name in enumerate(chosen, 1):
        script = HERE / f"{name}.py"
        progress = f"[{index}/{len(chosen)}, {time.perf_counter() - began:.0f} s so far]"
        if not script.exists():
            print(f"== {name} {progress}: {script} is missing, skipped", flush=True)
            continue
        print(f"== {name} {progress}", flush=True)
        command = [sys.executable, str(script)] + (["--smoke"] if args.smoke else [])
        start = time.perf_counter()
        code = subprocess.call(command)
        durations[name] = time.perf_counter() - start
        if code != 0:
            failed.append(name)
            print(f"== {name} FAILED (exit {code})", flush=True)
        print(f"== {name} took {durations[name]:.0f} s", flush=True)
        print(flush=True)
    summary = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())
    print(f"== done in {sum(durations.values()):.0f} s ({summary})")
    if failed:
        print(f"== failed: {', '.join(failed)}")
        return 1
    if not args.smoke:
        print(f"== tables and plots in {HERE / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
