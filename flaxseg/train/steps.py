"""The pure train and eval steps, and the factories that compile them for a parallel mode.

`train_step_fn(model, loss_fn, num_classes, axis_name=None, ...)` is the pure function
`(state, batch) -> (state, metrics)` of one device's program; `make_train_step(...,
parallel='mesh' | 'jit' | 'pmap' | DataParallel)` compiles it (see `flaxseg.train.parallel`:
the modes differ only there). The compiled step takes the replicated state and a global
batch (`DataParallel.put_batch`; in one process, NumPy arrays `[B, ...]` work too under
'mesh' and 'jit') and returns the replicated state and metric sums.

* 'mesh' / 'jit' (`axis_name=None`): one global program. The loss is the global
  `loss_sum / weight_sum`, so its gradient is that of the global mean loss, and BatchNorm's
  statistics are means over the global batch, whatever the devices.
* 'pmap' (`axis_name='data'`): each device's slice; gradients are summed over devices as
  `psum(grad(loss_sum_d / W))` with `W = psum(weight_sum_d)`, the exact gradient of the
  global mean even when devices hold different numbers of ignored pixels. BatchNorm
  statistics are synchronised by the model itself (cloned with `axis_name`).

Keys: the step's dropout key is `fold_in(state.rng, state.step)`, and under pmap also
`fold_in(..., axis_index)`; `state.step` grows by one every step, so no key is used twice.
Random bits use JAX's default partitionable threefry, so a sharded dropout mask equals the
one-device mask (and each device computes only its own slice of it).

Metrics leave the step as sums, identical on every device: `loss_sum`, `weight_sum`
(float32), `confusion` (int32 `[C, C]`), and `nonfinite` (int32, 1 when the loss, a gradient
or a BatchNorm statistic was not finite).

Non-finite guard: when `nonfinite` is 1 the step keeps the old params, BatchNorm statistics
and optimiser state, so NaN never reaches the params. With `nan_policy='raise'` the whole
state is kept (the step counter too: the state is exactly the one before the bad step);
with `'skip'` the step counter still advances, so the next batch gets a fresh key.
`NonFiniteGuard` applies the policy on the host: it raises, or counts skipped steps.

Mixed precision: run the model with `dtype=jnp.bfloat16` and float32 `param_dtype`; the
gradients and the update are float32, and the loss and metrics are computed in float32
from the logits.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxseg.losses import LossFn
from flaxseg.metrics import MetricSums, confusion_matrix
from flaxseg.models.layers import center_crop
from flaxseg.models.registry import logits_of, split_outputs
from flaxseg.train.parallel import DataParallel
from flaxseg.train.state import TrainState

NAN_POLICIES = ("raise", "skip")
# The weight of an auxiliary head's loss (a model returning {'out', 'aux'}), as in
# torchvision's segmentation references: loss = loss(out) + 0.5 * loss(aux).
AUX_LOSS_WEIGHT = 0.5

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}; got {nan_policy!r}.")
    return nan_policy


def _check_num_classes(num_classes: int) -> int:
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    return int(num_classes)


def _model_for(model: nn.Module, axis_name: str | None) -> nn.Module:
    """The model with BatchNorm's cross-device axis set (pmap) or cleared."""
    if hasattr(model, "axis_name"):
        return model.clone(axis_name=axis_name)
    return model


def _check_batch(batch: Batch, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Trace-time checks of one program's batch; returns (images, labels)."""
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch must be a dict with 'image' and 'label'; got {keys}.")
    images, labels = batch["image"], batch["label"]
    if images.ndim != 4 or labels.ndim != 3 or images.shape[:3] != labels.shape:
        raise ValueError(
            f"Expected image [B, H, W, C] and label [B, H, W]; got image "
            f"{tuple(images.shape)} and label {tuple(labels.shape)}."
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"batch['image'] must be floating point (float32 in [0, 1]); got {images.dtype}. "
            "Convert and normalise in the data pipeline."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"batch['label'] must be integer class ids; got {labels.dtype}.")
    return images, labels


def _crop_labels(labels: jax.Array, logits: jax.Array, num_classes: int) -> jax.Array:
    """Centre-crops labels to the logits' H, W (the VALID U-Net's output is smaller)."""
    if logits.shape[-1] != num_classes:
        raise ValueError(
            f"The model outputs {logits.shape[-1]} classes but num_classes={num_classes}; "
            "set the model's num_classes to the dataset's."
        )
    if labels.shape[1:3] == logits.shape[1:3]:
        return labels
    return center_crop(labels, tuple(logits.shape[1:3]))


def variables_of(state: TrainState) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` for `model.apply` (no `batch_stats` if there are none)."""
    if jax.tree.leaves(state.batch_stats):
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def _all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite: a bool scalar."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    # One reduction over the leaves side by side (XLA:CPU fuses the concatenation with
    # the test: one bool per element is written, then reduced), not one per leaf:
    # XLA:CPU took 70 s more to compile the ~400 per-leaf reductions of a MobileNetV3
    # DeepLabV3's train step (90 s against 13 s in all, measured).
    return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))


def _summed_metrics(
    logits: jax.Array,
    labels: jax.Array,
    loss_sum: jax.Array,
    weight_sum: jax.Array,
    num_classes: int,
    ignore_index: int,
    axis_name: str | None,
) -> Metrics:
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    metrics = {
        "loss_sum": loss_sum.astype(jnp.float32),
        "weight_sum": weight_sum.astype(jnp.float32),
        "confusion": confusion_matrix(labels, preds, num_classes, ignore_index),
    }
    return lax.psum(metrics, axis_name) if axis_name else metrics


def train_step_fn(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    axis_name: str | None = None,
    ignore_index: int = 255,
    nan_policy: str = "raise",
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure `train_step(state, batch) -> (state, metrics)` of one program.

    `axis_name=None` for a global program ('mesh' / 'jit'); the pmap axis name for a
    per-device one (gradients, the pixel weight and the metrics are then psum-ed, and
    BatchNorm synchronises over the axis).
    """
    num_classes = _check_num_classes(num_classes)
    check_nan_policy(nan_policy)
    model = _model_for(model, axis_name)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        images, labels = _check_batch(batch, num_classes)
        key = jax.random.fold_in(state.rng, state.step)
        if axis_name:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        has_batch_stats = bool(jax.tree.leaves(state.batch_stats))

        def objective(params):
            variables = {**variables_of(state), "params": params}
            outputs, updates = model.apply(
                variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            logits, aux = split_outputs(outputs)
            cropped = _crop_labels(labels, logits, num_classes)
            loss_sum, weight_sum = loss_fn(logits, cropped)
            if aux is not None:
                loss_sum = loss_sum + AUX_LOSS_WEIGHT * loss_fn(aux, cropped)[0]
            # The global pixel weight does not depend on the params; dividing by it (not by
            # a device's own weight) makes the summed gradient that of the global mean loss.
            total_weight = lax.stop_gradient(weight_sum)
            if axis_name:
                total_weight = lax.psum(total_weight, axis_name)
            loss = loss_sum / jnp.maximum(total_weight, jnp.finfo(jnp.float32).tiny)
            return loss, (logits, cropped, loss_sum, weight_sum, updates)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (logits, cropped, loss_sum, weight_sum, updates)), grads = grad_fn(state.params)
        if axis_name:
            grads = lax.psum(grads, axis_name)
        batch_stats = updates["batch_stats"] if has_batch_stats else state.batch_stats
        metrics = _summed_metrics(
            logits, cropped, loss_sum, weight_sum, num_classes, ignore_index, axis_name
        )
        finite = jnp.isfinite(metrics["loss_sum"]) & _all_finite(grads)
        finite &= _all_finite(batch_stats)
        updated = state.apply_gradients(grads, batch_stats)

        def keep_if_bad(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = updated.replace(
            params=keep_if_bad(updated.params, state.params),
            batch_stats=keep_if_bad(updated.batch_stats, state.batch_stats),
            opt_state=keep_if_bad(updated.opt_state, state.opt_state),
            step=updated.step if nan_policy == "skip" else keep_if_bad(updated.step, state.step),
        )
        metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
        return new_state, metrics

    return train_step


def eval_step_fn(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    axis_name: str | None = None,
    ignore_index: int = 255,
) -> Callable[[dict[str, Any], Batch], Metrics]:
    """The pure `eval_step(variables, batch) -> metrics` (inference mode, no update).

    `variables` as `model.apply` takes them (`variables_of(state)`, or a loaded run's).
    Same metric sums as the train step (no `nonfinite`); padded eval examples whose labels
    are all `ignore_index` add nothing.
    """
    num_classes = _check_num_classes(num_classes)
    model = _model_for(model, axis_name)

    def eval_step(variables: dict[str, Any], batch: Batch) -> Metrics:
        images, labels = _check_batch(batch, num_classes)
        logits = logits_of(model.apply(variables, images, train=False))
        cropped = _crop_labels(labels, logits, num_classes)
        loss_sum, weight_sum = loss_fn(logits, cropped)
        return _summed_metrics(
            logits, cropped, loss_sum, weight_sum, num_classes, ignore_index, axis_name
        )

    return eval_step


def _parallel(parallel: str | DataParallel) -> DataParallel:
    return parallel if isinstance(parallel, DataParallel) else DataParallel(parallel)


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    parallel: str | DataParallel = "mesh",
    ignore_index: int = 255,
    nan_policy: str = "raise",
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the compiled `train_step(state, batch) -> (state, metrics)`.

    Args:
      model: the Linen module (`apply(variables, x, train=True, rngs={'dropout': key})`
        -> float32 logits `[B, H', W', num_classes]`).
      loss_fn: `fn(logits, labels) -> (loss_sum, weight_sum)` from `flaxseg.losses.get_loss_fn`.
      num_classes: C, the model's output classes (the confusion matrix is `[C, C]`).
      parallel: 'mesh' (every device, the default), 'jit' (one device), 'pmap', or a
        `flaxseg.train.parallel.DataParallel` (e.g. over chosen devices).
      ignore_index: the void label, left out of the confusion matrix (the loss_fn has its own).
      nan_policy: 'raise' keeps the entire state on a non-finite step; 'skip' keeps params,
        BatchNorm statistics and optimiser state but advances `step` (see module docstring).
      donate: donate the input state's buffers (the caller must not reuse the old state).

    `batch = {'image': float [B, H, W, C], 'label': int [B, H, W]}` as `put_batch` lays it
    out. Labels larger than the logits are centre-cropped to them.
    """
    par = _parallel(parallel)
    fn = train_step_fn(model, loss_fn, num_classes, axis_name=par.axis_name,
                       ignore_index=ignore_index, nan_policy=nan_policy)
    return par.compile(fn, donate=donate)


def make_eval_step(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    parallel: str | DataParallel = "mesh",
    ignore_index: int = 255,
) -> Callable[[dict[str, Any], Batch], Metrics]:
    """Builds the compiled `eval_step(variables, batch) -> metrics`; arguments as
    `make_train_step`."""
    par = _parallel(parallel)
    fn = eval_step_fn(model, loss_fn, num_classes, axis_name=par.axis_name,
                      ignore_index=ignore_index)
    return par.compile(fn)


class NonFiniteLossError(FloatingPointError):
    """A train step produced a non-finite loss or gradient under nan_policy='raise', or
    too many steps in a row were skipped under 'skip'."""


class NonFiniteGuard:
    """Applies `nan_policy` on the host to each train step's metrics.

    >>> guard = NonFiniteGuard(config.nan_policy)
    >>> state, metrics = train_step(state, batch)
    >>> guard(step, metrics)   # raises NonFiniteLossError, or counts a skip

    Reading the flag waits for the step; the state is safe either way (the step never
    writes NaN), so a loop may check the previous step's metrics to keep one step in flight.

    Args:
      nan_policy: 'raise' or 'skip'.
      on_skip: called with (step, steps skipped so far) when a step is skipped.
      max_consecutive_skips: under 'skip', this many skipped steps in a row raise
        NonFiniteLossError: the model is no longer training (None: never).
      max_skipped_fraction: under 'skip', `check_run` raises when more than this fraction
        of a run's steps were skipped (None: never).
    """

    def __init__(self, nan_policy: str = "raise", *,
                 on_skip: Callable[[int, int], None] | None = None,
                 max_consecutive_skips: int | None = None,
                 max_skipped_fraction: float | None = None):
        self.nan_policy = check_nan_policy(nan_policy)
        self._max_fraction = max_skipped_fraction
        self.skipped = 0
        self.consecutive = 0
        self.last_finite_loss: float | None = None
        self.last_finite_step: int | None = None
        self._on_skip = on_skip
        self._max_consecutive = max_consecutive_skips

    def __call__(self, step: int, metrics: Metrics) -> bool:
        """Returns True if the step's update was applied, False if it was skipped."""
        if not np.asarray(metrics["nonfinite"]).any():
            loss_sum, weight_sum = float(metrics["loss_sum"]), float(metrics["weight_sum"])
            self.last_finite_loss = loss_sum / weight_sum if weight_sum > 0 else 0.0
            self.last_finite_step = step
            self.consecutive = 0
            return True
        if self.nan_policy == "raise":
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {step} ({self._last()}). The update was "
                "not applied: the state holds the values from before this step. Lower "
                "optimizer.learning_rate, set optimizer.grad_clip_norm, check the batch for "
                "NaN/inf images, or set nan_policy='skip' to skip such steps."
            )
        self.skipped += 1
        self.consecutive += 1
        if self._on_skip is not None:
            self._on_skip(step, self.skipped)
        if self._max_consecutive is not None and self.consecutive >= self._max_consecutive:
            raise NonFiniteLossError(
                f"The last {self.consecutive} steps (up to step {step}) were all non-finite "
                f"and skipped ({self._last()}): the model is not training. Lower "
                "optimizer.learning_rate, set optimizer.grad_clip_norm, or check the data "
                "for NaN/inf images; the last checkpoint holds the state before these steps."
            )
        return False

    def check_run(self, step: int, steps_run: int) -> None:
        """Raises NonFiniteLossError when more than `max_skipped_fraction` of the
        `steps_run` steps up to `step` were skipped: a run mostly skipped has not trained,
        however short, and must not end as a success."""
        if self._max_fraction is None or self.skipped <= self._max_fraction * steps_run:
            return
        raise NonFiniteLossError(
            f"{self.skipped} of the {steps_run} steps up to step {step} were non-finite and "
            f"skipped (more than {self._max_fraction:.0%}; {self._last()}): the run has not "
            "trained and is not saved as finished. Lower optimizer.learning_rate, set "
            "optimizer.grad_clip_norm, or check the data for NaN/inf images.")

    def _last(self) -> str:
        if self.last_finite_loss is None:
            return "no finite loss yet"
        return f"last finite loss {self.last_finite_loss:.6g} at step {self.last_finite_step}"


class TrainMetrics:
    """The train steps' metric sums on the host, one step behind the device.

    >>> train_metrics = TrainMetrics(num_classes, NonFiniteGuard(config.nan_policy))
    >>> state, metrics = train_step(state, batch)
    >>> train_metrics.add(step, metrics)   # reads the previous step's (the device runs on)
    >>> sums = train_metrics.take()        # waits for the last step: the interval's sums

    Each step's metrics pass through `NonFiniteGuard` (a skipped step adds nothing; under
    'raise' the bad step raises when read). `sums()` waits for the last step and returns
    the sums so far without resetting them (for a checkpoint); `take()` also resets them.
    """

    def __init__(self, num_classes: int, guard: NonFiniteGuard | None = None,
                 sums: MetricSums | None = None):
        self.guard = guard if guard is not None else NonFiniteGuard()
        self._sums = sums if sums is not None else MetricSums(num_classes)
        self._pending: tuple[int, Metrics] | None = None

    def add(self, step: int, metrics: Metrics) -> None:
        self._read_pending()
        self._pending = (step, metrics)

    def _read_pending(self) -> None:
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            metrics = jax.device_get(metrics)
            if self.guard(step, metrics):
                self._sums.add(metrics)

    def sums(self) -> MetricSums:
        self._read_pending()
        return self._sums

    def take(self) -> MetricSums:
        sums = self.sums()
        self._sums = MetricSums(sums.num_classes)
        return sums
