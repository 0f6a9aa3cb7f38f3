"""Recipes whose loss_fn sleeps STEP_DELAY seconds, so that a run is slow enough to be signalled
or raced; tests write them into their directory as a module the config names: `slow:build`
(digits, in samples) and `slow:build_tokens` (tinylm, for global batches in tokens). With
SIGNAL_AT_CALL=n, the n-th call of loss_fn sends its own process SIGTERM (a signal inside a
chosen step); with STARTED_FILE=path, its first call creates that file (the first step runs);
with HOLD_FILE=path, every call waits while that file exists (a run held in a step until the
test lets it go).
`SIGNAL_BEFORE_TRAINING` runs `bigbatch` with a SIGTERM to itself just before the trainer's
first step, and `REAPER` runs a command as a child subreaper (Linux) and prints the exit code of
every process it reaps, the launcher's orphaned workers included."""

SLOW_RECIPE = """
import os, signal, time
from bigbatch.recipes import digits, tinylm

def build(config):
    return slowed(digits.build(config))

def build_tokens(config):
    return slowed(tinylm.build(config))

def slowed(recipe):
    plain, delay = recipe.loss_fn, float(os.environ.get("STEP_DELAY", "0"))
    signal_at, calls = int(os.environ.get("SIGNAL_AT_CALL", "0")), [0]
    started, hold = os.environ.get("STARTED_FILE"), os.environ.get("HOLD_FILE")

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == 1 and started:
            open(started, "w").close()
        if calls[0] == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(delay)
        while hold and os.path.exists(hold):
            time.sleep(0.05)
        return plain(model, batch)

    recipe.loss_fn = loss_fn
    return recipe
"""

SIGNAL_BEFORE_TRAINING = """
import os, signal, sys
from bigbatch.cli import main
from bigbatch.train import trainer

train = trainer.Trainer._train

def signalled(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return train(self, *args, **kwargs)

trainer.Trainer._train = signalled
sys.exit(main())
"""

REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
launcher = subprocess.Popen(sys.argv[1:])
print(launcher.pid, flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print(pid, os.waitstatus_to_exitcode(status), flush=True)
"""
