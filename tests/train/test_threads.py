"""The `threads` setting: how many intra-op threads, and passive waiting set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bigbatch.train import environment, threads
from bigbatch.train.configfile import load_config


@pytest.mark.parametrize(
    ("cpus", "local", "expected"),
    [(8, 1, 7), (8, 2, 3), (6, 4, 1), (2, 4, 1), (2, 1, 1), (1, 1, 1)],
)
def test_auto_is_the_share_of_usable_cpus_less_one(monkeypatch, cpus, local, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.resolve_threads("auto") == expected == max(1, cpus // local - 1)
    assert threads.resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or torchrun's) choice wins
    assert threads.resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set to nothing: not a choice
    assert threads.resolve_threads("auto") == expected


def test_apply_threads_sets_torch_and_gives_the_count_back():
    before = torch.get_num_threads()
    try:
        assert environment.apply_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_passive_waiting_is_set_only_where_the_user_chose_nothing():
    environ: dict[str, str] = {}
    assert threads.wait_passively(environ) == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.wait_passively(chosen) == {} and chosen == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_command_line_waits_passively_before_torch_loads():
    code = (
        "import os, sys\n"
        "from bigbatch.cli import main\n"
        "try:\n"
        "    main(['plan', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in threads.PASSIVE_WAITING}
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert output.splitlines()[-1] == "PASSIVE False"


def test_threads_key_takes_auto_or_a_positive_count():
    assert load_config(None, []).threads == "auto"
    assert load_config(None, ["threads=3"]).threads == 3
    for bad in ("threads=0", "threads=many", "threads=true"):
        with pytest.raises(ValueError, match=r"^config: threads: must be a positive integer or"):
            load_config(None, [bad])
