"""Exact resume, in real processes: SIGTERM, kill -9 after a checkpoint, kill -9 mid-save.

Each run is a child process on 2 pinned CPU devices (the mesh), training the tiny `test`
config for 8 steps with checkpoints every 4. A module fixture trains the uninterrupted
reference once; each test interrupts a run, resumes it in a fresh process, and requires
the final params to be bitwise identical to the reference and `metrics.jsonl` to hold
the same lines.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_bitwise_same_run, child_env

from flaxseg.train.checkpoint import Checkpointer
from flaxseg.train.reporting import read_metrics

STEPS = 8
OVERRIDES = {"num_train_steps": STEPS, "checkpoint_every_steps": 4, "eval_every_steps": 4,
             "log_every_steps": 2, "keep_checkpoints": 3}

# The child: train the test config; optional hooks interrupt it at a chosen point.
#   sigterm_at: send SIGTERM to itself while fetching that step's batch (the loop saves
#     after the step that is running and exits 0);
#   batch_delay: seconds of sleep per batch (so a random kill lands mid-run);
#   kill_in_save: SIGKILL itself right after that save started (its async write is
#     in flight: what a power cut during a save leaves behind).
CHILD = r"""
import json, os, signal, sys, time
import jax
from flaxseg import cli, configs
from flaxseg.data import pipeline
from flaxseg.train import checkpoint, loop
cli.collect_garbage_less()  # as the command line does

args = json.loads(sys.argv[1])
config = configs.get_config("test")
config.update_from_flattened_dict(args["overrides"])
hooks = args.get("hooks", {})

real_next = pipeline.TrainIterator.__next__
fetched = [0]
def next_batch(self):
    fetched[0] += 1
    if fetched[0] == hooks.get("sigterm_at"):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(hooks.get("batch_delay", 0.0))
    return real_next(self)
pipeline.TrainIterator.__next__ = next_batch

real_save = checkpoint.Checkpointer.save
def save(self, step, *a, **k):
    real_save(self, step, *a, **k)
    print(f"saving step {step}", flush=True)
    if step == hooks.get("kill_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save

loop.train_and_evaluate(config, args["workdir"])
"""


def _start(workdir: Path, overrides: dict | None = None, **hooks) -> subprocess.Popen:
    args = json.dumps({"workdir": str(workdir), "overrides": {**OVERRIDES, **(overrides or {})},
                       "hooks": hooks})
    return subprocess.Popen([sys.executable, "-c", CHILD, args], env=child_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir: Path, overrides: dict | None = None, **hooks) -> tuple[int, str]:
    proc = _start(workdir, overrides, **hooks)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("reference")
    code, out = _run(workdir)
    assert code == 0, out
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "train"] == list(
        range(2, STEPS + 1, 2))
    return workdir


def test_sigterm_saves_exits_0_and_resumes_bitwise(reference, tmp_path):
    # SIGTERM while fetching step 3's batch: step 3 runs, then the loop saves and exits,
    # half-way through a log interval (whose partial sums the checkpoint keeps).
    code, out = _run(tmp_path, sigterm_at=3)
    assert code == 0, out
    assert "Stopped by SIGTERM at step 3" in out
    assert not (tmp_path / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(tmp_path)) == 2
    code, out = _run(tmp_path)
    assert code == 0, out
    assert "Resuming from the checkpoint of step 3" in out
    assert_bitwise_same_run(tmp_path, reference, STEPS)


def test_kill_9_after_the_first_checkpoint_loses_only_the_steps_since(
        reference, tmp_path):
    proc = _start(tmp_path, batch_delay=0.05)
    first = tmp_path / "checkpoints" / "4"
    deadline = time.monotonic() + 240
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.is_dir(), proc.communicate()[0]
    time.sleep(random.uniform(0.0, 0.2))  # a random moment after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ckpt = Checkpointer(tmp_path, read_only=True)
    latest = ckpt.latest_step()
    ckpt.close()
    assert latest in (4, STEPS)
    code, out = _run(tmp_path)
    assert code == 0, out
    if latest == 4:
        assert "Resuming from the checkpoint of step 4" in out
    assert_bitwise_same_run(tmp_path, reference, STEPS)


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_restorable(
        reference, tmp_path):
    # Checkpoints every 2 steps (saving does not change the run); killed saving step 6.
    every_2 = {"checkpoint_every_steps": 2}
    code, out = _run(tmp_path, every_2, kill_in_save=6)
    assert code == -signal.SIGKILL, out
    assert "saving step 6" in out
    ckpt = Checkpointer(tmp_path, read_only=True)
    assert ckpt.latest_step() in (4, 6)  # the killed write may or may not have landed
    ckpt.close()
    code, out = _run(tmp_path, every_2)
    assert code == 0, out
    assert_bitwise_same_run(tmp_path, reference, STEPS)
