"""Hostile input: every bad value, file or directory is answered at once, in one short line, exit 2.

Each case runs the command line as a user would and checks the exit code, that stderr holds one
line naming what is wrong (never a traceback, never a huge value echoed back), and the time it
took. The ones that could grow without bound run in a subprocess under a memory limit; a full
disk is made real with RLIMIT_FSIZE (the kernel refuses the write, as on a full disk).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
FAST = ["--set", "max_steps=3", "--set", "eval_every=0", "--no-progress"]
MAX_LINE = 460  # "bigbatch train: error: " + a message cut at 400 characters
HUGE = "9" * 5000  # more digits than Python reads as an integer


def run(capsys, argv: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = int(exit_.code or 0)
    elapsed = time.perf_counter() - start
    return code, capsys.readouterr().err, elapsed


def assert_refused(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err and len(lines[0]) <= MAX_LINE, lines[0][:600]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_ends_in_one_line(code: int, err: str, *fragments: str) -> None:
    """A refusal in mid-run: the log lines of the run, then the error, one line, last."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert errors == lines[-1:], err[-2000:]
    assert_refused(code, errors[0], *fragments)


def files(tmp_path: Path) -> dict[str, str]:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text("train_micro_batch_size_per_gpu: 8\nmicro_batch_size: 8\n")
    digits = tmp_path / "digits.yaml"
    digits.write_text(f"global_batch_size: {HUGE}\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 0.01\nseed: 3\nlr: 0.02\n")
    sparse = tmp_path / "huge.yaml"
    with open(sparse, "wb") as handle:
        handle.truncate(20 * 2**20)  # 20 MiB of nothing, without using the disk
    return {
        "dir": str(tmp_path),
        "binary": str(binary),
        "file": str(a_file),
        "aliased": str(aliased),
        "sparse": str(sparse),
        "digits": str(digits),
        "twice": str(twice),
    }


# 10 levels of anchors, each 10 aliases of the one before: 10**10 values once expanded.
BOMB = (
    "recipe_options.y=[&a0 [x, x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10))
    + "]"
)
DEEP = "recipe_options.x=" + "[" * 5000 + "]" * 5000
TOKENS = ["train", "--set", "recipe=tinylm", "--set", "recipe_options.num_train_samples=500"]
TOKENS += ["--set", "warmup_steps=0"]

# (id, argv with {placeholders}, fragments the one line must hold)
CASES = [
    ("plan 10**20", ["plan", "--global-batch-size", str(10**20)], ["2**63 - 1"]),
    ("plan 5000 digits", ["plan", "--global-batch-size", HUGE], ["--global-batch-size"]),
    ("plan negative", ["plan", "--global-batch-size", "-3"], ["--global-batch-size"]),
    (
        "plan 10**7 ranks",
        ["plan", "--global-batch-size", "100", "--world-size", str(10**7)],
        ["--world-size", "1,048,576"],
    ),
    (
        "plan budget 1e400",
        ["plan", "--global-batch-size", "64", "--memory-budget", "1e400"],
        ["--memory-budget"],
    ),
    ("global batch 10**20", ["train", "--set", f"global_batch_size={10**20}"], ["2**63 - 1"]),
    (
        "global batch beyond the data",
        ["train", "--set", f"global_batch_size={10**18}", "--out", "{tmp}/run"],
        ["global_batch_size", "larger than the training set"],
    ),
    ("memory_budget 1e400", ["train", "--set", "memory_budget=1e400"], ["memory_budget"]),
    ("seed 2**70", ["train", "--set", f"seed={2**70}"], ["seed", "2**63 - 1"]),
    ("max_steps 5000 digits", ["train", "--set", f"max_steps={HUGE}"], ["max_steps"]),
    ("lr 5000 digits", ["train", "--set", f"lr={HUGE}"], ["lr"]),
    (
        "checkpoint_every 10**30",
        ["train", "--set", f"checkpoint_every={10**30}"],
        ["checkpoint_every"],
    ),
    (
        "schedule 10**20",
        ["train", "--set", f"batch_size_schedule=[[0, 64], [5, {10**20}]]"],
        ["batch_size_schedule"],
    ),
    (
        "warmup beyond the run",
        ["train", "--set", "warmup_steps=1000000", "--out", "{tmp}/run"],
        ["warmup_steps 1000000", "3 steps"],
    ),
    (
        "epochs 10**15 with a warm-up beyond",
        ["train", "--set", "max_steps=null", "--set", "epochs=1000000000000000"]
        + ["--set", f"warmup_steps={2**62}"],
        ["warmup_steps", "(6000000000000000 steps)"],  # counted at once: 6 steps of 256 an epoch
    ),
    ("num_workers 100000", ["train", "--set", "num_workers=100000"], ["num_workers 100000"]),
    ("out empty", ["train", "--out", ""], ["--out", "empty"]),
    ("out a file", ["train", "--out", "{file}"], ["--out", "is a file"]),
    ("out under a file", ["train", "--out", "{file}/run"], ["cannot create the lock file"]),
    ("config a directory", ["train", "{dir}"], ["is a directory"]),
    ("config binary", ["train", "{binary}"], ["not a text file"]),
    ("config 20 MiB", ["train", "{sparse}"], ["20,971,520 bytes"]),
    ("config number of 5000 digits", ["train", "{digits}"], ["number too long"]),
    ("config a device", ["train", os.devnull], ["not a regular file"]),
    ("config name 100 kB", ["train", "x" * 100_000], ["config"]),
    (
        "alias and name in --set",
        ["train", "--set", "micro_batch_size=8", "--set", "per_device_train_batch_size=8"],
        ["'micro_batch_size' and 'per_device_train_batch_size'", "alias"],
    ),
    (
        "alias and name in YAML",
        ["train", "{aliased}"],
        ["'train_micro_batch_size_per_gpu' and 'micro_batch_size'"],
    ),
    ("key of 100 kB", ["train", "--set", "k" * 100_000 + "=1"], ["unknown key"]),
    ("value of 100 kB", ["train", "--set", "recipe=" + "r" * 100_000], ["recipe"]),
    ("stop on SIGKILL", ["train", "--set", "stop_signals=[SIGKILL]"], ["stop_signals"]),
    (
        "resume and overwrite",
        ["train", "--resume", "--overwrite", "--out", "{tmp}/run"],
        ["--resume", "--overwrite"],
    ),
    (
        "tinylm max_digits 10**9",
        ["train", "--set", "recipe=tinylm", "--set", "recipe_options.max_digits=1000000000"],
        ["recipe_options.max_digits"],
    ),
    (
        "tinylm max_digits one past its largest",
        ["train", "--set", "recipe=tinylm", "--set", "recipe_options.max_digits=31"],
        ["recipe_options.max_digits must be an integer in [1, 30], got 31"],
    ),
    ("no such recipe module", ["train", "--set", "recipe=nosuch.tasks:build"], ["nosuch"]),
    ("tolerance nan", ["verify", "--tolerance", "nan"], ["--tolerance"]),
    ("tolerance negative", ["verify", "--tolerance", "-1"], ["--tolerance"]),
    ("tolerance inf", ["verify", "--tolerance", "1e400"], ["--tolerance"]),
    ("verify batches 0", ["verify", "--num-global-batches", "0"], ["--num-global-batches"]),
    (
        "verify global batch 10**18",
        ["verify", "--set", f"global_batch_size={10**18}"],
        ["larger than the recipe's training set"],
    ),
    ("bench steps 0", ["bench", "--steps", "0"], ["--steps"]),
    # Round two (issue 23): keys twice, booleans, overflowing floats, names, recipes, tokens.
    ("config key twice", ["train", "{twice}"], ["key 'lr' appears twice (lines 1 and 3)"]),
    ("--set key twice", ["train", "--set", "recipe_options={{a: 1, a: 2}}"], ["'a' appears twice"]),
    (
        "--set alias bomb",
        ["train", "--set", BOMB],
        ["recipe_options", "100,000 values"],
    ),
    ("--set 5000 deep", ["train", "--set", DEEP], ["recipe_options.x", "deeper than 32"]),
    ("lr true", ["train", "--set", "lr=true"], ["lr: must be a number > 0", "got true"]),
    (
        "global batch true",
        ["train", "--set", "global_batch_size=true"],
        ["global_batch_size: must be a positive integer, got true"],
    ),
    ("seed false", ["train", "--set", "seed=false"], ["seed", "got false"]),
    ("micro true", ["train", "--set", "micro_batch_size=true"], ["micro_batch_size", "got true"]),
    ("lr 1.0e300", ["train", "--set", "lr=1.0e300"], ["lr", "at most 1e6"]),
    ("lr 1.0e+300", ["train", "--set", "lr=1.0e+300"], ["lr", "at most 1e6", "1e+300"]),
    ("weight_decay 1e300", ["train", "--set", "weight_decay=1.0e+300"], ["weight_decay"]),
    ("max_grad_norm 1e39", ["train", "--set", "max_grad_norm=1.0e+39"], ["max_grad_norm"]),
    (
        "out name of 300 characters",
        ["train", "--out", "{tmp}/" + "o" * 300],
        ["--out", "a name in the path has 300 bytes"],
    ),
    ("out path of 6000 characters", ["train", "--out", "{tmp}" + "/o" * 3000], ["--out"]),
    (
        "recipe os:system",
        ["train", "--set", "recipe=os:system"],
        ["cannot be called with the config", "takes the config mapping and returns a bigbatch"],
    ),
    (
        "recipe bigbatch:plan",
        ["train", "--set", "recipe=bigbatch:plan"],
        ["returns Plan, not a Recipe", "'module:function'"],
    ),
    (
        "recipe returns None",
        ["train", "--set", "recipe=builtins:id"],
        ["returned int, not a Recipe"],
    ),
    (
        "digits option",
        ["train", "--set", "recipe_options.max_digits=3"],
        ["recipe_options for digits: unknown key 'max_digits'"],
    ),
    (
        "tinylm option typo",
        ["train", "--set", "recipe=tinylm", "--set", "recipe_options.max_digitz=3"],
        ["unknown key 'max_digitz' (did you mean 'max_digits'?)"],
    ),
    (
        "global batch tokens 10**12",
        [*TOKENS, "--set", f"global_batch_tokens={10**12}"],
        ["global_batch_tokens: a global batch of 1000000000000 tokens", "tokens in 500 samples"],
    ),
    (
        "schedule in tokens 10**12",
        [
            *TOKENS,
            "--set",
            "global_batch_tokens=100",
            "--set",
            f"batch_size_schedule=[[2, {10**12}]]",
        ],
        ["batch_size_schedule", "tokens in 500 samples"],
    ),
    (
        "micro batch tokens 10**12",
        [*TOKENS, "--set", "global_batch_tokens=100", "--set", f"micro_batch_tokens={10**12}"],
        ["micro_batch_tokens 1000000000000", "500 samples x"],
    ),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("argv", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_exit_2(capsys, tmp_path, argv, fragments):
    names = {"tmp": str(tmp_path), **files(tmp_path)}
    argv = [arg.format(**names) if "{" in arg else arg for arg in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    if argv[0] == "train":  # the case's own settings come last, so they win
        argv = [argv[0], *FAST, *argv[1:]]
    code, err, elapsed = run(capsys, argv)
    assert_refused(code, err, *fragments)
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_one(capsys, tmp_path):
    code, err, _ = run(capsys, ["train", "--set", "device=cuda", "--out", str(tmp_path), *FAST])
    assert_refused(code, err, "device")


def _limited(memory_bytes: int | None = None, file_bytes: int | None = None):
    def apply() -> None:
        if memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        if file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, resource.RLIM_INFINITY))

    return apply


def bigbatch(*argv: str, cwd: Path = ROOT, limit=None, code: str | None = None, env=None):
    """The command line in a fresh interpreter (``code`` replaces ``-m bigbatch``)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "bigbatch"]
    start = time.monotonic()
    done = subprocess.run(
        command if code else [*command, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        preexec_fn=limit,
    )
    return done, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["plan", "--global-batch-size", str(10**20), "--micro-batch-size", "16"], "2**63 - 1"),
        (["train", "--set", f"global_batch_size={10**18}", "--no-progress"], "training set"),
    ],
    ids=["plan 10**20", "train 10**18"],
)
def test_huge_sizes_in_bounded_memory(tmp_path, argv, fragment):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    done, elapsed = bigbatch(*argv, limit=_limited(memory_bytes=4 * 2**30))
    assert_refused(done.returncode, done.stderr, fragment)
    assert elapsed < 120, f"took {elapsed:.0f} s"


def _bomb_yaml() -> str:
    lines = ["recipe_options:", "  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


YAML_FILES = {  # a file's text, and what the one line says
    "alias bomb": (_bomb_yaml(), "line 6: holds more than 100,000 values"),
    "5000 deep": ("recipe_options:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "deeper than 32"),
    "5000 deep, block style": ("- " * 5000 + "x\n", "deeper than 32"),
    "7 MB": ("recipe_options:\n" + "".join(f"  k{i}: v{i}\n" for i in range(700_000)), "bytes"),
    "recursive alias": ("recipe_options: &a\n  x: *a\n", "alias *a refers to a value"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("text", "fragment"), YAML_FILES.values(), ids=YAML_FILES.keys())
def test_hostile_yaml_in_bounded_time_and_memory(tmp_path, text, fragment):
    """Each refused at once, in one line, under 3 GB, within 30 s (before: minutes and 3.5 GB, a
    RecursionError, or 136 s and 1.09 GB)."""
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    argv = ["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]
    done, elapsed = bigbatch(*argv, limit=_limited(memory_bytes=3 * 10**9))
    assert_refused(done.returncode, done.stderr, fragment)
    assert elapsed < 30, f"took {elapsed:.0f} s"


RECIPE = """
import os
import resource
from bigbatch.recipes import digits

def build(config):
    recipe = digits.build(config)
    plain, calls = recipe.loss_fn, [0]
    full_at = int(os.environ.get("FULL_AFTER_MICRO_BATCHES", "0")) or None

    def loss_fn(model, batch):
        calls[0] += 1
        if full_at is not None and calls[0] == full_at:  # the disk fills up from here on
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
        return plain(model, batch)

    recipe.loss_fn = loss_fn
    return recipe
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"], ids=["plain", "sharded"])
def test_a_full_disk_while_saving_and_on_resume_is_one_line(tmp_path, parallelism):
    (tmp_path / "fills.py").write_text(RECIPE)
    out = tmp_path / "run"
    settings = [
        "--set", "recipe=fills:build", "--set", "global_batch_size=64", "--set", "max_steps=8",
        "--set", "eval_every=0", "--set", "checkpoint_every=2", "--no-progress",
        "--set", f"parallelism={parallelism}",  # fsdp: DCP's shards, on one process too
        "--set", "checkpoint_async=false",  # in the background: tests/train/test_checkpoint_async
    ]  # fmt: skip
    # 4 micro-batches a step: the disk is full from step 3 on, after the checkpoint of step 2
    # (written at its step boundary: a background write of it would meet the full disk).
    full = {"FULL_AFTER_MICRO_BATCHES": "9"}
    done, _ = bigbatch("train", *settings, "--out", str(out), cwd=tmp_path, env=full)
    assert_ends_in_one_line(done.returncode, done.stderr, "cannot write checkpoint", "too large")
    assert "intact (newest: step-00000002)" in done.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    # Resume on a disk that is still full: one line again; the checkpoint of step 2 still loads.
    size = (out / "metrics.jsonl").stat().st_size
    done, _ = bigbatch(
        "train", *settings, "--out", str(out), "--resume",
        cwd=tmp_path, limit=_limited(file_bytes=size + 200),
    )  # fmt: skip
    assert_ends_in_one_line(done.returncode, done.stderr, "cannot write", "too large")
    done, _ = bigbatch("train", *settings, "--out", str(out), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr and "step-00000002" in done.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_missing_optional_dependency_names_the_extra(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # as after a plain pip install bigbatch\n"
        "from bigbatch.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done, _ = bigbatch("train", "--out", str(tmp_path / "run"), *FAST, code=code)
    assert_refused(done.returncode, done.stderr, "scikit-learn", "pip install 'bigbatch[full]'")
