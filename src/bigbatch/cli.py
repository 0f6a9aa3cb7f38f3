"""The `bigbatch` command line: thin shell over the library.

Errors from bad input become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bigbatch.plan import plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _plan_command(args: argparse.Namespace) -> int:
    result = plan(
        args.global_batch_size,
        world_size=args.world_size,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    print(json.dumps(result.to_dict()) if args.json else result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bigbatch", description="Train with the global batch you want.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan_parser = commands.add_parser(
        "plan", help="split a global batch into ranks x accumulation steps x micro-batches"
    )
    plan_parser.add_argument("--global-batch-size", type=int, required=True)
    plan_parser.add_argument("--world-size", type=int, default=1)
    split = plan_parser.add_mutually_exclusive_group()
    split.add_argument("--micro-batch-size", type=int)
    split.add_argument("--gradient-accumulation-steps", type=int)
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.set_defaults(handler=_plan_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bigbatch` console script and `python -m bigbatch`."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError) as error:
        print(f"bigbatch {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
