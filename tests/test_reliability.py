"""When things go wrong: one run per workdir, one-line errors, loud skipped steps, full disks.

The command-line cases run `python -m flaxseg.train` (or a child that patches one failure
in) and assert the exit status and that the error is one `Error: ...` line, no traceback.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TRAIN_CHILD, child_env, file_mtimes

from flaxseg.train.reporting import read_metrics
from flaxseg.train.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(REPO / "flaxseg" / "configs" / "test.py")

def _train(*flags: str, env: dict | None = None, wait: bool = True):
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, f"--config={TEST_CONFIG}", *flags],
                            env=env or child_env(1), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# -- one run per workdir ---------------------------------------------------------------------

def test_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    first = _train(f"--workdir={workdir}", "--config.num_train_steps=8",
                   env=child_env(1, FLAXSEG_TEST_BATCH_DELAY="0.3"), wait=False)
    deadline = time.monotonic() + 120
    while not (workdir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    code, _, err = _train(f"--workdir={workdir}", "--config.num_train_steps=8",
                          "--config.seed=7")
    assert code == 2 and time.monotonic() - started < 60
    line = _one_error_line(err)
    assert f"in use by another run (host {socket.gethostname()}, PID {first.pid}" in line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    steps = [(r["step"], r["split"]) for r in read_metrics(workdir)]
    assert len(steps) == len(set(steps))  # one run's lines, none twice
    assert not (workdir / LOCK_FILE).exists()  # released at the end


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": "2026-01-01T00:00:00"}))
    warnings = []
    with WorkdirLock(tmp_path, warn=warnings.append):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match=f"PID {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()  # flock: another holder in this process waits
    assert len(warnings) == 1 and f"PID {dead}" in warnings[0] and "no longer running" in \
        warnings[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_is_respected_even_where_flock_does_nothing(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": sleeper.pid, "started": "now"}))
        before = file_mtimes(tmp_path)
        with pytest.raises(WorkdirBusy, match=f"PID {sleeper.pid}"):
            WorkdirLock(tmp_path).acquire()
        assert file_mtimes(tmp_path) == before
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


# -- one line per user error -----------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--config=missing.py"], "missing.py"),
    (["--config.batch_sise=4"], "no key 'batch_sise'; did you mean 'batch_size'?"),
    (["--config.model.widht=4"], "no key 'widht'"),
    (["--config.num_train_steps=abc"], "--config.num_train_steps=abc: invalid literal for int()"),
    (["--config.optimizer.name=lamb"], "Unknown optimizer 'lamb'"),
])
def test_config_mistakes_are_one_line_and_exit_2(tmp_path, flags, message):
    code, _, err = _train(f"--workdir={tmp_path / 'run'}", *flags)
    assert code == 2 and message in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_a_config_file_with_a_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "flaxseg.train", f"--config={bad}",
                             f"--workdir={tmp_path / 'run'}"], env=child_env(1), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert f"the config file {bad} does not import" in line and "line 3" in line


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    code, _, err = _train(f"--workdir={tmp_path / 'file' / 'run'}")
    assert code == 2 and "Not a directory" in _one_error_line(err)


def test_the_traceback_is_there_when_asked_for(tmp_path):
    code, _, err = _train(f"--workdir={tmp_path / 'run'}", "--config.batch_sise=4",
                          env=child_env(1, FLAXSEG_TRACEBACK="1"))
    assert code != 0 and "Traceback" in err


# -- non-finite losses, full disks -----------------------------------------------------------

DIVERGE = ("--config.optimizer.learning_rate=1e30", "--config.num_train_steps=30",
           "--config.log_every_steps=30", "--config.eval_every_steps=30",
           "--config.checkpoint_every_steps=30")


def test_a_non_finite_loss_is_one_line_and_exit_1(tmp_path):
    code, _, err = _train(f"--workdir={tmp_path / 'run'}", *DIVERGE)
    assert code == 1
    assert "Non-finite loss or gradient at step" in _one_error_line(err)


def test_skipped_steps_are_loud_and_a_run_of_them_stops_the_run(tmp_path):
    code, out, err = _train(f"--workdir={tmp_path / 'run'}", *DIVERGE,
                            "--config.nan_policy=skip")
    assert code == 1
    skipped = [line for line in out.splitlines() if "the update was skipped" in line]
    assert len(skipped) == 10 and "(10 skipped so far" in skipped[-1]
    assert "The last 10 steps" in _one_error_line(err)
    assert not (tmp_path / "run" / "summary.json").exists()  # never "Done" with this model


def test_a_full_disk_stops_the_run_naming_the_intact_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    code, out, err = _train(f"--workdir={workdir}", "--config.checkpoint_every_steps=2",
                            env=child_env(1, FLAXSEG_TEST_DISK_FULL_FROM="4"))
    assert code == 2
    line = _one_error_line(err)  # not orbax's ~380 lines of background-thread traceback
    assert line == (f"Error: no space left on device while saving checkpoint 4 in "
                    f"{workdir / 'checkpoints'}; checkpoints 2 are intact.")
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert not (workdir / "summary.json").exists()  # stopped at the next save, not "Done"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # 4.orbax-checkpoint-tmp gone
    assert not (workdir / LOCK_FILE).exists()


@pytest.mark.parametrize("module, extra", [("scipy", "scipy"), ("h5py", "h5"), ("torch", "torch")])
def test_a_missing_optional_dependency_names_the_extra_to_install(monkeypatch, module, extra):
    from flaxseg.extras import require
    from flaxseg.models.weights import WeightsError

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(WeightsError, match=rf"Reading x needs {module}: "
                                           rf"pip install 'flaxseg\[{extra}\]'"):
        require(module, "Reading x", WeightsError)


def test_the_rand_error_without_scipy_says_how_to_get_it(monkeypatch):
    import numpy as np

    from flaxseg.metrics import rand_pair_counts

    monkeypatch.setitem(sys.modules, "scipy.ndimage", None)
    with pytest.raises(ImportError, match=r"Rand error.*pip install 'flaxseg\[scipy\]'"):
        rand_pair_counts(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32), 0)


def test_a_run_mostly_skipped_fails_and_is_not_saved_as_finished(tmp_path):
    from flaxseg import cli
    from flaxseg.configs import get_config
    from flaxseg.train.loop import train_and_evaluate
    from flaxseg.train.steps import NonFiniteLossError

    config = get_config("test")
    config.parallel = "jit"
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 4
    config.optimizer.learning_rate = 1e6
    config.nan_policy = "skip"
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        train_and_evaluate(config, str(workdir))
    line, status = cli.describe(error.value)
    assert status == 1
    assert re.fullmatch(r"\d of the 4 steps up to step 4 were non-finite and skipped \(more "
                        r"than 10%; last finite loss .* at step \d\): the run has not trained "
                        r"and is not saved as finished\. .*", line), line
    assert not (workdir / "summary.json").exists()
    assert os.listdir(workdir / "checkpoints") == []  # no final checkpoint to resume as done
