"""`train_and_evaluate(config, workdir)`: the training program behind `python -m flaxseg.train`.

One run, in order:
  1. check the config (unknown keys, names, batch split) before anything compiles;
  2. build the sources, the model, the optimiser and the state's structure;
  3. resume from the workdir's latest readable checkpoint (state, data iterator position,
     the metric sums of the current log interval), or start fresh (optionally from
     `init_from`); a workdir of another model raises before anything is written;
  4. train: one jitted or pmapped step per batch; every `log_every_steps` a line / progress
     bar and a `metrics.jsonl` record; every `eval_every_steps` the FCN metric table and a
     prediction grid; every `checkpoint_every_steps` an asynchronous checkpoint (the
     best by mIoU is kept beside the latest);
  5. SIGTERM / SIGINT (or a multi-host preemption notice): save at the current step and
     return; running the same command again resumes bitwise-exactly;
  6. at the end: the final evaluation, a checkpoint, `summary.json`.

Exactness: the step's key is `fold_in(rng, step)`, the data iterator's position is saved
with the state, and the host-side metric sums of a partly done log interval are saved
too, so an interrupted and resumed run writes the same params and the same metrics.jsonl
lines as an uninterrupted one (on the same number of devices).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxseg import data, losses, parallel
from flaxseg.configs import build_model, validate_config
from flaxseg.metrics import format_scores_table, segmentation_scores
from flaxseg.train.checkpoint import Checkpointer, load_for_inference
from flaxseg.train.optim import create_learning_rate_schedule, create_optimizer
from flaxseg.train.reporting import SUMMARY_FILE, Reporter
from flaxseg.train.state import abstract_train_state, create_train_state
from flaxseg.train.steps import NonFiniteGuard, make_eval_step, make_train_step

PyTree = Any


class MetricSums:
    """Host-side sums of the train step's metrics over one log interval (float64/int64).

    JSON round-trippable (`to_json` / `from_json`), so a checkpoint taken mid-interval
    resumes the interval exactly.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.loss_sum = 0.0
        self.weight_sum = 0.0
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.steps = 0

    def add(self, metrics: dict[str, Any]) -> None:
        """Adds one step's metrics (NumPy, already unreplicated)."""
        self.loss_sum += float(metrics["loss_sum"])
        self.weight_sum += float(metrics["weight_sum"])
        self.confusion += np.asarray(metrics["confusion"], np.int64)
        self.steps += 1

    @property
    def loss(self) -> float:
        return self.loss_sum / self.weight_sum if self.weight_sum > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "weight_sum": self.weight_sum,
                "confusion": self.confusion.tolist(), "steps": self.steps}

    @classmethod
    def from_json(cls, num_classes: int, saved: dict[str, Any]) -> MetricSums:
        sums = cls(num_classes)
        sums.loss_sum = float(saved["loss_sum"])
        sums.weight_sum = float(saved["weight_sum"])
        sums.confusion = np.asarray(saved["confusion"], np.int64).reshape(
            num_classes, num_classes)
        sums.steps = int(saved["steps"])
        return sums


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after every step.

    A second SIGINT while the flag is set raises KeyboardInterrupt as usual (the impatient
    way out). Handlers are only installed in the main thread and are restored on exit.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _copy_matching(target: PyTree, source: PyTree) -> tuple[PyTree, int, list[str]]:
    """`target` with every leaf that `source` has at the same path and shape copied in."""
    source_leaves = {jax.tree_util.keystr(path): leaf
                     for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]}
    copied, fresh = 0, []

    def pick(path, leaf):
        nonlocal copied
        name = jax.tree_util.keystr(path)
        other = source_leaves.get(name)
        if other is not None and other.shape == leaf.shape:
            copied += 1
            return jnp.asarray(other, leaf.dtype)
        fresh.append(name)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, target), copied, fresh


def _init_from(state: PyTree, workdir: str, say) -> PyTree:
    """Copies the parameters (and BatchNorm statistics) that `workdir`'s latest checkpoint
    shares with `state` by name and shape: FCN-16s from FCN-32s, FCN-8s from FCN-16s."""
    _, variables, other_config = load_for_inference(workdir)
    params, copied, fresh = _copy_matching(state.params, variables["params"])
    if copied == 0:
        raise ValueError(
            f"config.init_from={workdir!r} (model {other_config.model.name!r}) shares no "
            "parameter of the same name and shape with this model; point it at a run of a "
            "related model (e.g. fcn32s for fcn16s).")
    batch_stats = state.batch_stats
    if variables.get("batch_stats") and jax.tree.leaves(state.batch_stats):
        batch_stats, _, _ = _copy_matching(state.batch_stats, variables["batch_stats"])
    say(f"Initialised {copied} parameter arrays from {workdir} (model "
        f"{other_config.model.name!r}); {len(fresh)} new: {', '.join(fresh) or 'none'}.")
    # The optimiser state starts fresh for the new parameters.
    return state.replace(params=params, batch_stats=batch_stats,
                         opt_state=state.tx.init(params))


class _Devices:
    """Where the step runs: one device (jit) or all local devices (pmap)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.count = jax.local_device_count() if mode == "pmap" else 1

    def put_state(self, state: PyTree) -> PyTree:
        return parallel.replicate(state) if self.mode == "pmap" else state

    def get_state(self, state: PyTree) -> PyTree:
        """One copy of the state on the first device (for checkpoints and pictures)."""
        return parallel.unreplicate(state) if self.mode == "pmap" else state

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return parallel.shard_batch(batch, self.count) if self.mode == "pmap" else batch

    def get_metrics(self, metrics: dict[str, Any]) -> dict[str, np.ndarray]:
        """Host copies; psum-ed pmap metrics are identical per replica: take the first."""
        metrics = jax.device_get(metrics)
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics


def _evaluate(eval_step, state: PyTree, batches: Iterator[dict[str, np.ndarray]],
              devices: _Devices, num_classes: int) -> tuple[MetricSums, dict | None]:
    """One pass over `batches`: the summed eval metrics and the first (host) batch."""
    sums = MetricSums(num_classes)
    first = None
    pending = None
    for batch in batches:
        if first is None:
            first = batch
        metrics = eval_step(state, devices.put_batch(batch))
        if pending is not None:  # keep one batch in flight while the host sums
            sums.add(devices.get_metrics(pending))
        pending = metrics
    if pending is not None:
        sums.add(devices.get_metrics(pending))
    return sums, first


# Compiled functions of recent runs in this process, so that calling train_and_evaluate
# again (a resumed run, a notebook, the tests) with the same model does not recompile.
_COMPILED: dict[tuple, tuple] = {}
_MAX_COMPILED = 4


def _compiled_functions(model, config: ml_collections.ConfigDict) -> tuple:
    """(train_step, eval_step, predict) for this model, loss and parallel mode."""
    loss_cfg = config.loss.to_dict()
    ignore_index = int(config.dataset.ignore_index)
    num_classes = int(config.dataset.num_classes)
    key = (model, json.dumps(loss_cfg, sort_keys=True), num_classes, config.parallel,
           ignore_index, config.nan_policy, jax.local_device_count())
    if key not in _COMPILED:
        loss_fn = losses.get_loss_fn(loss_cfg.pop("name"), ignore_index=ignore_index,
                                     **loss_cfg)
        train_step = make_train_step(model, loss_fn, num_classes, parallel=config.parallel,
                                     ignore_index=ignore_index, nan_policy=config.nan_policy)
        eval_step = make_eval_step(model, loss_fn, num_classes, parallel=config.parallel,
                                   ignore_index=ignore_index)
        # Pictures: class ids `[B, H', W']` from images `[B, H, W, C]`, on one device.
        predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=-1))
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = (train_step, eval_step, predict)
    return _COMPILED[key]


def _grid(predict, state: PyTree, batch: dict[str, np.ndarray], count: int,
          ignore_index: int, num_classes: int) -> np.ndarray:
    """image | truth | prediction rows (uint8) for the first `count` examples of `batch`."""
    from flaxseg.visualize import default_palette, prediction_grid

    images = np.asarray(batch["image"][:count])
    labels = np.asarray(batch["label"][:count])
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    preds = np.asarray(predict(variables, images))
    return prediction_grid(images, labels, preds, default_palette(num_classes),
                           ignore_index=ignore_index)


def _scores_record(scores: dict[str, Any], loss: float) -> dict[str, float]:
    return {"loss": loss, "pixel_accuracy": scores["pixel_accuracy"],
            "mean_iou": scores["mean_iou"]}


def _is_due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates a model as `config` says, writing everything to `workdir`.

    Resumes from `workdir`'s latest checkpoint if there is one. Returns the summary
    (also written to `<workdir>/summary.json` by process 0): the final evaluation's
    `mean_iou`, `pixel_accuracy`, `mean_accuracy`, `fw_iou`, `per_class_iou`, plus
    `steps`, `wall_time_s`, `images_per_sec` and `stopped_by` (None, or the signal that
    stopped the run early; the summary then describes the last evaluation, if any).

    Raises ValueError for a bad config (before compiling) and for a workdir that holds
    checkpoints of a different model (before writing anything).
    """
    wall_start = time.perf_counter()
    workdir = str(workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # a private copy
    devices = _Devices(config.parallel)
    global_devices = devices.count * jax.process_count()
    validate_config(config, num_devices=global_devices)
    is_chief = jax.process_index() == 0

    def say(text: str) -> None:
        if is_chief:
            print(text, flush=True)

    # -- data, model, optimiser ---------------------------------------------------------
    train_source = data.create_source(config.dataset, "train")
    eval_source = data.create_source(config.dataset, config.eval_split)
    info = train_source.info
    num_classes = int(config.dataset.num_classes)
    if info.num_classes != num_classes:
        raise ValueError(
            f"config.dataset.num_classes={num_classes} but the dataset has "
            f"{info.num_classes} classes; set config.dataset.num_classes={info.num_classes}.")
    ignore_index = int(config.dataset.ignore_index)
    height, width = (int(s) for s in config.dataset.image_size)
    input_shape = (1, height, width, int(info.num_channels))
    num_train_steps = int(config.num_train_steps)
    process_batch = int(config.batch_size) // jax.process_count()

    # Built for one device: make_train_step sets BatchNorm's axis for pmap itself, so the
    # model (and its compiled initialiser) is the same whatever the parallel mode.
    model = build_model(config, parallel="jit")
    tx = create_optimizer(config.optimizer, num_train_steps)
    schedule = create_learning_rate_schedule(config.optimizer, num_train_steps)

    # -- resume or start ----------------------------------------------------------------
    abstract = abstract_train_state(model, tx, input_shape)
    ckpt = Checkpointer(workdir, keep=int(config.keep_checkpoints))
    restored = ckpt.restore(abstract, config=config,
                            on_corrupt=lambda text: say(f"WARNING: {text}"))
    sums = MetricSums(num_classes)
    if restored is not None:
        state, start_step = restored.state, restored.step
        if restored.loop.get("train_metric_sums"):
            sums = MetricSums.from_json(num_classes, restored.loop["train_metric_sums"])
        say(f"Resuming from the checkpoint of step {start_step} in {ckpt.directory}.")
    else:
        start_step = 0
        state = create_train_state(model, tx, jax.random.key(int(config.seed)), input_shape)
        if config.init_from:
            state = _init_from(state, config.init_from, say)

    if start_step >= num_train_steps:
        ckpt.close()
        summary_path = Path(workdir) / SUMMARY_FILE
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            say(f"{workdir} is already trained to step {start_step} "
                f"(num_train_steps={num_train_steps}); nothing to do. Final mIoU "
                f"{summary.get('mean_iou')}; raise --config.num_train_steps to train on.")
            return summary

    reporter = Reporter(workdir, num_train_steps=num_train_steps, start_step=start_step,
                        is_chief=is_chief)
    train_iter = data.pipeline.create_train_iterator(
        train_source, batch_size=process_batch, seed=int(config.seed),
        augment=config.augment, image_size=(height, width))
    if restored is not None:
        train_iter.set_state(restored.loop["data_iterator"])
    train_step, eval_step, predict = _compiled_functions(model, config)
    guard = NonFiniteGuard(config.nan_policy)
    class_names = list(info.class_names)

    state = devices.put_state(state)
    if start_step == 0:
        num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
        reporter.message(
            f"Training {config.model.name} ({num_params:,} parameters) on "
            f"{config.dataset.name} {height}x{width}, batch {config.batch_size} over "
            f"{global_devices} device(s) ({config.parallel}), {num_train_steps} steps; "
            f"workdir {Path(workdir).absolute()}")

    last_eval: dict[str, Any] | None = None

    def evaluate(step: int, log: bool = True) -> dict[str, Any]:
        with data.pipeline.create_eval_iterator(
                eval_source, batch_size=process_batch, image_size=(height, width),
                augment=config.augment) as batches:
            eval_sums, first = _evaluate(eval_step, state, batches, devices, num_classes)
        loss = eval_sums.loss
        scores = segmentation_scores(eval_sums.confusion, class_names)
        reporter.evaluation(step, config.eval_split, scores, format_scores_table(scores), loss,
                            log=log)
        if log and first is not None and is_chief:
            grid = _grid(predict, devices.get_state(state), first,
                         int(config.num_grid_images), ignore_index, num_classes)
            reporter.prediction_grid(step, grid)
        return {"step": step, "loss": loss, **scores}

    def save(step: int, eval_result: dict[str, Any] | None) -> None:
        if ckpt.latest_step() == step:
            return
        loop_state = {"data_iterator": train_iter.get_state(),
                      "train_metric_sums": sums.to_json(),
                      "input_shape": list(input_shape)}
        metrics = None
        if eval_result is not None and eval_result["step"] == step:
            metrics = {"mean_iou": eval_result["mean_iou"]}
        ckpt.save(step, devices.get_state(state), loop=loop_state, config=config,
                  metrics=metrics)

    stopped_by = None
    final_step = start_step
    train_time, train_images = 0.0, 0
    interval_start, interval_step = None, start_step
    pending: tuple[int, Any] | None = None
    check_preemption = jax.process_count() > 1

    def drain(upto: tuple[int, Any] | None) -> None:
        """Applies the NaN policy to and sums a finished step's metrics (host side)."""
        if upto is None:
            return
        step_done, metrics = upto
        metrics = devices.get_metrics(metrics)
        if guard(step_done, metrics):
            sums.add(metrics)

    try:
        with StopRequest() as stop:
            for step in range(start_step + 1, num_train_steps + 1):
                batch = next(train_iter)
                state, metrics = train_step(state, devices.put_batch(batch))
                final_step = step
                # Keep one step in flight: read the previous step's metrics now.
                drain(pending)
                pending = (step, metrics)
                if interval_start is None and step > start_step + 1:
                    # The first step (compilation) is done: time from here on.
                    interval_start, interval_step = time.perf_counter(), step - 1
                    reporter.start_timer(step - 1)
                last = step == num_train_steps
                log_due = _is_due(step, int(config.log_every_steps), num_train_steps)
                eval_due = _is_due(step, int(config.eval_every_steps), num_train_steps)
                ckpt_due = _is_due(step, int(config.checkpoint_every_steps), num_train_steps)
                stop_now = stop.signal_name is not None or (
                    check_preemption and ckpt.reached_preemption(step))
                if log_due or eval_due or ckpt_due or stop_now or last:
                    drain(pending)
                    pending = None
                if log_due:
                    now = time.perf_counter()
                    images_per_sec = None
                    if interval_start is not None and step > interval_step:
                        elapsed = now - interval_start
                        images = (step - interval_step) * int(config.batch_size)
                        train_time += elapsed
                        train_images += images
                        images_per_sec = images / elapsed if elapsed > 0 else None
                        interval_start, interval_step = now, step
                    scores = segmentation_scores(sums.confusion)
                    record = {**_scores_record(scores, sums.loss),
                              "learning_rate": float(schedule(step - 1))}
                    if guard.skipped:
                        record["skipped_steps"] = guard.skipped
                    reporter.write_metrics(
                        step, "train", record,
                        extra_scalars={"images_per_sec": images_per_sec} if images_per_sec
                        else None)
                    reporter.progress(step, loss=sums.loss, mean_iou=scores["mean_iou"],
                                      images_per_sec=images_per_sec)
                    sums.reset()
                if eval_due:
                    last_eval = evaluate(step)
                if ckpt_due or stop_now:
                    save(step, last_eval)
                if (eval_due or ckpt_due) and interval_start is not None:
                    # Throughput counts training only: restart the clock after these.
                    interval_start, interval_step = time.perf_counter(), step
                if stop_now:
                    stopped_by = stop.signal_name or "preemption"
                    ckpt.wait()
                    reporter.message(
                        f"Stopped by {stopped_by} at step {step}; saved a checkpoint in "
                        f"{ckpt.directory}. Run the same command to resume.")
                    break
        if last_eval is None and stopped_by is None:
            # Resumed at the last step (a run killed before summary.json): evaluate it
            # again for the summary; its metrics.jsonl record and grid are already written.
            last_eval = evaluate(final_step, log=False)
        ckpt.wait()
        wall_time = time.perf_counter() - wall_start
        summary: dict[str, Any] = {
            "steps": final_step,
            "num_train_steps": num_train_steps,
            "wall_time_s": wall_time,
            "train_time_s": train_time,
            "images_per_sec": train_images / train_time if train_time > 0 else None,
            "stopped_by": stopped_by,
            "workdir": str(Path(workdir).absolute()),
        }
        if last_eval is not None:
            summary.update(
                eval_split=config.eval_split,
                eval_step=last_eval["step"],
                loss=last_eval["loss"],
                **{k: last_eval[k] for k in ("mean_iou", "pixel_accuracy", "mean_accuracy",
                                             "fw_iou")},
                per_class_iou={name: v["iou"] for name, v in last_eval["per_class"].items()},
            )
        if stopped_by is None:
            reporter.summary(summary)
            if last_eval is not None:
                reporter.message(
                    f"Done: {final_step} steps in {wall_time:.1f} s; {config.eval_split} mIoU "
                    f"{summary['mean_iou']:.4f}, pixel accuracy "
                    f"{summary['pixel_accuracy']:.4f}. Wrote {Path(workdir) / SUMMARY_FILE}.")
        return summary
    finally:
        train_iter.close()
        ckpt.close()
        reporter.close()
