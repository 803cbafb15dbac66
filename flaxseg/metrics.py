"""Segmentation metrics: a confusion matrix inside jit, FCN-paper scores on the host.

`confusion_matrix` runs inside the step (int32 counts of one batch, summable across
devices and across steps). `MetricSums` sums a step's sums on the host (confusion counts
in int64: int32 overflows after 2^31 pixels, about 8k 512x512 images; the loss sum and
its pixel weight in float64), and `sum_batches` runs it over a pass of evaluation
batches: the one evaluation routine of the training loop and `python -m flaxseg.evaluate`.
`segmentation_scores` turns the summed counts into the four numbers of Long et al.,
"Fully Convolutional Networks for Semantic Segmentation" (section 5), computed exactly
as the paper's reference `score.py` does, plus per-class IoU, accuracy and Dice.
`boundary_band` picks the pixels near the label boundaries; `trimap_confusions` and
`trimap_scores` score those bands alone, the DeepLab papers' "trimap".

For binary membrane maps (ISBI 2012: membrane vs cell interior), `rand_pair_counts` (per
slice, on the host, additive over slices) and `isbi_errors` give the ISBI 2012 EM
segmentation challenge's pixel error and Rand error, as the challenge's scorer (Fiji's
Trainable_Segmentation `PixelError` / `RandError`, I. Arganda-Carreras) computes them;
see `isbi_errors`. The challenge's third measure, the warping error, is not computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg.extras import require

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")
ISBI_KEYS = ("pixel_error", "rand_error")


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
    # Invalid pixels count 0 (the validity as the weight: on XLA:CPU 6% of a 1x1-conv
    # model's train step faster than counting ones into an overflow bin).
    index = jnp.where(valid, labels * num_classes + preds, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=n)
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def boundary_band(labels: jax.Array, width: int) -> jax.Array:
    """The pixels within a band of `width` pixels around the label boundaries: bool, the
    shape of `labels` (`[..., H, W]`, integer, void pixels included).

    A pixel is on a boundary where a 4-neighbour has another label (both sides are; a
    void label counts as a label, so in VOC's masks the pixels beside the void outlines
    are); the band of width w holds the pixels within w - 1 of a boundary pixel in the
    chessboard metric (w=1: the boundary pixels themselves). The DeepLab papers' "trimap"
    (Chen et al. 2018, figure 5) scores this band alone, as a function of its width:
    `confusion_matrix(jnp.where(band, labels, ignore_index), preds, C)`. Jit-safe.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive Python int (pixels); got {width!r}.")
    labels = jnp.asarray(labels)
    if labels.ndim < 2 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer [..., H, W]; got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}.")
    rows = labels[..., 1:, :] != labels[..., :-1, :]
    cols = labels[..., :, 1:] != labels[..., :, :-1]
    zero_row = jnp.zeros((*labels.shape[:-2], 1, labels.shape[-1]), bool)
    zero_col = jnp.zeros((*labels.shape[:-1], 1), bool)
    edge = (jnp.concatenate([rows, zero_row], -2) | jnp.concatenate([zero_row, rows], -2)
            | jnp.concatenate([cols, zero_col], -1) | jnp.concatenate([zero_col, cols], -1))
    window = (1,) * (labels.ndim - 2) + (2 * width - 1,) * 2
    band = jax.lax.reduce_window(edge.astype(jnp.int8), jnp.int8(0), jax.lax.max, window,
                                 (1,) * labels.ndim, "SAME")
    return band.astype(bool)


def check_trimap_widths(widths: Any) -> tuple[int, ...]:
    """`widths` as a tuple of distinct positive ints (band widths in pixels), or ValueError."""
    widths = tuple(widths)
    if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                         for w in widths) or len(set(widths)) != len(widths):
        raise ValueError(f"trimap widths must be distinct positive ints (pixels), e.g. "
                         f"(1, 2, 4); got {widths!r}.")
    return widths


def trimap_confusions(labels: jax.Array, preds: jax.Array, num_classes: int,
                      widths: tuple[int, ...], ignore_index: int = 255) -> jax.Array:
    """`confusion_matrix` of each band of `widths` pixels around the label boundaries
    (`boundary_band`): int32 `[len(widths), C, C]`. Jit-safe with `num_classes`, `widths`
    and `ignore_index` static."""
    return jnp.stack([
        confusion_matrix(jnp.where(boundary_band(labels, w), labels, ignore_index), preds,
                         num_classes, ignore_index)
        for w in check_trimap_widths(widths)])


def trimap_scores(confusion: Any, band_confusions: Any, widths: tuple[int, ...],
                  class_names: Sequence[str] | None = None) -> dict[int, dict[str, Any]]:
    """The DeepLab papers' trimap: `{width: {'band': scores, 'outside': scores}}`, the
    `segmentation_scores` of the pixels within `width` of a label boundary and of the
    rest, from the whole confusion `[C, C]` and `trimap_confusions` summed alike."""
    total = _as_int64_confusion(confusion)
    bands = np.asarray(band_confusions, np.int64)
    if bands.shape != (len(widths), *total.shape):
        raise ValueError(f"band confusions {bands.shape} do not match {len(widths)} widths "
                         f"of a {total.shape} confusion.")
    return {w: {"band": segmentation_scores(band, class_names),
                "outside": segmentation_scores(total - band, class_names)}
            for w, band in zip(widths, bands, strict=True)}


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


def check_membrane_class(membrane_class: Any, num_classes: int) -> int:
    """`membrane_class` as an int in `[0, num_classes)`, or ValueError naming the fix."""
    if (not isinstance(membrane_class, int | np.integer) or isinstance(membrane_class, bool)
            or not 0 <= membrane_class < num_classes):
        raise ValueError(
            f"membrane_class must be the class index of the membranes (boundaries), an int in "
            f"[0, {num_classes}); got {membrane_class!r}. For ISBI 2012 it is 0."
        )
    return int(membrane_class)


def rand_pair_counts(
    labels: Any, preds: Any, membrane_class: int, ignore_index: int = 255
) -> np.ndarray:
    """One slice's pair counts for the ISBI 2012 Rand error: int64 `[4]`, additive over slices.

    Args:
      labels, preds: integer class maps `[H, W]` (truth, prediction); every class but
        `membrane_class` is non-membrane. Void truth pixels (`ignore_index`) are left out
        like truth membrane.
      membrane_class: the class index of the membranes.

    The segments are the 4-connected components of each map's non-membrane region. Only
    pixels in the truth's segments are counted (the foreground restriction); of those, a
    pixel predicted as membrane is a segment of its own. With n_ij the counted pixels in
    truth segment i and predicted segment j, pairs are ordered and include a pixel with
    itself (the N^2 normalisation of the challenge's scorer, `RandError.
    foregroundRestrictedStatsN2`). Returns `[sum_ij n_ij^2, sum_i (sum_j n_ij)^2,
    sum_j (sum_i n_ij)^2, n]`: pairs together in both maps, in the truth, in the
    prediction, and the counted pixels.
    """
    ndimage = require("scipy.ndimage", "The Rand error's connected components")

    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.ndim != 2 or labels.shape != preds.shape:
        raise ValueError(
            f"labels {labels.shape} and preds {preds.shape} must be one [H, W] slice each."
        )
    foreground = (labels != membrane_class) & (labels != ignore_index)
    truth = ndimage.label(foreground)[0][foreground].astype(np.int64)  # 4-connected
    pred = ndimage.label(preds != membrane_class)[0][foreground].astype(np.int64)
    alone = pred == 0  # predicted membrane: singletons, each paired only with itself
    num_alone = np.int64(alone.sum())
    in_truth, in_pred = truth[~alone], pred[~alone]
    joint = np.unique(in_truth * (int(in_pred.max(initial=0)) + 1) + in_pred,
                      return_counts=True)[1].astype(np.int64)
    truth_sizes = np.bincount(truth).astype(np.int64)
    pred_sizes = np.bincount(in_pred).astype(np.int64)
    return np.array([joint @ joint + num_alone, truth_sizes @ truth_sizes,
                     pred_sizes @ pred_sizes + num_alone, truth.size], np.int64)


def isbi_errors(confusion: Any, rand_counts: Any, membrane_class: int) -> dict[str, float]:
    """The ISBI 2012 challenge's pixel error and Rand error of binary membrane maps.

    Both are 1 - an F-score whose counts are summed over the slices first, as the
    challenge's scorer does (its `getPixelErrorMaximalFScore` and
    `getForegroundRestrictedRandIndexMaximalFScore`, which also take the best of 11
    thresholds of a probability map; a binary map has one):

    * `pixel_error` = 1 - 2 tp / (2 tp + fp + fn), positives the non-membrane pixels, from
      the summed confusion matrix `[C, C]` (rows truth; void already left out).
    * `rand_error` = 1 - 2 s_both / (s_truth + s_pred), the foreground-restricted Rand
      F-score, from the summed `rand_pair_counts` (precision s_both / s_pred, recall
      s_both / s_truth).

    Returns Python floats, NaN where nothing was counted.
    """
    matrix = _as_int64_confusion(confusion)
    membrane = check_membrane_class(membrane_class, matrix.shape[0])
    rest = np.arange(matrix.shape[0]) != membrane
    tp = matrix[np.ix_(rest, rest)].sum()
    wrong = matrix[membrane, rest].sum() + matrix[rest, membrane].sum()
    both, truth, pred, _ = (int(c) for c in np.asarray(rand_counts, np.int64))
    return {
        "pixel_error": 1.0 - 2.0 * tp / (2.0 * tp + wrong) if tp + wrong else math.nan,
        "rand_error": 1.0 - 2.0 * both / (truth + pred) if truth + pred else math.nan,
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
    if all(key in scores for key in ISBI_KEYS):
        errors = "  ".join(f"{scores[key]:11.6f}" for key in ISBI_KEYS)
        lines += ["", "pixel error   Rand error  (ISBI 2012 challenge)", errors]
    if scores.get("trimap"):
        lines += ["", "trimap: pixels within w px of a label boundary, and the rest",
                  "    w  pixels  pixel acc  mean IU   outside: pixel acc  mean IU"]
        for w, parts in scores["trimap"].items():
            band, outside = parts["band"], parts["outside"]
            share = band["num_pixels"] / max(band["num_pixels"] + outside["num_pixels"], 1)
            lines.append(f"{w:5d}  {100 * share:5.1f}%     {pct(band['pixel_accuracy'])}   "
                         f"{pct(band['mean_iou'])}            {pct(outside['pixel_accuracy'])}"
                         f"   {pct(outside['mean_iou'])}")
    return "\n".join(lines)
