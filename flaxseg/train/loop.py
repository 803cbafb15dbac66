"""`train_and_evaluate(config, workdir)`: the training program behind `python -m flaxseg.train`.

One run, in order:
  1. resolve what the data decides (a folder's layout and classes), then check the config
     (unknown keys, names, batch split) before anything compiles;
  2. build the sources, the model, the optimiser and the steps for `config.parallel`
     (`flaxseg.train.parallel`: a device mesh over every process by default);
  3. resume from the workdir's latest readable checkpoint (state, data position, the metric
     sums of the current log interval), or start fresh (optionally from `init_from`); a
     workdir of another model raises before anything is written;
  4. train: one step per global batch; every `log_every_steps` a line / progress bar and a
     `metrics.jsonl` record; every `eval_every_steps` the FCN metric table and a prediction
     grid; every `checkpoint_every_steps` an asynchronous checkpoint (the best by mIoU is
     kept beside the latest);
  5. SIGTERM / SIGINT (or a preemption notice to a multi-process job): every process saves at
     the same step and returns; running the same command(s) again resumes exactly;
  6. at the end: the final evaluation, a checkpoint, `summary.json`.

Every process runs this function; each loads its own rows of every global batch, all take
part in the steps, evaluations and checkpoints, and only process 0 writes logs, pictures
and the summary. Exactness: the step's key is `fold_in(rng, step)`, the batches do not
depend on the topology, and the data position and the metric sums of a partly done log
interval are saved, so an interrupted and resumed run writes the same params and the same
metrics.jsonl lines as an uninterrupted one (bitwise on the same devices).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxseg import data
from flaxseg.data import augment
from flaxseg.metrics import MetricSums, sum_batches
from flaxseg.models import logits_of
from flaxseg.optim import create_learning_rate_schedule, create_optimizer
from flaxseg.train import checkpoint, memory
from flaxseg.train.config import (
    backbone_weights,
    build_model,
    loss_from_config,
    resolve_class_weights,
    resolve_normalization,
    validate_config,
)
from flaxseg.train.distributed import StopRequest, say
from flaxseg.train.parallel import DataParallel
from flaxseg.train.reporting import SUMMARY_FILE, Reporter, Throughput
from flaxseg.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    init_backbone,
)
from flaxseg.train.steps import (
    NonFiniteGuard,
    TrainMetrics,
    make_eval_step,
    make_train_step,
    variables_of,
)
from flaxseg.train.workdir import lock_workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       trust_saved_code: bool = False) -> dict[str, Any]:
    """Trains and evaluates a model as `config` says, writing everything to `workdir`.

    Resumes from `workdir`'s latest checkpoint if there is one. Returns the summary
    (also written to `<workdir>/summary.json` by process 0): the final evaluation's
    `mean_iou`, `pixel_accuracy`, `mean_accuracy`, `fw_iou`, `per_class_iou`, plus
    `steps`, `wall_time_s`, `images_per_sec` (end to end), `step_images_per_sec` (the
    step's own: the time spent waiting for data left out), `data_wait_share` (of the
    training wall time, the share the loop waited for data) and `stopped_by` (None, or
    what stopped the run early; the summary then describes the last evaluation, if any).

    Raises ValueError for a bad config (before compiling) and for a workdir that holds
    checkpoints of a different model (before writing anything). The model is always the
    one `config` names; `config.init_from`'s saved `package.module:Attr` model is imported
    only if it is the same or `trust_saved_code` is set (`load_for_inference`).
    """
    wall_start = time.perf_counter()
    workdir = str(workdir)
    # A private copy, untyped (batch_size='auto' becomes the batch it chooses), with the
    # normalisation the backbone weights expect made concrete.
    config = resolve_normalization(ml_collections.ConfigDict(config.to_dict(), type_safe=False))
    par = DataParallel(config.parallel, spatial_partitions=config.spatial_partitions)
    # What the data decides (a folder's layout and classes) is filled in first, so the
    # config is checked, and saved with every checkpoint, as it trains.
    config.dataset = data.resolve_dataset_config(config.dataset)
    validate_config(config, num_devices=par.batch_splits)
    train_source = data.create_source(config.dataset, "train")
    eval_source = data.create_source(config.dataset, config.eval_split)
    input_shape = _input_shape(config, train_source.info)
    num_steps = int(config.num_train_steps)
    model = build_model(config)
    tx = create_optimizer(config.optimizer, num_steps)
    schedule = jax.jit(create_learning_rate_schedule(config.optimizer, num_steps))
    if config.batch_size == "auto":
        config.batch_size = _auto_batch_size(config, model, tx, par, input_shape)

    with contextlib.ExitStack() as stack:  # everything below is released on any exit
        stack.enter_context(lock_workdir(workdir, warn=say))
        config.loss = resolve_class_weights(config, train_source, workdir)  # may write a cache
        ckpt = stack.enter_context(
            contextlib.closing(checkpoint.Checkpointer(workdir, keep=int(config.keep_checkpoints))))
        state, start_step, saved_loop = _restore_or_create(ckpt, par, model, tx, config,
                                                           input_shape, trust_saved_code)
        if start_step >= num_steps and (Path(workdir) / SUMMARY_FILE).exists():
            return _finished_summary(workdir, start_step, num_steps)

        reporter = stack.enter_context(contextlib.closing(Reporter(
            workdir, num_train_steps=num_steps, start_step=start_step,
            is_chief=jax.process_index() == 0)))
        reporter.message(_start_line(config, state, par, start_step, workdir, ckpt))
        train_iter = stack.enter_context(data.pipeline.create_train_iterator(
            train_source, batch_size=int(config.batch_size), seed=int(config.seed),
            augment=config.augment, image_size=input_shape[1:3],
            process_rows=par.process_rows(int(config.batch_size)),
            worker_count=data.pipeline.worker_count(config.get("data_workers", 0))))
        if saved_loop:
            train_iter.set_state(saved_loop["data_iterator"])
        loss_fn, num_classes = loss_from_config(config), train_source.info.num_classes
        ignore_index = int(config.dataset.ignore_index)
        train_step = make_train_step(model, loss_fn, num_classes, parallel=par,
                                     ignore_index=ignore_index, nan_policy=config.nan_policy)
        eval_step = make_eval_step(model, loss_fn, num_classes, parallel=par,
                                   ignore_index=ignore_index)
        # The host sends uint8; augmentation and normalisation run here, on the mesh.
        train_augment = par.compile_batch_fn(*augment.train_stages(
            config.augment, seed=int(config.seed), image_size=input_shape[1:3],
            ignore_index=ignore_index))
        eval_prepare = par.compile_batch_fn(augment.eval_fn(config.augment))
        grid_prepare = jax.jit(augment.eval_fn(config.augment))
        train_metrics = TrainMetrics(
            num_classes, NonFiniteGuard(config.nan_policy, on_skip=reporter.skipped_step,
                                        max_consecutive_skips=_skip_limit(num_steps),
                                        max_skipped_fraction=MAX_SKIPPED_FRACTION),
            _saved_sums(saved_loop, num_classes))
        throughput = Throughput(int(config.batch_size))
        last_eval, stopped_by, step = None, None, start_step
        stop = stack.enter_context(StopRequest())

        def next_batch() -> tuple[Any, dict[str, Any]]:
            """The next batch on the devices (augmenting, asynchronously) and the data
            position after it. Data wait is the time the host pipeline takes to hand over
            the batch (read, decode): placing it and dispatching the augmentation can wait
            for the step before on a busy device (XLA:CPU runs them in turn), which is the
            step's time, not the input pipeline's."""
            start = time.perf_counter()
            host_batch = next(train_iter)
            throughput.waited(time.perf_counter() - start)
            position = train_iter.get_state()
            return train_augment(par.put_examples(host_batch)), position

        def loop_state() -> dict[str, Any]:
            return {"data_iterator": data_position, "input_shape": list(input_shape),
                    "train_metric_sums": train_metrics.sums().to_json()}

        upcoming = next_batch() if start_step < num_steps else None
        for step in range(start_step + 1, num_steps + 1):
            batch, data_position = upcoming
            state, metrics = train_step(state, batch)
            train_metrics.add(step, metrics)
            if step == num_steps:  # before the final checkpoint, which would read as done
                train_metrics.sums()  # reads the last step's flag
                train_metrics.guard.check_run(step, num_steps - start_step)
            if step == start_step + 2:  # the first step (compiling) is done
                throughput.mark(step - 1)
                reporter.start_timer(step - 1)
            stopped_by = stop.requested(step)
            eval_due = _due(step, config.eval_every_steps, num_steps)
            save_due = _due(step, config.checkpoint_every_steps, num_steps) or stopped_by
            if _due(step, config.log_every_steps, num_steps):
                reporter.train_log(step, train_metrics.take(), throughput.interval(step),
                                   float(schedule(step - 1)), train_metrics.guard.skipped)
            if eval_due:
                last_eval = {"step": step, **evaluate(eval_step, variables_of(state), par,
                                                      eval_source, config, eval_prepare)}
                reporter.evaluation(step, config.eval_split, last_eval)
                reporter.prediction_grid(step, _grid(model, state, par, eval_source, config,
                                                     grid_prepare))
            if save_due:
                best = last_eval if last_eval and last_eval["step"] == step else None
                ckpt.save(step, state, loop=loop_state(), config=config,
                          metrics=best and {"mean_iou": best["mean_iou"]})
            if eval_due or save_due:  # throughput counts training only
                throughput.mark(step)
            if stopped_by:
                ckpt.wait()
                reporter.message(f"Stopped by {stopped_by} at step {step}; saved a checkpoint "
                                 f"in {ckpt.directory}. Run the same command to resume.")
                break
            # The step runs (dispatched asynchronously) while the host prepares the next batch.
            upcoming = next_batch() if step < num_steps else None
        if last_eval is None and not stopped_by:
            # Resumed at the last step (a run killed before summary.json): evaluate it again
            # for the summary; its metrics.jsonl record and grid are already written.
            last_eval = {"step": step, **evaluate(eval_step, variables_of(state), par,
                                                  eval_source, config, eval_prepare)}
        ckpt.wait()
        summary = _summary(config, workdir, step, last_eval, stopped_by, throughput,
                           train_metrics.guard.skipped, time.perf_counter() - wall_start)
        if not stopped_by:
            reporter.summary(summary)
        return summary


def _auto_batch_size(config: ml_collections.ConfigDict, model: Any, tx: Any,
                     par: DataParallel, input_shape: tuple[int, ...]) -> int:
    """The largest global batch whose compiled train step fits the memory budget."""
    budget, where = memory.memory_budget(float(config.memory_budget_gb))
    step = make_train_step(model, loss_from_config(config), int(config.dataset.num_classes),
                           parallel=par, ignore_index=int(config.dataset.ignore_index),
                           nan_policy=config.nan_policy)
    state = par.abstract(abstract_train_state(model, tx, input_shape))
    batch, why = memory.fit_batch_size(
        lambda b: memory.train_step_bytes(step, state, par, b, input_shape), budget,
        step=par.batch_splits)
    say(f"{why}, the budget from {where}.")
    return batch


# Under nan_policy='skip', a run whose steps were more than this fraction skipped fails
# (exit 1, no final checkpoint, no summary.json): skipping is for rare bad batches.
MAX_SKIPPED_FRACTION = 0.1


def _skip_limit(num_steps: int) -> int:
    """Consecutive skipped steps that end a run: 10% of it, at least 10."""
    return max(10, num_steps // 10)


def _due(step: int, every: int, last: int) -> bool:
    return step % int(every) == 0 or step == last


def _input_shape(config: ml_collections.ConfigDict, info: data.SourceInfo
                 ) -> tuple[int, int, int, int]:
    """`(1, H, W, C)`, after checking the dataset's class count against the config's."""
    if info.num_classes != int(config.dataset.num_classes):
        raise ValueError(
            f"config.dataset.num_classes={config.dataset.num_classes} but the dataset has "
            f"{info.num_classes} classes; set config.dataset.num_classes={info.num_classes}.")
    height, width = (int(s) for s in config.dataset.image_size)
    return (1, height, width, int(info.num_channels))


def _restore_or_create(ckpt: checkpoint.Checkpointer, par: DataParallel, model: Any, tx: Any,
                       config: ml_collections.ConfigDict, input_shape: tuple[int, ...],
                       trust_saved_code: bool = False) -> tuple[TrainState, int, dict | None]:
    """(replicated state, its step, the saved loop JSON or None for a fresh start)."""
    abstract = abstract_train_state(model, tx, input_shape)
    restored = ckpt.restore(par.abstract(abstract), config=config,
                            on_corrupt=lambda text: say(f"WARNING: {text}"))
    if restored is not None:
        return restored.state, restored.step, restored.loop
    state = create_train_state(model, tx, jax.random.key(int(config.seed)), input_shape)
    if backbone_weights(config):  # from a file every process reads: before replicating
        state, message = init_backbone(state, model, backbone_weights(config))
        say(message)
    state = par.put_state(state)
    if config.init_from:
        state, message = checkpoint.init_from(state, config.init_from,
                                               model_name=config.model.name,
                                               trust_saved_code=trust_saved_code)
        say(message)
    return state, 0, None


def _saved_sums(saved_loop: dict | None, num_classes: int) -> MetricSums | None:
    if saved_loop and saved_loop.get("train_metric_sums"):
        return MetricSums.from_json(num_classes, saved_loop["train_metric_sums"])
    return None


def _start_line(config: ml_collections.ConfigDict, state: TrainState, par: DataParallel,
                start_step: int, workdir: str, ckpt: checkpoint.Checkpointer) -> str:
    dataset = config.dataset.name
    if config.dataset.get("layout"):
        dataset += f" (layout {config.dataset.layout} in {config.dataset.path})"
    if start_step:
        return (f"Resuming from the checkpoint of step {start_step} in {ckpt.directory}; "
                f"dataset {dataset}.")
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    height, width = config.dataset.image_size
    processes = jax.process_count()
    where = f"{par.num_devices} device(s)" + (f" in {processes} processes" if processes > 1
                                              else "")
    if par.spatial_partitions > 1:
        where += f", each image split over {par.spatial_partitions}"
    return (f"Training {config.model.name} ({num_params:,} parameters) on "
            f"{dataset} {height}x{width}, batch {config.batch_size} over {where} "
            f"({config.parallel}), {config.num_train_steps} steps; workdir "
            f"{Path(workdir).absolute()}")


def _finished_summary(workdir: str, step: int, num_steps: int) -> dict[str, Any]:
    summary = json.loads((Path(workdir) / SUMMARY_FILE).read_text())
    say(f"{workdir} is already trained to step {step} (num_train_steps={num_steps}); "
         f"nothing to do. Final mIoU {summary.get('mean_iou')}; raise "
         "--config.num_train_steps to train on.")
    return summary


def evaluate(eval_step, variables: dict[str, Any], par: DataParallel, source: Any,
             config: ml_collections.ConfigDict, prepare=None) -> dict[str, Any]:
    """The FCN scores (`segmentation_scores`) and mean `loss` of one pass over `source`.

    The training loop's evaluation, and `python -m flaxseg.evaluate`'s default: the
    config's eval transform, global batches of `config.batch_size` split over `par`'s
    devices and processes, padding ignored, every example counted once.
    `eval_step(variables, batch)` is `make_eval_step(..., parallel=par)`; `prepare` the
    on-device normalisation `par.compile_batch_fn(augment.eval_fn(config.augment))` (made
    here if None; pass one to compile it once).
    """
    if prepare is None:
        prepare = par.compile_batch_fn(augment.eval_fn(config.augment))
    batch_size = int(config.batch_size)
    with data.pipeline.create_eval_iterator(
            source, batch_size=batch_size, image_size=tuple(config.dataset.image_size),
            augment=config.augment, process_rows=par.process_rows(batch_size)) as batches:
        sums = sum_batches((eval_step(variables, prepare(par.put_examples(b)))
                            for b in batches),
                           source.info.num_classes)
    return {"loss": sums.loss, **sums.scores(source.info.class_names)}


@functools.partial(jax.jit, static_argnums=0)
def _predict_classes(model: Any, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    """Class ids `[B, H', W']` from images `[B, H, W, C]` (compiled once per model)."""
    return jnp.argmax(logits_of(model.apply(variables, images, train=False)), axis=-1)


def _grid(model: Any, state: TrainState, par: DataParallel, source: Any,
          config: ml_collections.ConfigDict, prepare: Any) -> np.ndarray | None:
    """image | truth | prediction rows (uint8) of the first eval examples (process 0 only,
    on its own copy of the weights); `prepare`: the eval normalisation on one device."""
    from flaxseg.visualize import palette_or_generated, prediction_grid

    if jax.process_index() != 0:
        return None
    count = min(int(config.num_grid_images), len(source))
    with data.pipeline.create_eval_iterator(
            source, batch_size=count, image_size=tuple(config.dataset.image_size),
            augment=config.augment, process_rows=slice(0, count)) as batches:
        batch = prepare(next(batches))
    preds = _predict_classes(model, par.local_copy(variables_of(state)), batch["image"])
    return prediction_grid(batch["image"], batch["label"], np.asarray(preds),
                           palette_or_generated(source.info.palette, model.num_classes)[0],
                           ignore_index=int(config.dataset.ignore_index))


def _summary(config: ml_collections.ConfigDict, workdir: str, step: int,
             last_eval: dict[str, Any] | None, stopped_by: str | None,
             throughput: Throughput, skipped_steps: int, wall_time: float) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "steps": step,
        "num_train_steps": int(config.num_train_steps),
        "skipped_steps": skipped_steps,
        "wall_time_s": wall_time,
        "train_time_s": throughput.train_time,
        "images_per_sec": throughput.images_per_sec,
        "step_images_per_sec": throughput.step_images_per_sec,
        "data_wait_share": throughput.data_wait_share,
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
    return summary
