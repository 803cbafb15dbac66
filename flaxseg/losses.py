"""Segmentation losses on integer labels, ignore-aware, computed in float32.

Every loss comes in two forms:

* a mean (`cross_entropy`, `dice_loss`, `focal_loss`) for direct use, and
* a sum form `fn(logits, labels) -> (loss_sum, weight_sum)` from `get_loss_fn`, so a
  mean over devices and steps is exact: `sum(loss_sums) / sum(weight_sums)`, never a
  mean of per-device means (which is wrong when ignore pixels are spread unevenly).

Shapes: logits `[B, H, W, C]` (any float dtype; upcast to float32 before the softmax so
bfloat16 compute gives a float32 loss), labels `[B, H, W]` integer.

Labels outside `[0, C)`: pixels equal to `ignore_index` are left out of every loss,
weight and metric. Inside jit a label can not raise, so any *other* out-of-range label
(e.g. 7 with 3 classes, or -1) is treated exactly like `ignore_index`: it is masked
before the one-hot, contributes nothing to the loss, the weight or the gradient, and
never indexes out of bounds. Rejecting such labels with a clear error is the data
layer's job (`flaxseg.data` checks masks on load).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

LOSS_NAMES = ("cross_entropy", "dice", "focal", "ce_dice")


def _check_inputs(logits: jax.Array, labels: jax.Array) -> int:
    """Validates shapes and dtypes at trace time; returns the number of classes."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, H, W, C]; got shape {tuple(logits.shape)}.")
    if tuple(labels.shape) != tuple(logits.shape[:3]):
        raise ValueError(
            f"labels must be [B, H, W] matching logits {tuple(logits.shape)}; got "
            f"{tuple(labels.shape)}. Centre-crop labels to the logits' size first "
            "(flaxseg.models.layers.center_crop) when the model's output is smaller."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array (class ids); got dtype {labels.dtype}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point; got dtype {logits.dtype}.")
    return int(logits.shape[-1])


def _class_weight_array(class_weights: Sequence[float] | None, num_classes: int) -> jax.Array:
    if class_weights is None:
        return jnp.ones((num_classes,), jnp.float32)
    weights = jnp.asarray(class_weights, jnp.float32)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights has {weights.size} entries but the logits have {num_classes} "
            "classes; give one weight per class."
        )
    return weights


def _valid_labels(
    labels: jax.Array, num_classes: int, ignore_index: int
) -> tuple[jax.Array, jax.Array]:
    """Returns (valid mask bool [B,H,W], labels with invalid pixels set to 0 int32 [B,H,W])."""
    labels = labels.astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    return valid, jnp.where(valid, labels, 0)


def _pixel_weights(
    labels: jax.Array, num_classes: int, ignore_index: int, class_weights
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(float32 per-pixel weights [B,H,W] (0 where invalid), safe labels, class weights [C])."""
    valid, safe = _valid_labels(labels, num_classes, ignore_index)
    cw = _class_weight_array(class_weights, num_classes)
    return jnp.where(valid, cw[safe], 0.0), safe, cw


def _safe_mean(loss_sum: jax.Array, weight_sum: jax.Array) -> jax.Array:
    """loss_sum / weight_sum, 0 (with zero gradient) when every pixel is ignored."""
    positive = weight_sum > 0
    return jnp.where(positive, loss_sum / jnp.where(positive, weight_sum, 1.0), 0.0)


def _weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """`sum(weights * values)` over the pixels with weight > 0, float32 `[]`.

    The select is also for speed: XLA:CPU (jaxlib 0.10 and 0.12) compiles the sum of a
    product with the cross-entropy's exp/log into one YNNPACK kernel that ran 6x slower
    than an ordinary loop (31-36 vs 5-6 ms at 8x352x480); a select keeps them in a loop.
    """
    return jnp.sum(jnp.where(weights > 0, weights * values, 0.0))


def _unrolled_parts(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    """`_softmax_parts` as elementwise ops on the C class planes `logits[..., c]`."""
    planes = [logits[..., c] for c in range(logits.shape[-1])]
    peak = functools.reduce(jnp.maximum, planes)
    exp_sum = functools.reduce(jnp.add, [jnp.exp(plane - peak) for plane in planes])
    picked = functools.reduce(jnp.add, [jnp.where(labels == c, plane, 0.0)
                                        for c, plane in enumerate(planes)])
    return jnp.log(exp_sum) + peak, picked, functools.reduce(jnp.add, planes)


def _reduced_parts(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    """`_softmax_parts` as reductions over the class axis."""
    peak = jnp.max(logits, axis=-1)
    log_sum = jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1)) + peak
    picked = jnp.sum(jnp.where(_one_hot(labels, logits.shape[-1]), logits, 0.0), axis=-1)
    return log_sum, picked, jnp.sum(logits, axis=-1)


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    """bool `[..., C]`: labels (in `[0, C)`) == class."""
    return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)


def _softmax_parts(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    """float32 `[...]` each: logsumexp over classes, the labelled logit, the logits' sum.

    On CPU as C elementwise passes over the class planes: XLA:CPU reduces a short minor
    axis (C = 4 ... 150) 4-7x slower than it runs the unrolled ops. On GPU and TPU, where
    a reduction over the minor axis is the native fast path, as reductions.
    """
    return jax.lax.platform_dependent(logits, labels, cpu=_unrolled_parts,
                                      default=_reduced_parts)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _pixel_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-pixel softmax cross-entropy against `(1 - e) * one_hot + e / C`: float32 `[...]`
    from float32 logits `[..., C]` and labels in `[0, C)` `[...]`.

    `logsumexp(l) - (1 - e) * l[label] - e * mean(l)`, with the derivative written out
    (`softmax - target`), so neither direction gathers or scatters: autodiff of
    `take_along_axis(log_softmax(l), label)` scatters into the gradient, and on XLA:CPU the
    pair cost 5x this (value and gradient, C = 4 at 8x352x480: 65 vs 14 ms).
    """
    return _cross_entropy_and_log_sum(logits, labels, smoothing)[0]


def _cross_entropy_and_log_sum(logits: jax.Array, labels: jax.Array, smoothing: float
                               ) -> tuple[jax.Array, jax.Array]:
    """(`_pixel_cross_entropy`, logsumexp over classes), float32 `[...]` each."""
    log_sum, picked, total = _softmax_parts(logits, labels)
    num_classes = logits.shape[-1]
    return log_sum - (1.0 - smoothing) * picked - (smoothing / num_classes) * total, log_sum


@_pixel_cross_entropy.defjvp
def _pixel_cross_entropy_jvp(smoothing, primals, tangents):
    logits, labels = primals
    num_classes = logits.shape[-1]
    out, log_sum = _cross_entropy_and_log_sum(logits, labels, smoothing)
    target = (1.0 - smoothing) * _one_hot(labels, num_classes) + smoothing / num_classes
    slope = jnp.exp(logits - log_sum[..., None]) - target
    return out, jnp.sum(slope * tangents[0], axis=-1)


def cross_entropy_sum(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy as float32 scalars (sum of w_i * ce_i, sum of w_i).

    `w_i` is the class weight of pixel i's label (1 without class weights, 0 if ignored),
    so `sum / weight` is the weighted mean PyTorch's `CrossEntropyLoss(weight=...)` gives.
    With `label_smoothing = e` the target is `(1 - e) * one_hot + e / C`.
    """
    num_classes = _check_inputs(logits, labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    weights, safe, _ = _pixel_weights(labels, num_classes, ignore_index, class_weights)
    nll = _pixel_cross_entropy(logits.astype(jnp.float32), safe, float(label_smoothing))
    return _weighted_sum(weights, nll), jnp.sum(weights)


def focal_loss_sum(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
) -> tuple[jax.Array, jax.Array]:
    """Focal loss (Lin et al. 2017) as float32 (sum, weight): -a_t (1 - p_t)^gamma log p_t.

    The class weights play the role of alpha_t and also weight the mean, as in
    `cross_entropy_sum`; gamma = 0 gives cross-entropy exactly.
    """
    num_classes = _check_inputs(logits, labels)
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0; got {gamma}.")
    weights, safe, _ = _pixel_weights(labels, num_classes, ignore_index, class_weights)
    log_pt = -_pixel_cross_entropy(logits.astype(jnp.float32), safe, 0.0)
    focal = -((1.0 - jnp.exp(log_pt)) ** gamma) * log_pt
    return _weighted_sum(weights, focal), jnp.sum(weights)


def dice_loss_sum(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    smooth: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Soft multi-class Dice loss per image, as float32 (sum, weight).

    For image b and class c, with softmax probabilities p and one-hot targets g over the
    image's valid pixels (ignored pixels are masked before the one-hot):
    `dice_bc = (2 sum p g + smooth) / (sum p + sum g + smooth)`, and the image's loss is
    `1 - sum_c a_c dice_bc / sum_c a_c` (a = class weights, default 1). Dice does not
    decompose over pixels, so it is taken per image and each image's loss is weighted by
    its (class-weighted) valid-pixel count W_b: the pair is `(sum_b W_b L_b, sum_b W_b)`,
    exact across devices, and on the same scale as `cross_entropy_sum` for `ce_dice`.
    """
    num_classes = _check_inputs(logits, labels)
    if smooth < 0:
        raise ValueError(f"dice smooth must be >= 0; got {smooth}.")
    weights, safe, cw = _pixel_weights(labels, num_classes, ignore_index, class_weights)
    valid = (weights > 0)[..., None].astype(jnp.float32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid
    onehot = jax.nn.one_hot(safe, num_classes, dtype=jnp.float32) * valid
    intersection = jnp.sum(probs * onehot, axis=(1, 2))  # [B, C]
    cardinality = jnp.sum(probs + onehot, axis=(1, 2))  # [B, C]
    dice = (2.0 * intersection + smooth) / (cardinality + smooth + 1e-12)
    image_loss = 1.0 - jnp.sum(dice * cw, axis=-1) / jnp.sum(cw)  # [B]
    image_weight = jnp.sum(weights, axis=(1, 2))  # [B]
    return jnp.sum(image_weight * image_loss), jnp.sum(image_weight)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean softmax cross-entropy over non-ignored pixels (class-weighted mean), float32 `[]`.

    The seed's sparse categorical cross-entropy from logits; 0 if every pixel is ignored.
    """
    return _safe_mean(
        *cross_entropy_sum(
            logits,
            labels,
            ignore_index=ignore_index,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
        )
    )


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    smooth: float = 1.0,
) -> jax.Array:
    """Mean soft Dice loss (see `dice_loss_sum`), float32 `[]`."""
    return _safe_mean(
        *dice_loss_sum(
            logits, labels, ignore_index=ignore_index, class_weights=class_weights, smooth=smooth
        )
    )


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    gamma: float = 2.0,
) -> jax.Array:
    """Mean focal loss over non-ignored pixels (see `focal_loss_sum`), float32 `[]`."""
    return _safe_mean(
        *focal_loss_sum(
            logits, labels, ignore_index=ignore_index, class_weights=class_weights, gamma=gamma
        )
    )


def get_loss_fn(
    name: str,
    *,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
    dice_smooth: float = 1.0,
    dice_weight: float = 1.0,
) -> LossFn:
    """Returns `fn(logits [B,H,W,C], labels [B,H,W]) -> (loss_sum, weight_sum)`, float32 scalars.

    Names: `cross_entropy`, `dice`, `focal`, and `ce_dice` = cross-entropy + `dice_weight` x
    Dice (both terms share the weight, so the combination stays exact across devices).
    `label_smoothing` applies to the cross-entropy term only.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
    if label_smoothing and name not in ("cross_entropy", "ce_dice"):
        raise ValueError(
            f"label_smoothing is only defined for cross_entropy and ce_dice, not {name!r}; "
            "set loss.label_smoothing=0."
        )
    if isinstance(class_weights, str):
        raise ValueError(
            f"class_weights must hold one weight per class, got {class_weights!r} (only the "
            "training program takes 'median_frequency', which it turns into weights)."
        )
    if class_weights is not None:
        class_weights = tuple(float(w) for w in class_weights)
        if any(w < 0 for w in class_weights) or not any(w > 0 for w in class_weights):
            raise ValueError(
                f"class_weights must be >= 0 with at least one > 0; got {class_weights}."
            )
    if dice_weight < 0:
        raise ValueError(f"dice_weight must be >= 0; got {dice_weight}.")
    common = dict(ignore_index=ignore_index, class_weights=class_weights)

    def ce(logits, labels):
        return cross_entropy_sum(logits, labels, label_smoothing=label_smoothing, **common)

    def dice(logits, labels):
        return dice_loss_sum(logits, labels, smooth=dice_smooth, **common)

    def focal(logits, labels):
        return focal_loss_sum(logits, labels, gamma=focal_gamma, **common)

    def ce_dice(logits, labels):
        ce_sum, weight = ce(logits, labels)
        dice_sum, _ = dice(logits, labels)  # same weight: sum of class-weighted valid pixels
        return ce_sum + dice_weight * dice_sum, weight

    return {"cross_entropy": ce, "dice": dice, "focal": focal, "ce_dice": ce_dice}[name]
