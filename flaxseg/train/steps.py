"""The pure train and eval steps, compiled two ways from one factory.

`make_train_step(model, loss_fn, num_classes, parallel='jit' | 'pmap')` returns
`step(state, batch) -> (state, metrics)`:

* `'jit'`: one device, the state donated (updated in place).
* `'pmap'`: data parallel over the local devices with `axis_name='batch'`. The state is
  replicated (`flaxseg.parallel.replicate`), the batch laid out `[devices, per_device, ...]`
  (`flaxseg.parallel.shard_batch`). Gradients are summed over devices as
  `psum(grad(loss_sum_d / W))` with `W = psum(weight_sum_d)`, the exact gradient of the
  global mean; this is the `pmean` of per-device mean gradients whenever every device has the
  same number of non-ignored pixels, and stays exact when it has not. BatchNorm statistics
  are synchronised by the model itself (it is cloned with `axis_name='batch'`).

Keys: the step's dropout key is `fold_in(state.rng, state.step)`, and under pmap also
`fold_in(..., axis_index('batch'))`; `state.step` grows by one every step, so no key is
used twice. Random bits use the non-partitionable threefry (`flaxseg.train.state.fast_random`:
much faster to compile on CPU; each device draws its own masks, so nothing is lost).

Metrics leave the step as sums (psum-ed under pmap, so every replica holds the global
value): `loss_sum`, `weight_sum` (float32), `confusion` (int32 `[C, C]`), and `nonfinite`
(int32, 1 when the loss, a gradient or a BatchNorm statistic was not finite).

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
from flaxseg.metrics import confusion_matrix
from flaxseg.models.layers import center_crop
from flaxseg.train.state import TrainState, fast_random

AXIS_NAME = "batch"
PARALLEL_MODES = ("jit", "pmap")
NAN_POLICIES = ("raise", "skip")

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _check_options(parallel: str, num_classes: int, nan_policy: str = "raise") -> int:
    """Validates the factory's options; returns num_classes as a Python int."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be 'jit' or 'pmap'; got {parallel!r}.")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be 'raise' or 'skip'; got {nan_policy!r}.")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    return int(num_classes)


def _model_for(model: nn.Module, parallel: str) -> nn.Module:
    """The model with BatchNorm's cross-replica axis set for the parallel mode."""
    axis_name = AXIS_NAME if parallel == "pmap" else None
    if hasattr(model, "axis_name"):
        return model.clone(axis_name=axis_name)
    return model


def _check_batch(batch: Batch, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Trace-time checks of one device's batch; returns (images, labels)."""
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch must be a dict with 'image' and 'label'; got {keys}.")
    images, labels = batch["image"], batch["label"]
    if images.ndim != 4 or labels.ndim != 3 or images.shape[:3] != labels.shape:
        raise ValueError(
            f"Expected image [B, H, W, C] and label [B, H, W] per device; got image "
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


def _variables(state: TrainState) -> dict[str, Any]:
    if jax.tree.leaves(state.batch_stats):
        return {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": state.params}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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


def _compile(fn: Callable, parallel: str, donate: bool) -> Callable[[TrainState, Batch], Any]:
    """jit or pmap `fn(state, batch)`, with an early, clear error for a mis-laid batch."""
    donate_argnums = (0,) if donate else ()
    if parallel == "jit":
        return jax.jit(fn, donate_argnums=donate_argnums)
    compiled = jax.pmap(fn, axis_name=AXIS_NAME, donate_argnums=donate_argnums)
    num_devices = jax.local_device_count()

    def call(state: TrainState, batch: Batch):
        images = batch.get("image") if isinstance(batch, dict) else None
        if images is None or images.ndim != 5 or images.shape[0] != num_devices:
            shape = None if images is None else tuple(images.shape)
            raise ValueError(
                f"Under parallel='pmap' the batch must be laid out [{num_devices} devices, "
                f"per_device, ...]; got image shape {shape}. Use "
                f"flaxseg.parallel.shard_batch(batch, {num_devices}) and replicate the state "
                "with flaxseg.parallel.replicate."
            )
        return compiled(state, batch)

    call.lower = compiled.lower  # type: ignore[attr-defined]
    call.__wrapped__ = compiled  # type: ignore[attr-defined]
    return call


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    parallel: str = "jit",
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
      parallel: 'jit' (one device) or 'pmap' (all local devices, `axis_name='batch'`).
      ignore_index: the void label, left out of the confusion matrix (the loss_fn has its own).
      nan_policy: 'raise' keeps the entire state on a non-finite step; 'skip' keeps params,
        BatchNorm statistics and optimiser state but advances `step` (see module docstring).
      donate: donate the input state's buffers (the caller must not reuse the old state).

    `batch = {'image': float [B, H, W, C], 'label': int [B, H, W]}` (under pmap with a leading
    device axis). Labels larger than the logits are centre-cropped to them.
    """
    num_classes = _check_options(parallel, num_classes, nan_policy)
    model = _model_for(model, parallel)
    axis_name = AXIS_NAME if parallel == "pmap" else None

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with fast_random():  # dropout masks compile ~6x faster; see its docstring
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        images, labels = _check_batch(batch, num_classes)
        key = jax.random.fold_in(state.rng, state.step)
        if axis_name:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        has_batch_stats = bool(jax.tree.leaves(state.batch_stats))

        def objective(params):
            variables = {**_variables(state), "params": params}
            logits, updates = model.apply(
                variables, images, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            cropped = _crop_labels(labels, logits, num_classes)
            loss_sum, weight_sum = loss_fn(logits, cropped)
            # The global pixel weight does not depend on the params; dividing by it (not by
            # the local weight) makes the summed gradient that of the global mean loss.
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

    return _compile(train_step, parallel, donate)


def make_eval_step(
    model: nn.Module,
    loss_fn: LossFn,
    num_classes: int,
    *,
    parallel: str = "jit",
    ignore_index: int = 255,
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds the compiled `eval_step(state, batch) -> metrics` (inference mode, no update).

    Same batch layout and metric sums as `make_train_step` (no `nonfinite`); padded eval
    batches whose labels are all `ignore_index` add nothing.
    """
    num_classes = _check_options(parallel, num_classes)
    model = _model_for(model, parallel)
    axis_name = AXIS_NAME if parallel == "pmap" else None

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        images, labels = _check_batch(batch, num_classes)
        logits = model.apply(_variables(state), images, train=False)
        cropped = _crop_labels(labels, logits, num_classes)
        loss_sum, weight_sum = loss_fn(logits, cropped)
        return _summed_metrics(
            logits, cropped, loss_sum, weight_sum, num_classes, ignore_index, axis_name
        )

    return _compile(eval_step, parallel, donate=False)


class NonFiniteLossError(FloatingPointError):
    """A train step produced a non-finite loss or gradient under nan_policy='raise'."""


class NonFiniteGuard:
    """Applies `nan_policy` on the host to each train step's metrics.

    >>> guard = NonFiniteGuard(config.nan_policy)
    >>> state, metrics = train_step(state, batch)
    >>> guard(step, metrics)   # raises NonFiniteLossError, or counts a skip

    Reading the flag waits for the step; the state is safe either way (the step never
    writes NaN), so a loop may check the previous step's metrics to keep one step in flight.
    Accepts jit metrics or pmap's replicated ones.
    """

    def __init__(self, nan_policy: str = "raise"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be 'raise' or 'skip'; got {nan_policy!r}.")
        self.nan_policy = nan_policy
        self.skipped = 0
        self.last_finite_loss: float | None = None
        self.last_finite_step: int | None = None

    def __call__(self, step: int, metrics: Metrics) -> bool:
        """Returns True if the step's update was applied, False if it was skipped."""
        if not np.asarray(metrics["nonfinite"]).any():
            loss_sum = float(np.ravel(metrics["loss_sum"])[0])
            weight_sum = float(np.ravel(metrics["weight_sum"])[0])
            self.last_finite_loss = loss_sum / weight_sum if weight_sum > 0 else 0.0
            self.last_finite_step = step
            return True
        if self.nan_policy == "skip":
            self.skipped += 1
            return False
        last = (
            "no finite loss yet"
            if self.last_finite_loss is None
            else f"last finite loss {self.last_finite_loss:.6g} at step {self.last_finite_step}"
        )
        raise NonFiniteLossError(
            f"Non-finite loss or gradient at step {step} ({last}). The update was not applied: "
            "the state holds the values from before this step. Lower optimizer.learning_rate, "
            "set optimizer.grad_clip_norm, check the batch for NaN/inf images, or set "
            "nan_policy='skip' to skip such steps."
        )
