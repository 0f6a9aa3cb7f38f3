"""The `bigbatch` command line: train, plan, verify, bench -- a thin shell over the library.

Settings come from the config schema (YAML + `--set key=value`); the flags here only pick files and
modes. Exit codes: 0 done; 1 a failed `verify`, a run stopped by non-finite losses, or an error in
the user's own code (its traceback shown); 2 bad input (a `UsageError`: one line on stderr, its
traceback only with `--debug`); 128 + N a run stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

from bigbatch.cli.parser import EXIT_USAGE, build_parser
from bigbatch.train.threads import wait_passively
from bigbatch.units import UsageError, one_line

__all__ = ["build_parser", "main"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT: a Ctrl-C before the first step, with nothing to save


def _rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _setup_logging(command: str) -> None:
    """bigbatch's log lines (the plan, derived numbers) on stderr: INFO for train on rank 0."""
    level = logging.INFO if command == "train" and _rank() == 0 else logging.WARNING
    package = logging.getLogger("bigbatch")
    handler = next((h for h in package.handlers if h.get_name() == __name__), None)
    if not isinstance(handler, logging.StreamHandler):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(__name__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    # main() may run many times in one process (tests, notebooks): write to today's stderr.
    handler.stream = sys.stderr
    package.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bigbatch` console script and `python -m bigbatch`.

    Returns the exit code (see the module's docstring). A `UsageError` becomes one line on stderr
    and exit 2; any other exception propagates with its traceback (exit 1 from the interpreter).
    """
    # OpenMP reads how its threads wait once, when torch loads it: passive unless the user chose.
    wait_passively()
    args = build_parser().parse_args(argv)
    _setup_logging(args.command)
    try:
        return int(args.handler(args))
    except UsageError as error:
        if args.debug:
            traceback.print_exc()
        message = one_line(str(error)) or type(error).__name__
        print(f"bigbatch {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a Ctrl-C before a run's own handlers are in place
        if args.debug:
            traceback.print_exc()
        print(f"bigbatch {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
