"""Segmentation metrics: a confusion matrix inside jit, FCN-paper scores on the host.

`confusion_matrix` runs inside the step (int32 counts of one batch, summable across
devices and across steps). `MetricSums` sums a step's sums on the host (confusion counts
in int64: int32 overflows after 2^31 pixels, about 8k 512x512 images; the loss sum and
its pixel weight in float64), and `sum_batches` runs it over a pass of evaluation
batches: the one evaluation routine of the training loop and `python -m flaxseg.evaluate`.
`segmentation_scores` turns the summed counts into the four numbers of Long et al.,
"Fully Convolutional Networks for Semantic Segmentation" (section 5), computed exactly
as the paper's reference `score.py` does, plus per-class IoU, accuracy and Dice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


def confusion_matrix(
    labels: jax.Array, preds: jax.Array, num_classes: int, ignore_index: int = 255
) -> jax.Array:
    """Counts pixels by (truth, prediction): int32 `[C, C]`, rows truth, columns prediction.

    Args:
      labels: integer ground truth, any shape (usually `[B, H, W]`).
      preds: integer predictions of the same shape (e.g. `argmax(logits, -1)`).
      num_classes: C, a Python int (the matrix shape is static, so this is jit-safe).
      ignore_index: label of void pixels; they leave no trace in the matrix.

    A label outside `[0, C)` (other than `ignore_index`) or a prediction outside `[0, C)`
    is dropped like an ignored pixel: inside jit it can not raise, and it must not land in
    another class's cell. Uses a fixed-length bincount, so it compiles once.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive Python int; got {num_classes!r}.")
    if tuple(labels.shape) != tuple(preds.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} and preds {tuple(preds.shape)} must have the same "
            "shape; pass argmax(logits, -1), not the logits, and crop labels to the logits' size."
        )
    for name, x in (("labels", labels), ("preds", preds)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array; got dtype {x.dtype}.")
    labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    preds = jnp.asarray(preds, jnp.int32).reshape(-1)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    valid &= (preds >= 0) & (preds < num_classes)
    n = num_classes * num_classes
    index = jnp.where(valid, labels * num_classes + preds, n)  # invalid -> overflow bin n
    counts = jnp.bincount(index, length=n + 1)[:n]
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _as_int64_confusion(confusion: Any) -> np.ndarray:
    matrix = np.asarray(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"A confusion matrix must be square [C, C]; got shape {matrix.shape}. Pass the "
            "step's summed metrics (one [C, C] matrix), not per-device copies."
        )
    if not np.issubdtype(matrix.dtype, np.integer):
        raise TypeError(f"A confusion matrix must hold integer counts; got dtype {matrix.dtype}.")
    if (matrix < 0).any():
        raise ValueError("A confusion matrix can not hold negative counts (int32 overflow?).")
    return matrix.astype(np.int64)


class MetricSums:
    """Host-side sums of metric sums: confusion counts (int64), loss sum and pixel weight.

    >>> sums = MetricSums(num_classes=3)
    >>> sums.add(metrics)        # {'confusion': [C, C] ints, 'loss_sum', 'weight_sum'}
    >>> sums.scores(class_names), sums.loss

    `loss_sum` / `weight_sum` are optional in what is added (inference-only evaluation has
    no loss; `loss` is then NaN). JSON round-trippable (`to_json` / `from_json`), so a
    checkpoint taken mid-interval resumes the interval exactly.
    """

    def __init__(self, num_classes: int):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.loss_sum = 0.0
        self.weight_sum = 0.0
        self.count = 0

    def add(self, metrics: dict[str, Any]) -> None:
        """Adds one step's sums (NumPy or JAX; copied to the host)."""
        matrix = _as_int64_confusion(metrics["confusion"])
        if matrix.shape != self.confusion.shape:
            raise ValueError(
                f"Expected a [{self.num_classes}, {self.num_classes}] confusion matrix; got "
                f"{matrix.shape}. Check dataset.num_classes against the model's num_classes."
            )
        self.confusion += matrix
        self.loss_sum += float(metrics.get("loss_sum", 0.0))
        self.weight_sum += float(metrics.get("weight_sum", 0.0))
        self.count += 1

    @property
    def loss(self) -> float:
        """The mean loss over every counted pixel (NaN when no loss was added)."""
        return self.loss_sum / self.weight_sum if self.weight_sum > 0 else math.nan

    def scores(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return segmentation_scores(self.confusion, class_names)

    def to_json(self) -> dict[str, Any]:
        return {"confusion": self.confusion.tolist(), "loss_sum": self.loss_sum,
                "weight_sum": self.weight_sum, "count": self.count}

    @classmethod
    def from_json(cls, num_classes: int, saved: dict[str, Any]) -> MetricSums:
        sums = cls(num_classes)
        sums.confusion = np.asarray(saved["confusion"], np.int64).reshape(
            num_classes, num_classes)
        sums.loss_sum = float(saved["loss_sum"])
        sums.weight_sum = float(saved["weight_sum"])
        sums.count = int(saved["count"])
        return sums


def sum_batches(
    batch_metrics: Iterable[dict[str, Any]],
    num_classes: int,
    on_batch: Callable[[int], None] | None = None,
) -> MetricSums:
    """Sums per-batch metric sums into a `MetricSums`, reading one batch while the next runs.

    `batch_metrics` yields each batch's sums as (possibly still running) device arrays, e.g.
    `(eval_step(state, put_batch(b)) for b in batches)`: asking it for the next batch's
    sums dispatches that batch, after which the previous one is copied to the host, so the
    device is never idle waiting for the host. `on_batch(n)` is called after each batch.
    """
    sums = MetricSums(num_classes)
    pending = None
    for metrics in batch_metrics:
        if pending is not None:
            sums.add(jax.device_get(pending))
            if on_batch is not None:
                on_batch(sums.count)
        pending = metrics
    if pending is not None:
        sums.add(jax.device_get(pending))
        if on_batch is not None:
            on_batch(sums.count)
    return sums


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio in float64, NaN where the denominator is 0 (no warning)."""
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def segmentation_scores(confusion: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """FCN-paper scores from a confusion matrix `[C, C]` (rows truth, columns prediction).

    With n_ij the pixels of class i predicted as j, t_i = sum_j n_ij (truth) and
    p_i = sum_j n_ji (predicted), as the paper's reference `score.py` computes them:

    * `pixel_accuracy` = sum_i n_ii / sum_i t_i
    * `mean_accuracy` = nanmean_i n_ii / t_i: classes absent from the ground truth
      (t_i = 0) are left out.
    * `mean_iou` = nanmean_i n_ii / (t_i + p_i - n_ii): only classes absent from both the
      ground truth and the predictions are left out; a class predicted but never present
      counts with IoU 0.
    * `fw_iou` = sum_i (t_i / sum_k t_k) IoU_i over classes with t_i > 0 (so a class
      absent from the ground truth adds nothing).
    * `mean_dice` = nanmean_i 2 n_ii / (t_i + p_i), left out like IoU.

    Returns a dict of Python floats (NaN where undefined, e.g. an empty matrix) with the
    keys above, plus `per_class`: `{name: {'iou', 'accuracy', 'dice'}}` (names default to
    "class_0", ...) and `num_pixels` (int, the pixels counted).
    """
    matrix = _as_int64_confusion(confusion)
    num_classes = matrix.shape[0]
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class names for a {num_classes}-class confusion matrix."
        )
    if len(set(class_names)) != num_classes:
        raise ValueError(f"Class names must be unique; got {class_names}.")

    diag = np.diag(matrix).astype(np.float64)
    truth = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    total = truth.sum()
    accuracy = _divide(diag, truth)
    iou = _divide(diag, truth + predicted - diag)
    dice = _divide(2.0 * diag, truth + predicted)
    present = truth > 0
    return {
        "pixel_accuracy": float(diag.sum() / total) if total else math.nan,
        "mean_accuracy": _nanmean(accuracy),
        "mean_iou": _nanmean(iou),
        "fw_iou": float((truth[present] * iou[present]).sum() / total) if total else math.nan,
        "mean_dice": _nanmean(dice),
        "num_pixels": int(total),
        "per_class": {
            name: {"iou": float(iou[i]), "accuracy": float(accuracy[i]), "dice": float(dice[i])}
            for i, name in enumerate(class_names)
        },
    }


def flatten_scores(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flat scalar tags for summary writers: `mean_iou`, ..., `iou/<class>`, `dice/<class>`."""
    flat = {f"{prefix}{key}": scores[key] for key in (*SUMMARY_KEYS, "mean_dice")}
    for name, values in scores["per_class"].items():
        for metric, value in values.items():
            flat[f"{prefix}{metric}/{name}"] = value
    return flat


def format_scores_table(scores: dict[str, Any]) -> str:
    """The four FCN numbers (in %) and a per-class IoU / accuracy / Dice table, as text."""

    def pct(value: float) -> str:
        return "   n/a" if math.isnan(value) else f"{100.0 * value:6.2f}"

    header = "pixel acc  mean acc  mean IU  f.w. IU"
    summary = "   ".join(pct(scores[key]) for key in SUMMARY_KEYS)
    width = max([len("class"), *(len(name) for name in scores["per_class"])])
    lines = [header, "  " + summary, "", f"{'class':<{width}}     IoU     acc    Dice"]
    for name, values in scores["per_class"].items():
        cells = "  ".join(pct(values[key]) for key in ("iou", "accuracy", "dice"))
        lines.append(f"{name:<{width}}  {cells}")
    return "\n".join(lines)
