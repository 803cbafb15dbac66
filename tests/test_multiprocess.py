"""Several processes on one machine: `python -m flaxseg.train` with the distributed flags.

Each run is the real command line in child processes with 2 CPU devices each, talking over
localhost (gloo), with JAX's coordinator on a free port. A 1-process x 4-device run and a
2-process x 2-device run of a small default config (BatchNorm, so its statistics cross
processes) see the same global batches; trained in float64, their results agree to float
rounding, because only the order of the cross-device sums differs. On one topology a
stopped and resumed run is bitwise the uninterrupted one. conftest's persistent XLA cache
lets later runs of one topology skip compiling.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TRAIN_CHILD,
    assert_bitwise_same_run,
    child_env,
    final_params,
    free_port,
    multiprocess_env,
)

from flaxseg.train.checkpoint import Checkpointer, load_for_inference
from flaxseg.train.reporting import read_metrics

STEPS = 8
REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 20  # flaxseg's own watch: half of it
# The default config (U-Net with BatchNorm on the synthetic shapes), made small: one 16x16
# image per device, since XLA:CPU runs the tests' unoptimised float64 convolutions at ~30
# images/s (batches of 8 at 32x32: the module took 93 s and 130 CPU-s alone, cold; then 76 s
# and 105 CPU-s), and one U-Net stage, since jax 0.12.1 compiles every program in every
# process here (MULTIPROCESS_CACHE): depth 2 -> 1 took the module alone, cold, on jax 0.12.1
# from 104 s and 165 CPU-s to 85 s and 125 CPU-s. BatchNorm still syncs over processes.
FLAGS = [f"--config={REPO / 'flaxseg' / 'configs' / 'default.py'}",
         f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=4",
         "--config.eval_every_steps=4", "--config.log_every_steps=2",
         "--config.batch_size=4", "--config.model.features=4", "--config.model.depth=1",
         "--config.dataset.image_size=(16, 16)", "--config.dataset.num_val=16",
         "--config.optimizer.warmup_steps=2", "--config.optimizer.name=sgd",
         "--config.optimizer.learning_rate=0.05",
         f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
         # A process that cannot reach its peer fails within a minute, not at JAX's 300 s.
         "--initialization_timeout=60"]
# Every run of this module trains in float64 (conftest.TRAIN_CHILD's FLAXSEG_TEST_FLOAT64):
# in float32 the topologies' different cross-device summation orders move the U-Net's
# pre-activations by ~1e-6, enough to flip a ReLU gate that lies that close to zero (no
# float32 tolerance bounds a flip; see test_train_core's
# test_four_devices_equal_one_device_after_five_steps). In float32 these runs ended 2.9e-5
# apart on an AMD EPYC, where the bound had been 1e-5.
# In float64 they differed by ~1e-16 with two 32x32 images per device (with one 16x16 image
# the AMD EPYC's runs agree exactly, but another CPU may sum in another order); the
# checkpoints are read back in float32
# (load_for_inference), which adds at most one float32 rounding, 6e-8 of a value.
# A real difference (per-process BatchNorm statistics, a missing all-reduce) is >= 1e-3.
RTOL = 1e-6
# Seconds of sleep per batch in the jobs a test stops between checkpoints 4 and 8: the
# signal must land while batches 6-8 are read, after checkpoint 4 is finished (orbax's
# commit comes after step 4 has run). At 0.3 s with one 16x16 image per device, a job on
# jax 0.12.1 ran to step 8 first once; at 0.6 s (the old steps' 0.3 s of sleep and ~0.3 s
# of compute) three runs there stopped at step 6.
BATCH_DELAY_S = 0.6
# The loss is summed in float32 (losses.py) in each topology's order: ~1e-7 apart.
METRICS_RTOL = 1e-5

class Job:
    """`num_processes` child processes of one training command."""

    def __init__(self, workdir: Path, num_processes: int, devices: int,
                 extra: tuple[str, ...] = (), delay: float = 0.0):
        env = (multiprocess_env if num_processes > 1 else child_env)(
            devices, FLAXSEG_TEST_BATCH_DELAY=str(delay), FLAXSEG_TEST_FLOAT64="1")
        flags = [*FLAGS, f"--workdir={workdir}", *extra]
        if num_processes > 1:
            flags += [f"--coordinator_address=localhost:{free_port()}",
                      f"--num_processes={num_processes}"]
        self.workdir = workdir
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", TRAIN_CHILD, *flags,
                 *([f"--process_id={i}"] if num_processes > 1 else [])],
                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]

    def wait(self, timeout: float = 300) -> list[tuple[int, str]]:
        results = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
        return results

    def wait_for_checkpoint(self, step: int, timeout: float = 240) -> None:
        """Waits for checkpoint `step`; on a deadline or an early exit, kills the job and
        fails with what every process printed."""
        target = self.workdir / "checkpoints" / str(step)
        deadline = time.monotonic() + timeout
        while not target.is_dir():
            exited = [p.returncode for p in self.procs if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                for proc in self.procs:
                    proc.kill()
                outputs = "\n".join(f"--- process {i} (exit {code}):\n{out[-2000:]}"
                                     for i, (code, out) in enumerate(self.wait()))
                why = "a process exited" if exited else f"none after {timeout:.0f} s"
                pytest.fail(f"no checkpoint {step} ({why}):\n{outputs}")
            time.sleep(0.05)


def _run(workdir: Path, num_processes: int, devices: int,
         extra: tuple[str, ...] = ()) -> list[str]:
    results = Job(workdir, num_processes, devices, extra).wait()
    for code, out in results:
        assert code == 0, out[-3000:]
    return [out for _, out in results]


def _max_rel(workdir: Path, reference: Path) -> float:
    got, want = final_params(workdir, STEPS), final_params(reference, STEPS)
    return (max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
            / max(float(np.abs(b).max()) for b in want))


def _assert_close_runs(workdir: Path, reference: Path) -> None:
    """The same training to float rounding: params, every metrics.jsonl value, summary."""
    assert _max_rel(workdir, reference) < RTOL
    got, want = read_metrics(workdir), read_metrics(reference)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b)
        for key in set(a) - {"split"}:
            assert a[key] == pytest.approx(b[key], rel=METRICS_RTOL, abs=1e-7), (key, a, b)
    summary = json.loads((workdir / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "loss"):
        assert summary[key] == pytest.approx(expected[key], rel=METRICS_RTOL), key


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory) -> Path:
    """The reference: 1 process with 4 devices."""
    workdir = tmp_path_factory.mktemp("one_by_four")
    _run(workdir, 1, 4)
    return workdir


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory) -> tuple[Path, list[str]]:
    """2 processes with 2 devices each: (workdir, the two outputs)."""
    workdir = tmp_path_factory.mktemp("two_by_two")
    return workdir, _run(workdir, 2, 2)


def test_two_processes_train_as_one_with_four_devices(one_by_four, two_by_two):
    workdir, (out0, out1) = two_by_two
    assert "over 4 device(s) in 2 processes (mesh)" in out0
    assert "Done: 8 steps" in out0
    # Only process 0 prints and writes.
    assert "Training" not in out1 and "Evaluation" not in out1 and "step 8/8" not in out1
    assert sorted(os.listdir(workdir)) == ["checkpoints", "metrics.jsonl", "predictions",
                                           "summary.json", "tensorboard"]
    print(f"1x4 vs 2x2: params differ by {_max_rel(workdir, one_by_four):.1e} of the largest")
    _assert_close_runs(workdir, one_by_four)
    ckpt = Checkpointer(workdir, read_only=True)
    assert ckpt.all_steps() == [4, 8]
    ckpt.close()


def test_sigterm_stops_both_at_one_step_and_they_resume_bitwise(two_by_two, tmp_path):
    job = Job(tmp_path, 2, 2, delay=BATCH_DELAY_S)
    job.wait_for_checkpoint(4)
    for proc in job.procs:  # what a TPU maintenance event or a SLURM preemption does
        proc.send_signal(signal.SIGTERM)
    (code0, out0), (code1, _) = job.wait()
    assert code0 == code1 == 0, out0[-3000:]
    stopped = [line for line in out0.splitlines() if line.startswith("Stopped by")]
    assert len(stopped) == 1 and "Run the same command to resume" in stopped[0], out0
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 4 <= step < STEPS
    ckpt = Checkpointer(tmp_path, read_only=True)
    assert ckpt.latest_step() == step
    ckpt.close()
    assert not (tmp_path / "summary.json").exists()
    out0, _ = _run(tmp_path, 2, 2)
    assert f"Resuming from the checkpoint of step {step}" in out0
    assert_bitwise_same_run(tmp_path, two_by_two[0], STEPS)


def test_a_killed_process_stops_the_other_and_the_checkpoint_resumes_on_one_device(
        two_by_two, tmp_path):
    job = Job(tmp_path, 2, 2, delay=BATCH_DELAY_S)
    job.wait_for_checkpoint(4)
    killed = time.monotonic()
    job.procs[1].send_signal(signal.SIGKILL)
    out, _ = job.procs[0].communicate(timeout=HEARTBEAT_S + 60)
    noticed = time.monotonic() - killed
    job.wait()
    assert job.procs[0].returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: process 0 of 2: "), out[-3000:]
    assert ("process 1 stopped responding" in errors[0]
            or "lost contact with another process" in errors[0]), errors[0]
    assert "Run the same commands again to resume" in errors[0]
    assert "Traceback" not in out and "Check failure" not in out, out[-3000:]
    assert noticed < HEARTBEAT_S  # at its next collective, not after the heartbeat timeout
    print(f"the surviving process exited {noticed:.1f} s after the kill")
    # The last finished checkpoint is intact: 2 processes x 2 devices -> 1 process, 1 device.
    ckpt = Checkpointer(tmp_path, read_only=True)
    latest = ckpt.latest_step()
    ckpt.close()
    assert 4 <= latest < STEPS
    out0, = _run(tmp_path, 1, 1, ("--config.parallel=jit",))
    assert f"Resuming from the checkpoint of step {latest}" in out0
    _assert_close_runs(tmp_path, two_by_two[0])


def test_one_process_checkpoint_resumes_in_two_under_pmap(one_by_four, tmp_path):
    """1 process x 4 devices (the mesh) -> 2 processes x 2 devices (jax.pmap)."""
    shutil.copytree(one_by_four, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / str(STEPS))  # as if stopped after step 4
    out0, _ = _run(tmp_path, 2, 2, ("--config.parallel=pmap",))
    assert "Resuming from the checkpoint of step 4" in out0
    _assert_close_runs(tmp_path, one_by_four)


def test_benchmark_scaling_runs_unchanged_in_two_processes(tmp_path):
    out_dir = tmp_path / "bench"
    port = free_port()
    args = ["--models=unet", "--image_sizes=32", "--batch_sizes=1", "--modes=train",
            "--features=4", "--depth=1", "--steps=3", "--warmup=0", "--pipeline_batches=2",
            "--num_devices=2", "--scaling", f"--out_dir={out_dir}",
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.throughput", *args,
                               f"--process_id={i}"], env=multiprocess_env(2), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    # One device per process, then two: the mesh grows on both hosts alike.
    assert [(r["parallel"], r["num_devices"], r["num_processes"]) for r in records] == [
        ("mesh", 2, 2), ("mesh", 4, 2)]
    for r in records:
        assert r["global_batch"] == r["num_devices"] and r["images_per_s"] > 0
        assert r["images_per_s_per_device"] * r["num_devices"] == pytest.approx(
            r["images_per_s"])
    assert records[0]["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert "| cpu | unet | 32 |" in outs[0] and "| cpu | unet | 32 |" not in outs[1]


def _cli_in_two_processes(module: str, *args: str) -> list[tuple[int, str]]:
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", module, *args, f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"], env=multiprocess_env(2), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return [(proc.wait(timeout=300), proc.stdout.read()) for proc in procs]


def test_evaluate_and_predict_split_the_work_over_two_processes(two_by_two, tmp_path):
    from PIL import Image

    from flaxseg import evaluate
    from flaxseg.data import create_source

    workdir, _ = two_by_two
    scores_path = tmp_path / "scores.json"
    (code0, out0), (code1, out1) = _cli_in_two_processes(
        "flaxseg.evaluate", f"--workdir={workdir}", "--mode=pad",
        f"--output_json={scores_path}")
    assert code0 == code1 == 0, out0[-3000:] + out1[-3000:]
    assert "mean IU" in out0 and "mean IU" not in out1
    # Each process took every other image; the summed counts are one process's.
    model, variables, config = load_for_inference(workdir)
    expected = evaluate.evaluate(model, variables, create_source(config.dataset, "val"),
                                 preprocess=evaluate.eval_preprocess(config, "native"),
                                 mode="pad", batch_size=4)
    scores = json.loads(scores_path.read_text())
    assert scores["num_pixels"] == expected["num_pixels"] == 16 * 16 * 16
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert scores[key] == expected[key], key

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(
            inputs / f"{name}.png")
    (code0, out0), (code1, _) = _cli_in_two_processes(
        "flaxseg.predict", f"--workdir={workdir}", f"--input={inputs}",
        f"--output={tmp_path / 'out'}")
    assert code0 == code1 == 0, out0[-3000:]
    assert "Segmented 3 of 3 images" in out0
    assert sorted(os.listdir(tmp_path / "out" / "masks")) == ["a.png", "b.png", "c.png"]
