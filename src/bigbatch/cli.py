"""The `bigbatch` command line: train, plan, verify, bench -- a thin shell over the library.

Settings come from the config schema (YAML + `--set key=value`); the flags here only pick files and
modes. Exit codes: 0 done; 1 a failed `verify`, a run stopped by non-finite losses, or an error in
the user's own code (its traceback shown); 2 bad input (a `UsageError`: one line on stderr, its
traceback only with `--debug`); 128 + N a run stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from bigbatch.choices import DEFAULT_OPTIMIZE, OPTIMIZE_GOALS, PARALLELISMS, describe
from bigbatch.planning import MAX_WORLD_SIZE, check_count, plan
from bigbatch.units import MAX_COUNT, UsageError, one_line, parse_memory_size, shorten

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a Ctrl-C before the first step, with nothing to save


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


def _rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _resolved_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The config from YAML and --set, with the recipe's defaults filled in, and the recipe."""
    from bigbatch import recipes
    from bigbatch.train.configfile import load_config, with_recipe_defaults

    config = load_config(args.config, args.set)
    recipe = recipes.build(config.recipe, config.model_dump())
    return with_recipe_defaults(config, recipe.defaults), recipe


def _print_config(config: Any) -> int:
    from bigbatch.train.configfile import config_to_yaml

    print(config_to_yaml(config), end="")
    return 0


def _format_summary(summary: Any) -> str:
    """The end-of-run lines."""
    from bigbatch.train import report

    return str(report.format_summary(summary.to_dict()))


def _train_command(args: argparse.Namespace) -> int:
    from bigbatch.core import distributed
    from bigbatch.train.configfile import load_config
    from bigbatch.train.rundir import check_run_dir
    from bigbatch.train.trainer import NonFiniteError, RunStopped, fit

    if args.print_config:
        return _print_config(_resolved_config(args)[0])
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR: the run directory to continue")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume continues the run in --out and --overwrite deletes it: give one of them"
        )
    out_dir = None if args.out is None else check_run_dir(args.out)
    config = load_config(args.config, args.set)
    every_rank_here = False  # a finished run or an agreed stop: every rank ends here alike
    try:
        summary = fit(
            config,
            out_dir=out_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        every_rank_here = True
        if distributed.is_main_process():
            print(_format_summary(summary))
    except NonFiniteError as error:
        print(f"bigbatch train: stopped: {error}", file=sys.stderr)
        return 1
    except RunStopped as stopped:
        every_rank_here = True
        if distributed.is_main_process():
            print(f"bigbatch train: {stopped}; {_resume_hint(args, stopped)}", file=sys.stderr)
        return stopped.exit_code
    finally:
        distributed.teardown_process_group(wait_for_all=every_rank_here)
    return 0


def _token_plan_command(args: argparse.Namespace) -> int:
    """`bigbatch plan --global-batch-tokens`: the budgets alone, or a recipe's first steps."""
    if args.micro_batch_size is not None or args.gradient_accumulation_steps is not None:
        raise UsageError(
            "--global-batch-tokens cuts micro-batches by tokens: use --micro-batch-tokens (or "
            "--memory-budget with --recipe) instead of --micro-batch-size or "
            "--gradient-accumulation-steps"
        )
    if args.memory_budget is not None and (args.recipe is None or args.micro_batch_tokens):
        raise UsageError(
            "--memory-budget chooses micro_batch_tokens by probing a recipe: give --recipe and "
            "leave out --micro-batch-tokens"
        )
    if args.recipe is None:  # the budgets alone: no torch to load
        from bigbatch.planning import TokenBudget

        budget = TokenBudget(
            args.global_batch_tokens, args.world_size, args.micro_batch_tokens, args.packing
        )
        print(json.dumps(budget.to_dict()) if args.json else budget)
        return 0
    from bigbatch.tools.autotokens import token_plan_report

    text, result = token_plan_report(
        args.recipe,
        args.global_batch_tokens,
        world_size=args.world_size,
        micro_batch_tokens=args.micro_batch_tokens,
        packing=args.packing,
        memory_budget=args.memory_budget,
        optimize=args.optimize,
        parallelism=args.parallelism or "ddp",
    )
    print(json.dumps(result) if args.json else text)
    return 0


def _resume_hint(args: argparse.Namespace, stopped: Any) -> str:
    """How to continue a stopped run: the same command with --resume (and its --out)."""
    if stopped.checkpoint is None:
        return "no run directory, nothing to resume"
    run_dir = str(stopped.checkpoint.parent.parent)
    from bigbatch.core import distributed

    if distributed.launched_by_torchrun():
        return f"continue with the same launch command plus --out {shlex.quote(run_dir)} --resume"
    command = ["bigbatch", "train", *([args.config] if args.config else [])]
    for setting in args.set:
        command += ["--set", setting]
    command += ["--out", run_dir, "--resume", *(["--no-progress"] if args.no_progress else [])]
    return f"continue with: {shlex.join(command)}"


def _plan_command(args: argparse.Namespace) -> int:
    if args.parallelism is not None and args.memory_budget is None:
        raise UsageError(
            "--parallelism only matters with --memory-budget: it says what one rank holds"
        )
    if args.global_batch_tokens is not None:
        return _token_plan_command(args)
    if args.micro_batch_tokens is not None or args.packing:
        raise UsageError("--micro-batch-tokens and --packing need --global-batch-tokens")
    if args.memory_budget is None:
        if args.recipe is not None:
            raise UsageError("--recipe only matters with --memory-budget (the probe runs it)")
        result = plan(
            args.global_batch_size,
            world_size=args.world_size,
            micro_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        print(json.dumps(result.to_dict()) if args.json else result)
        return 0
    parse_memory_size(args.memory_budget, "--memory-budget")  # before the recipe is built
    if args.micro_batch_size is not None or args.gradient_accumulation_steps is not None:
        raise UsageError(
            "--memory-budget chooses micro_batch_size: leave out --micro-batch-size and "
            "--gradient-accumulation-steps"
        )
    from bigbatch.tools.autobatch import format_choice, plan_for_budget

    choice, result = plan_for_budget(
        args.recipe or "digits",
        args.global_batch_size,
        world_size=args.world_size,
        memory_budget=args.memory_budget,
        optimize=args.optimize,
        parallelism=args.parallelism or "ddp",
    )
    if args.json:
        print(json.dumps({**result.to_dict(), "micro_batch_choice": choice.to_dict()}))
    else:
        print(format_choice(choice, result))
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    from bigbatch.core import distributed
    from bigbatch.tools.verify import format_report

    config, recipe = _resolved_config(args)
    if args.print_config:
        return _print_config(config)
    if config.global_batch_tokens is not None:
        raise UsageError(
            "global_batch_tokens: verify splits a global batch in samples; check the recipe "
            "with --set global_batch_size=N (a run in tokens runs the same Accumulator.step)"
        )
    if config.global_batch_size is None:
        raise UsageError("global_batch_size: not set by the config nor the recipe; set it")
    # float64 on the CPU, as on one process: gloo even where there are GPUs.
    distributed.setup_process_group(backend="gloo")
    every_rank_here = False
    try:
        report = _verify_report(args, config, recipe, distributed.get_world_size())
        if distributed.is_main_process():
            print(format_report(report), flush=True)
        # torchrun stops every rank once one exits with 1: none exits before rank 0 has printed
        # (the barrier of the teardown).
        every_rank_here = True
    finally:
        distributed.teardown_process_group(wait_for_all=every_rank_here)
    # verify_distributed takes every error's maximum over the ranks: every rank exits alike.
    return 0 if report.passed else 1


def _verify_report(args: argparse.Namespace, config: Any, recipe: Any, world_size: int) -> Any:
    """`verify` on one process, `verify_distributed` over the ranks of torchrun."""
    from bigbatch.tools.verify import verify
    from bigbatch.tools.verify_distributed import verify_distributed

    micro = config.micro_batch_size if isinstance(config.micro_batch_size, int) else None
    if micro is None and isinstance(config.gradient_accumulation_steps, int):
        steps = config.gradient_accumulation_steps
        micro = plan(
            config.global_batch_size, world_size, gradient_accumulation_steps=steps
        ).micro_batch_size
    settings: dict[str, Any] = {
        "global_batch_size": config.global_batch_size,
        "micro_batch_size": micro,
        "num_global_batches": args.num_global_batches,
        "tolerance": args.tolerance,
        "seed": config.seed,
        "batchnorm": config.batchnorm,
    }
    if world_size > 1:
        return verify_distributed(
            recipe, parallelism=config.parallelism, gradient_sync=config.gradient_sync, **settings
        )
    if config.parallelism == "fsdp":
        print(
            "bigbatch verify: warning: parallelism fsdp shards over several processes and this "
            "is one: checking one process, unsharded (to check the sharded configuration: "
            "torchrun --standalone --nproc_per_node=2 -m bigbatch verify ...)",
            file=sys.stderr,
        )
    return verify(recipe, **settings)


def _bench_command(args: argparse.Namespace) -> int:
    from bigbatch.tools import bench

    steps, warmup = (3, 1) if args.smoke else (args.steps, 5)
    row = bench.measure_overhead(
        steps=steps,
        warmup=warmup,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    print("Engine overhead: Accumulator.step vs the hand-written loop\n")
    print(bench.format_rows([row]))
    size = sum(p.numel() for p in bench.mlp(256).parameters()) / 1e6
    print(f"\nDDP: 2 gloo processes on this machine, MLP {size:.2f}M, micro-batch 16 per rank\n")
    print(bench.format_ddp(bench.measure_ddp((1, 4), steps=2 if args.smoke else 5)))
    print("\nMemory: digits, global batch 256, tensors saved for backward (the memory probe)\n")
    print(bench.format_memory(bench.measure_memory()))
    return 0


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
        help="split a global batch into ranks x accumulation steps x micro-batches",
        parents=[common],
    )
    unit = parser.add_mutually_exclusive_group(required=True)
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
    parser.set_defaults(handler=_plan_command)


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
        "--overwrite", action="store_true", help="replace the run in --out (its files only)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train_command)

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
    verify.set_defaults(handler=_verify_command)

    bench = commands.add_parser(
        "bench",
        help="quick benchmarks: engine overhead, DDP all-reduces, activation memory",
        parents=[common],
    )
    bench.add_argument("--steps", type=_count, default=40, help="timed steps after warm-up")
    bench.add_argument("--micro-batch-size", type=_count, default=32)
    bench.add_argument("--gradient-accumulation-steps", type=_count, default=8)
    bench.add_argument("--smoke", action="store_true", help="a few steps only")
    bench.set_defaults(handler=_bench_command)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
