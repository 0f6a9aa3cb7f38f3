"""The argument parser of every `bigbatch` subcommand: flags pick files and modes, settings live
in the config (YAML + `--set`). Bad flags exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from bigbatch.choices import (
    DEFAULT_OPTIMIZE,
    OPTIMIZE_GOALS,
    PARALLELISMS,
    describe,
    parse_activation_checkpointing,
)
from bigbatch.cli import commands as handlers
from bigbatch.planning import MAX_WORLD_SIZE, check_count
from bigbatch.units import MAX_COUNT, UsageError, one_line, shorten

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


def _count(text: str, maximum: int = MAX_COUNT) -> int:
    """An argparse type: a positive integer, refused in a short line (never echoed back whole)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a positive integer: {shorten(text)}") from None
    try:
        check_count("the value", value, maximum=maximum)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _world_size(text: str) -> int:
    return _count(text, MAX_WORLD_SIZE)


def _tolerance(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {shorten(text)}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {shorten(text)}")
    return value


def _checkpointing(text: str) -> str:
    """An argparse type: an activation_checkpointing policy in its one spelling."""
    try:
        return parse_activation_checkpointing(text, "the value")
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a YAML config (default: the digits recipe)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set lr=1e-3 --set lr_scaling.rule=sqrt (repeatable)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (recipe defaults filled in) and exit",
    )
    parser.add_argument(
        "--help-config",
        action=_ConfigHelp,
        help="list every config key with what it allows, its default and its meaning, and exit",
    )


class _ConfigHelp(argparse.Action):
    """``--help-config``: like --help, it answers and exits before any other check."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from bigbatch.train.configfile import describe_keys

        print(describe_keys())
        parser.exit()


def _add_plan_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "plan",
        help="split a global batch into ranks x accumulation steps x micro-batches: from flags, "
        "or from a run's config (YAML + --set) as train would, probing micro_batch_size auto",
        parents=[common],
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--activation-checkpointing",
        type=_checkpointing,
        help="with a config: the policy to plan with, instead of the config's (none, full, "
        "every_<k>, offload; auto compares none, every_2 and full with micro_batch_size auto)",
    )
    unit = parser.add_mutually_exclusive_group()
    unit.add_argument("--global-batch-size", type=_count)
    unit.add_argument(
        "--global-batch-tokens",
        type=_count,
        help="a global batch in input tokens (docs/tokens.md); with --recipe its first steps",
    )
    parser.add_argument("--world-size", type=_world_size, default=1)
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--micro-batch-size", type=_count)
    split.add_argument("--gradient-accumulation-steps", type=_count)
    parser.add_argument(
        "--memory-budget",
        help='choose micro_batch_size by probing the recipe within this memory, e.g. "2GiB"',
    )
    parser.add_argument(
        "--recipe",
        help="the recipe to probe with --memory-budget (digits); with --global-batch-tokens, "
        "whose sample lengths to plan",
    )
    parser.add_argument(
        "--micro-batch-tokens", type=int, help="padded tokens (rows x longest row) a micro-batch"
    )
    parser.add_argument(
        "--packing", action="store_true", help="with --global-batch-tokens: packed rows"
    )
    parser.add_argument(
        "--optimize",
        choices=tuple(OPTIMIZE_GOALS),
        default=DEFAULT_OPTIMIZE,
        help=f"with --memory-budget, what to choose: {describe(OPTIMIZE_GOALS)} "
        f"(default {DEFAULT_OPTIMIZE})",
    )
    parser.add_argument(
        "--parallelism",
        choices=tuple(PARALLELISMS),
        help="with --memory-budget, how the ranks hold the model, so that the budget is one "
        f"rank's: {describe(PARALLELISMS)} (default ddp); fsdp compares both gradient_sync modes",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(handler=handlers.plan_command)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="bigbatch", description="Train with the global batch you want.")
    debug = "on bad input, also show bigbatch's own traceback"
    parser.add_argument("--debug", action="store_true", help=debug)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train a recipe: plan, progress, summary", parents=[common]
    )
    _add_config_arguments(train)
    train.add_argument("--out", help="run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument(
        "--autoresume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint if it has one, else start it "
        "(for torchrun's restarts: docs/elastic.md)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run in --out (its files only)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=handlers.train_command)

    _add_plan_parser(commands, common)

    verify = commands.add_parser(
        "verify",
        help="check the accumulated update against the full batch, in float64 (under "
        "torchrun: split over the ranks with DDP or FSDP, as parallelism says)",
        parents=[common],
    )
    _add_config_arguments(verify)
    verify.add_argument("--num-global-batches", type=_count, default=2)
    verify.add_argument(
        "--tolerance", type=_tolerance, default=1e-6, help="largest relative error (>= 0)"
    )
    verify.set_defaults(handler=handlers.verify_command)

    bench = commands.add_parser(
        "bench",
        help="quick benchmarks: engine overhead, DDP all-reduces, activation memory",
        parents=[common],
    )
    bench.add_argument("--steps", type=_count, default=40, help="timed steps after warm-up")
    bench.add_argument("--micro-batch-size", type=_count, default=32)
    bench.add_argument("--gradient-accumulation-steps", type=_count, default=8)
    bench.add_argument("--smoke", action="store_true", help="a few steps only")
    bench.set_defaults(handler=handlers.bench_command)
    return parser
