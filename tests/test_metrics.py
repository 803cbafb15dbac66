"""Metrics against a NumPy oracle of the FCN paper's score.py: ignore pixels, absent classes."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import metrics

C = 5
IGNORE = 255


def _oracle_hist(labels, preds, n):
    """score.py's fast_hist: bincount over valid ground truth."""
    k = (labels >= 0) & (labels < n)
    return np.bincount(n * labels[k].astype(int) + preds[k], minlength=n**2).reshape(n, n)


def _oracle_scores(hist):
    """The four numbers as score.py computes them (with nanmean)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        per_class_acc = np.diag(hist) / hist.sum(1)
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    freq = hist.sum(1) / hist.sum()
    return {
        "pixel_accuracy": acc,
        "mean_accuracy": np.nanmean(per_class_acc),
        "mean_iou": np.nanmean(iu),
        "fw_iou": (freq[freq > 0] * iu[freq > 0]).sum(),
        "iu": iu,
    }


def _random_case(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=(3, 17, 13)).astype(np.int32)
    preds = rng.integers(0, C, size=labels.shape).astype(np.int32)
    labels[labels == 3] = 0  # class 3: predicted but never in the ground truth -> IU 0
    preds[preds == 4] = 1
    labels[labels == 4] = 2  # class 4: in neither -> left out of the means
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    return labels, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_scores_match_the_fcn_oracle(seed):
    labels, preds = _random_case(seed)
    confusion = jax.jit(metrics.confusion_matrix, static_argnums=(2,))(labels, preds, C)
    assert confusion.dtype == jnp.int32 and confusion.shape == (C, C)
    np.testing.assert_array_equal(confusion, _oracle_hist(labels, preds, C))
    assert int(confusion.sum()) == int((labels != IGNORE).sum())

    scores = metrics.segmentation_scores(confusion)
    want = _oracle_scores(_oracle_hist(labels, preds, C))
    for key in metrics.SUMMARY_KEYS:
        np.testing.assert_allclose(scores[key], want[key], rtol=1e-12)
    per_class_iou = [scores["per_class"][f"class_{i}"]["iou"] for i in range(C)]
    np.testing.assert_allclose(per_class_iou, want["iu"], rtol=1e-12)
    assert per_class_iou[3] == 0.0  # predicted, absent from truth: counts as 0
    assert math.isnan(per_class_iou[4])  # absent from both: left out
    assert math.isnan(scores["per_class"]["class_3"]["accuracy"])  # left out of mean acc


def test_hand_computed_example():
    # rows truth, columns prediction
    confusion = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    scores = metrics.segmentation_scores(confusion, ["bg", "cat", "dog"])
    assert scores["pixel_accuracy"] == pytest.approx(5 / 8)
    assert scores["mean_accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    ious = [3 / 4, 2 / 5, 0.0]
    assert scores["mean_iou"] == pytest.approx(sum(ious) / 3)
    assert scores["fw_iou"] == pytest.approx((4 * 3 / 4 + 4 * 2 / 5) / 8)
    assert scores["per_class"]["cat"]["dice"] == pytest.approx(2 * 2 / (4 + 3))
    assert scores["num_pixels"] == 8


def test_confusion_drops_out_of_range_labels_and_predictions():
    labels = jnp.array([[0, 1, 7, -1, 255, 2]])
    preds = jnp.array([[0, 1, 1, 1, 1, 9]])
    confusion = metrics.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(confusion, np.diag([1, 1, 0]))


def test_metric_sums_add_in_int64_past_int32():
    sums = metrics.MetricSums(2)
    step = np.array([[2**30, 0], [0, 2**30]], np.int32)
    for _ in range(3):
        sums.add({"confusion": jnp.asarray(step)})
    assert sums.confusion.dtype == np.int64 and sums.confusion[0, 0] == 3 * 2**30
    assert sums.scores()["num_pixels"] == 6 * 2**30
    assert math.isnan(sums.loss) and sums.count == 3  # no loss was added
    sums.reset()
    assert sums.confusion.sum() == 0 and sums.count == 0
    with pytest.raises(ValueError, match="per-device copies"):
        sums.add({"confusion": np.stack([step] * 4)})
    with pytest.raises(ValueError, match="num_classes"):
        sums.add({"confusion": np.eye(3, dtype=np.int32)})


def test_metric_sums_round_trip_through_json():
    sums = metrics.MetricSums(3)
    sums.add({"loss_sum": np.float32(1.25), "weight_sum": np.float32(10.0),
              "confusion": np.arange(9, dtype=np.int32).reshape(3, 3)})
    sums.add({"loss_sum": np.float32(0.1), "weight_sum": np.float32(3.0),
              "confusion": np.ones((3, 3), np.int32)})
    back = metrics.MetricSums.from_json(3, json.loads(json.dumps(sums.to_json())))
    assert (back.loss_sum, back.weight_sum, back.count) == (sums.loss_sum, sums.weight_sum, 2)
    np.testing.assert_array_equal(back.confusion, sums.confusion)
    assert back.loss == pytest.approx((1.25 + float(np.float32(0.1))) / 13.0)


def test_sum_batches_reads_every_batch_once_one_behind_the_dispatch():
    dispatched, seen = [], []

    def batches():
        for i in range(4):
            dispatched.append(i)
            yield {"confusion": np.full((2, 2), i, np.int32), "loss_sum": float(i),
                   "weight_sum": 1.0}

    def on_batch(count):  # batch `count - 1` is read only once the next one is dispatched
        seen.append((count, len(dispatched)))

    sums = metrics.sum_batches(batches(), 2, on_batch=on_batch)
    assert seen == [(1, 2), (2, 3), (3, 4), (4, 4)]
    assert sums.count == 4 and sums.confusion[0, 0] == 0 + 1 + 2 + 3
    assert sums.loss == pytest.approx(6 / 4)
    assert metrics.sum_batches(iter(()), 2).count == 0


def test_empty_matrix_gives_nan_without_warnings():
    with np.errstate(all="raise"):
        scores = metrics.segmentation_scores(np.zeros((2, 2), np.int64))
    assert all(math.isnan(scores[key]) for key in metrics.SUMMARY_KEYS)


def test_table_and_flat_tags():
    scores = metrics.segmentation_scores(np.array([[3, 1], [0, 4]]), ["background", "membrane"])
    table = metrics.format_scores_table(scores)
    assert "mean IU" in table and "membrane" in table
    assert f"{100 * scores['mean_iou']:6.2f}" in table
    flat = metrics.flatten_scores(scores, prefix="eval/")
    assert flat["eval/iou/membrane"] == pytest.approx(4 / 5)
    assert flat["eval/mean_iou"] == scores["mean_iou"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion_matrix(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4, 3)), 3)
    with pytest.raises(TypeError, match="integer"):
        metrics.confusion_matrix(jnp.zeros((4,), jnp.int32), jnp.zeros((4,)), 3)
    with pytest.raises(ValueError, match="positive"):
        metrics.confusion_matrix(jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32), 0)
    with pytest.raises(ValueError, match="class names"):
        metrics.segmentation_scores(np.eye(3, dtype=int), ["a", "b"])
    with pytest.raises(TypeError, match="integer counts"):
        metrics.segmentation_scores(np.eye(3))
