"""The handlers of `bigbatch train`, `plan`, `verify` and `bench`.

Each reads its parsed flags and the config, calls the library and prints what it returns. Heavy
imports happen inside each handler, so that `bigbatch plan` answers without loading torch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigbatch.choices import DEFAULT_OPTIMIZE
from bigbatch.planning import plan
from bigbatch.units import UsageError, parse_memory_size

if TYPE_CHECKING:
    from bigbatch.train.config import Config


def _resolved_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """The config from YAML and --set, with the recipe's defaults filled in, and the recipe."""
    from bigbatch.train.configfile import load_config, with_recipe_defaults
    from bigbatch.train.packages import check_recipe

    config = load_config(args.config, args.set)
    check_recipe(config)
    from bigbatch import recipes  # torch, once the config is known to be good

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


def train_command(args: argparse.Namespace) -> int:
    if args.print_config:
        return _print_config(_resolved_config(args)[0])
    config, out_dir = _checked_train_input(args)
    # Every check that needs no torch has passed: now the run's imports.
    from bigbatch.core import distributed
    from bigbatch.train.recipe_run import fit
    from bigbatch.train.trainer import NonFiniteError, RunStopped

    every_rank_here = False  # a finished run or an agreed stop: every rank ends here alike
    try:
        summary = fit(
            config,
            out_dir=out_dir,
            # --resume already starts a directory with nothing trained in it at step 0.
            resume=args.resume or args.autoresume,
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
            if stopped.summary is not None:  # the signal came during the last step
                print(_format_summary(stopped.summary))
            print(f"bigbatch train: {stopped}; {_resume_hint(args, stopped)}", file=sys.stderr)
        return stopped.exit_code
    finally:
        distributed.teardown_process_group(wait_for_all=every_rank_here)
    return 0


def _checked_train_input(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config and the run directory of `train`, every check that needs no torch passed:
    flags, --out, the config, the packages it needs, a run already in --out (nothing written)."""
    from bigbatch.train.configfile import load_config
    from bigbatch.train.packages import check_packages
    from bigbatch.train.rundir import LOCK_FILE, check_reuse, check_run_dir

    for flag in ("resume", "autoresume"):
        if getattr(args, flag) and args.out is None:
            raise UsageError(f"--{flag} needs --out DIR: the run directory to continue")
        if getattr(args, flag) and args.overwrite:
            raise UsageError(
                f"--{flag} continues the run in --out and --overwrite deletes it: give one of them"
            )
    out_dir = None if args.out is None else check_run_dir(args.out)
    config = load_config(args.config, args.set)
    check_packages(config)
    # Checked again under the run's lock; a lock file there (a run under way, or a killed one's)
    # leaves the answer to the lock, which tells the two apart.
    if out_dir is not None and not (out_dir / LOCK_FILE).exists():
        check_reuse(out_dir, resume=args.resume or args.autoresume, overwrite=args.overwrite)
    return config, out_dir


def token_plan_command(args: argparse.Namespace) -> int:
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
    if stopped.moment == "end":
        return f"exit {stopped.exit_code} as a stop by a signal, nothing to resume"
    if stopped.run_dir is None:
        return "no run directory, nothing to resume"
    run_dir = str(stopped.run_dir)
    from bigbatch.core import distributed

    if distributed.launched_by_torchrun():
        if args.autoresume:
            return "the same launch command continues it (it has --autoresume)"
        return f"continue with the same launch command plus --out {shlex.quote(run_dir)} --resume"
    command = ["bigbatch", "train", *([args.config] if args.config else [])]
    for setting in args.set:
        command += ["--set", setting]
    command += ["--out", run_dir, "--resume", *(["--no-progress"] if args.no_progress else [])]
    return f"continue with: {shlex.join(command)}"


_FLAG_SETTINGS = {
    "global_batch_size": "global_batch_size",
    "global_batch_tokens": "global_batch_tokens",
    "micro_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "micro_batch_tokens": "micro_batch_tokens",
    "memory_budget": "memory_budget",
    "recipe": "recipe",
    "parallelism": "parallelism",
}


def _steps_or_none(value: Any) -> int | None:
    """A count the config gives, or None for unset and auto (the plan derives it)."""
    return value if isinstance(value, int) else None


def _config_plan_command(args: argparse.Namespace) -> int:
    """`bigbatch plan CONFIG --set ...`: the plan of the run the config describes."""
    from bigbatch.train.configfile import load_config

    for name, key in _FLAG_SETTINGS.items():
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: with a config, set {key} in it (--set {key}=...)")
    if args.packing or args.optimize != DEFAULT_OPTIMIZE:
        raise UsageError("--packing and --optimize: with a config, set packing or optimize in it")
    load_config(args.config, args.set)  # the config's errors before torch is loaded
    config, recipe = _resolved_config(args)
    if args.print_config:
        return _print_config(config)
    from bigbatch.tools.run_plan import RunSettings, plan_run
    from bigbatch.train.environment import resolve_device

    tokens = config.global_batch_tokens is not None
    if not tokens and config.global_batch_size is None:
        raise UsageError("global_batch_size: not set by the config nor the recipe; set it")
    policy = args.activation_checkpointing or getattr(config, "activation_checkpointing", "none")
    settings = RunSettings(
        world_size=args.world_size,
        global_batch_size=None if tokens else config.global_batch_size,
        global_batch_tokens=config.global_batch_tokens,
        micro=config.micro_batch_tokens if tokens else config.micro_batch_size,
        gradient_accumulation_steps=_steps_or_none(
            None if tokens else config.gradient_accumulation_steps
        ),
        packing=bool(config.packing),
        memory_budget=config.memory_budget,
        optimize=config.optimize,
        parallelism=config.parallelism,
        gradient_sync=config.gradient_sync,
        activation_checkpointing=policy,
    )
    text, result = plan_run(recipe, settings, resolve_device(config.device))
    print(json.dumps(result) if args.json else text)
    return 0


def plan_command(args: argparse.Namespace) -> int:
    if args.config is not None or args.set or args.print_config:
        return _config_plan_command(args)
    if args.global_batch_size is None and args.global_batch_tokens is None:
        raise UsageError(
            "plan needs a global batch: --global-batch-size N or --global-batch-tokens N, or a "
            "run's config (a YAML file and/or --set global_batch_size=N)"
        )
    if args.activation_checkpointing is not None:
        raise UsageError(
            "--activation-checkpointing plans a run's config: give the config (a YAML file "
            "and/or --set key=value), with micro_batch_size auto and memory_budget to probe"
        )
    if args.parallelism is not None and args.memory_budget is None:
        raise UsageError(
            "--parallelism only matters with --memory-budget: it says what one rank holds"
        )
    if args.global_batch_tokens is not None:
        return token_plan_command(args)
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


def verify_command(args: argparse.Namespace) -> int:
    config, recipe = _resolved_config(args)
    from bigbatch.core import distributed
    from bigbatch.tools.verify import format_report

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
    from bigbatch.tools.verify_distributed import verify_configuration

    if world_size == 1 and config.parallelism == "fsdp":
        print(
            "bigbatch verify: warning: parallelism fsdp shards over several processes and this "
            "is one: checking one process, unsharded (to check the sharded configuration: "
            "torchrun --standalone --nproc_per_node=2 -m bigbatch verify ...)",
            file=sys.stderr,
        )
    return verify_configuration(
        recipe,
        world_size,
        global_batch_size=config.global_batch_size,
        micro_batch_size=_steps_or_none(config.micro_batch_size),
        gradient_accumulation_steps=_steps_or_none(config.gradient_accumulation_steps),
        num_global_batches=args.num_global_batches,
        tolerance=args.tolerance,
        seed=config.seed,
        batchnorm=config.batchnorm,
        parallelism=config.parallelism,
        gradient_sync=config.gradient_sync,
    )


def bench_command(args: argparse.Namespace) -> int:
    from bigbatch.tools import bench

    print(
        bench.quick_report(
            smoke=args.smoke,
            steps=args.steps,
            micro_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
    )
    return 0
