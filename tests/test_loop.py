"""train_and_evaluate end to end on the tiny `test` config (4 CPU devices, the mesh).

One run is trained once per module; the other tests resume from copies of its workdir,
so the whole file compiles the model only a few times.
"""

import io
import json
import math
import os
import shutil
import signal
import time
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import file_mtimes

from flaxseg import configs
from flaxseg.metrics import MetricSums
from flaxseg.train import create_optimizer, create_train_state, loop, parallel, reporting
from flaxseg.train.checkpoint import Checkpointer, init_from, load_for_inference
from flaxseg.train.config import build_model
from flaxseg.train.distributed import StopRequest
from flaxseg.train.reporting import (
    Rates,
    Reporter,
    Throughput,
    format_duration,
    json_safe,
    read_metrics,
)

STEPS = 6


def _config(**overrides):
    config = configs.get_config("test")
    config.num_train_steps = STEPS
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run on the 4-device mesh: (workdir, returned summary)."""
    workdir = tmp_path_factory.mktemp("run")
    summary = loop.train_and_evaluate(_config(), str(workdir))
    return workdir, summary


def test_a_run_writes_summary_metrics_tensorboard_grids_and_checkpoints(trained):
    workdir, summary = trained
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == json_safe(summary)
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["per_class_iou"]) == {"background", "disc", "rectangle", "triangle"}
    assert summary["steps"] == STEPS and summary["stopped_by"] is None
    assert summary["images_per_sec"] > 0 and summary["wall_time_s"] > 0
    assert 0 <= summary["data_wait_share"] <= 1
    assert summary["step_images_per_sec"] >= summary["images_per_sec"]

    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # log_every_steps = 1
    assert all(math.isfinite(r["loss"]) and r["learning_rate"] > 0 for r in train)
    assert [r["step"] for r in evals] == [3, 6]  # eval_every_steps = 3
    assert evals[-1]["mean_iou"] == pytest.approx(summary["mean_iou"])
    assert any(f.startswith("events.out.tfevents")
               for f in os.listdir(workdir / "tensorboard"))
    grids = sorted(os.listdir(workdir / "predictions"))
    assert grids == ["step_0000003.png", "step_0000006.png"]
    ckpt = Checkpointer(workdir, read_only=True)
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()


def test_load_for_inference_rebuilds_the_trained_model(trained):
    workdir, _ = trained
    model, variables, config = load_for_inference(workdir)
    assert config.model.features == 4 and model.num_classes == 4
    assert set(variables) == {"params"}  # the test config has no BatchNorm
    images = np.zeros((1, 32, 32, 3), np.float32)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (1, 32, 32, 4)


class _Head(nn.Module):
    """A model that shares no parameter name with the U-Net."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Conv(4, (1, 1), name="head")(x)


def test_init_from_copies_the_shared_parameters(trained):
    workdir, _ = trained
    config = _config(**{"dataset.num_classes": 2})  # a new head, the same body
    model = build_model(config)
    tx = create_optimizer(config.optimizer, STEPS)
    fresh = create_train_state(model, tx, jax.random.key(1), (1, 32, 32, 3))
    state, message = init_from(fresh, str(workdir))
    _, trained_vars, _ = load_for_inference(workdir)
    flat_new = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
    flat_old = dict(jax.tree_util.tree_flatten_with_path(trained_vars["params"])[0])
    copied = [k for k in flat_new if np.array_equal(flat_new[k], flat_old[k])]
    new = [jax.tree_util.keystr(k) for k in flat_new if k not in copied]
    assert len(copied) == len(flat_new) - 2 and all("classifier" in name for name in new), new
    assert f"Initialised {len(copied)} parameter arrays" in message
    unrelated = create_train_state(_Head(), tx, jax.random.key(1), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="shares no parameter of the same name and shape"):
        init_from(unrelated, str(workdir))


def test_second_run_in_the_same_workdir_finishes_at_once(trained, capsys):
    workdir, summary = trained
    before = file_mtimes(workdir)
    again = loop.train_and_evaluate(_config(), str(workdir))
    assert again == json.loads((workdir / "summary.json").read_text())
    assert "already trained to step 6" in capsys.readouterr().out
    assert file_mtimes(workdir) == before


def test_workdir_of_another_model_is_an_error_and_nothing_is_written(trained):
    workdir, _ = trained
    before = file_mtimes(workdir)
    with pytest.raises(ValueError, match=r"config.model.features was 4 when step 6 was saved; "
                                         r"this run asks for 8"):
        loop.train_and_evaluate(_config(**{"model.features": 8}), str(workdir))
    with pytest.raises(ValueError, match=r"config.optimizer.name was 'adam' .*asks for 'sgd'"):
        loop.train_and_evaluate(_config(**{"optimizer.name": "sgd"}), str(workdir))
    assert file_mtimes(workdir) == before


def test_resume_onto_one_device_and_back(trained, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    # The mesh on 4 devices (steps 1-6) -> jit on 1 device (7-8) -> pmap on 4 (9-10).
    jit_summary = loop.train_and_evaluate(
        _config(parallel="jit", num_train_steps=8), str(workdir))
    assert "Resuming from the checkpoint of step 6" in capsys.readouterr().out
    assert jit_summary["steps"] == 8
    pmap_summary = loop.train_and_evaluate(_config(parallel="pmap", num_train_steps=10),
                                           str(workdir))
    assert "Resuming from the checkpoint of step 8" in capsys.readouterr().out
    assert pmap_summary["steps"] == 10
    train_steps = [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]
    assert train_steps == list(range(1, 11))


def test_bad_config_fails_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="cannot be split evenly over 4 devices"):
        loop.train_and_evaluate(_config(batch_size=6), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_stop_request_turns_signals_into_a_flag():
    with StopRequest() as stop:
        assert stop.requested(1) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(2) == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is the impatient way out
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_reporter_progress_bar_on_a_terminal_and_lines_elsewhere(tmp_path):
    for interactive in (True, False):
        stream = io.StringIO()
        reporter = Reporter(tmp_path / str(interactive), num_train_steps=10, is_chief=True,
                            stream=stream, interactive=interactive)
        reporter.progress(5, loss=0.5, mean_iou=0.25, images_per_sec=12.0)
        reporter.message("table")
        reporter.close()
        text = stream.getvalue()
        assert "step  5/10" in text and "loss 0.5000" in text and "12.0 img/s" in text
        assert ("\r" in text and "#" in text) == interactive


def test_throughput_separates_the_step_from_waiting_for_data(monkeypatch):
    # A clock read at each mark and interval: t = 0 (mark), 10 (interval, mark), 20 (...).
    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0])
    monkeypatch.setattr(reporting, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    throughput = Throughput(batch_size=4)
    throughput.mark(1)  # t = 0
    throughput.waited(2.5)
    assert throughput.interval(6) == Rates(step=20 / 7.5, end_to_end=2.0, data_wait=0.25)
    assert throughput.interval(11) == Rates(step=2.0, end_to_end=2.0, data_wait=0.0)
    assert throughput.data_wait_share == pytest.approx(2.5 / 20)
    assert throughput.step_images_per_sec == pytest.approx(40 / 17.5)


@pytest.mark.parametrize("slow", ["host", "devices"])
def test_data_wait_is_the_host_pipelines_time_only(tmp_path, monkeypatch, slow):
    """A slow host read is data wait; a slow hand-over to the devices is not. On XLA:CPU
    placing the batch and dispatching its augmentation wait for the step before (the
    float64 runs of test_multiprocess read "data wait 50%" and warned of the input pipeline
    while reading a batch took 0.2 ms), so that time counts as the step's."""
    from flaxseg.data import pipeline

    def delayed(fn):
        def slowly(*args, **kwargs):
            out = fn(*args, **kwargs)
            time.sleep(0.2)
            return out
        return slowly

    if slow == "host":
        monkeypatch.setattr(pipeline.TrainIterator, "__next__",
                            delayed(pipeline.TrainIterator.__next__))
    else:
        monkeypatch.setattr(parallel.DataParallel, "put_examples",
                            delayed(parallel.DataParallel.put_examples))
    summary = loop.train_and_evaluate(_config(), str(tmp_path / "run"))
    # 4 timed steps of ~10 ms each, beside 0.8 s of sleep.
    if slow == "host":
        assert summary["data_wait_share"] > 0.7
    else:
        assert summary["data_wait_share"] < 0.3


def test_reporter_shows_the_data_wait_and_warns_once(tmp_path):
    stream = io.StringIO()
    reporter = Reporter(tmp_path, num_train_steps=10, is_chief=True, stream=stream,
                        interactive=False)
    sums = MetricSums(2)
    for step, wait in ((2, 0.1), (4, 0.5), (6, 0.6)):
        reporter.train_log(step, sums, Rates(step=30.0, end_to_end=20.0, data_wait=wait), 0.1)
    reporter.close()
    text = stream.getvalue()
    assert "30.0 img/s (20.0 end to end)  data wait 10%" in text
    assert text.count("WARNING") == 1 and "step 4" in text.split("WARNING")[1]
    for knob in ("config.data_workers", "config.dataset.cache", "prepare"):
        assert knob in text


def test_reporter_drops_lines_after_the_resumed_step(tmp_path):
    reporter = Reporter(tmp_path, num_train_steps=10, is_chief=True, stream=io.StringIO())
    for step in (1, 2, 3):
        reporter.write_metrics(step, "train", {"loss": float(step)})
    reporter.close()
    Reporter(tmp_path, num_train_steps=10, start_step=2, is_chief=True,
             stream=io.StringIO()).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_non_chief_process_writes_nothing(tmp_path):
    reporter = Reporter(tmp_path / "w", num_train_steps=3, is_chief=False, stream=io.StringIO())
    reporter.write_metrics(1, "train", {"loss": 1.0})
    assert reporter.summary({"mean_iou": 0.5}) is None
    reporter.close()
    assert not (tmp_path / "w").exists()


def test_json_safe_and_durations():
    assert json_safe({"a": float("nan"), "b": [np.float32(1.5), float("inf")], 3: 1}) == {
        "a": None, "b": [1.5, None], "3": 1}
    assert format_duration(3725.2) == "1:02:05" and format_duration(59.6) == "1:00"


def test_num_devices_follow_the_parallel_mode():
    assert parallel.num_devices("mesh") == parallel.num_devices("pmap") == 4
    assert parallel.num_devices("jit") == 1
    with pytest.raises(ValueError, match="parallel must be one of"):
        parallel.num_devices("pjit")
