"""Run every benchmark script in turn (what `make bench` runs); `--smoke` passes through.

Each script writes its table and plot under benchmarks/results/ (smoke runs print only). A script
that fails is reported and the others still run; the exit status is 1 if any failed.

    python benchmarks/run_all.py            # every figure, about 10 minutes on a 2-core CPU
    python benchmarks/run_all.py --smoke    # every code path in a minute or two
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
    "checkpointing",
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="pass --smoke to every script")
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(SCRIPTS)}; default: all")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(SCRIPTS)}")
    failed, durations = [], {}
    for name in args.names or SCRIPTS:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"== {name}: {script} is missing, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        command = [sys.executable, str(script)] + (["--smoke"] if args.smoke else [])
        start = time.perf_counter()
        code = subprocess.call(command)
        durations[name] = time.perf_counter() - start
        if code != 0:
            failed.append(name)
            print(f"== {name} FAILED (exit {code})", flush=True)
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
