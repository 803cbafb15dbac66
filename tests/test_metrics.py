"""Metrics against a NumPy oracle of the FCN paper's score.py: ignore pixels, absent classes."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from skimage import metrics as skmetrics

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


# -- the ISBI 2012 challenge's pixel and Rand errors, against scikit-image -------------------

MEMBRANE, INTERIOR = 0, 1


def _membrane_map(seed, shape=(48, 64), membrane_fraction=0.3, smooth=2.5):
    """Cells (1) separated by membrane (0): thresholded smooth noise, or pixel noise."""
    noise = np.random.default_rng(seed).normal(size=shape)
    if smooth:
        noise = ndimage.gaussian_filter(noise, smooth)
    return (noise > np.quantile(noise, membrane_fraction)).astype(np.int32)


def _skimage_segments(binary_map, singletons):
    """4-connected cells numbered from 1 (scikit-image); membrane 0, or each membrane pixel
    a segment of its own (the prediction's membrane inside the truth's cells)."""
    segments = measure.label(binary_map == INTERIOR, connectivity=1)
    if singletons:
        membrane = segments == 0
        segments[membrane] = segments.max() + 1 + np.arange(membrane.sum())
    return segments


def _skimage_rand(truth, pred):
    """(adapted Rand error as scikit-image defines it, the challenge's N^2 Rand error) from
    scikit-image's segments and contingency table."""
    truth_segments = _skimage_segments(truth, singletons=False)
    pred_segments = _skimage_segments(pred, singletons=True)
    adapted = skmetrics.adapted_rand_error(truth_segments, pred_segments, ignore_labels=(0,))[0]
    table = skmetrics.contingency_table(truth_segments, pred_segments, ignore_labels=(0,),
                                        sparse_type="array").toarray()
    both, rows, cols = (table**2).sum(), table.sum(1), table.sum(0)
    return adapted, 1.0 - 2.0 * both / (rows @ rows + cols @ cols)


def _isbi(truth, pred):
    confusion = np.asarray(metrics.confusion_matrix(jnp.asarray(truth), jnp.asarray(pred), 2))
    counts = metrics.rand_pair_counts(truth, pred, MEMBRANE)
    return metrics.isbi_errors(confusion, counts, MEMBRANE), counts


def _pixel_error_oracle(truth, pred):
    tp = np.sum((truth == INTERIOR) & (pred == INTERIOR))
    fp = np.sum((truth == MEMBRANE) & (pred == INTERIOR))
    fn = np.sum((truth == INTERIOR) & (pred == MEMBRANE))
    return 1.0 - 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize(
    "truth_seed, pred_seed, smooth",
    [(0, 0, 2.5), (0, 1, 2.5), (2, 3, 1.5), (4, 5, 0.0), (6, 6, 4.0)],
)
def test_isbi_errors_match_scikit_image(truth_seed, pred_seed, smooth):
    truth = _membrane_map(truth_seed, smooth=smooth)
    pred = _membrane_map(pred_seed, smooth=smooth, membrane_fraction=0.25)
    if truth_seed == pred_seed:  # a near miss: the truth with 3% of its pixels flipped
        pred = truth ^ (np.random.default_rng(9).random(truth.shape) < 0.03)
    errors, counts = _isbi(truth, pred)
    adapted, rand_n2 = _skimage_rand(truth, pred)
    assert errors["rand_error"] == pytest.approx(rand_n2, rel=1e-12, abs=1e-15)
    # The same counts, with distinct pairs only (minus each pixel with itself): scikit-image's.
    both, in_truth, in_pred, n = (float(c) for c in counts)
    distinct = 1.0 - (both - n) / (0.5 * (in_truth - n) + 0.5 * (in_pred - n))
    assert distinct == pytest.approx(adapted, rel=1e-12, abs=1e-15)
    assert n == np.sum(truth == INTERIOR)
    assert errors["pixel_error"] == pytest.approx(_pixel_error_oracle(truth, pred), rel=1e-12)


def test_rand_counts_add_over_slices_like_one_image_of_them_side_by_side():
    truths = [_membrane_map(s) for s in range(3)]
    preds = [_membrane_map(s + 10, membrane_fraction=0.2) for s in range(3)]
    summed = sum(metrics.rand_pair_counts(t, p, MEMBRANE)
                 for t, p in zip(truths, preds, strict=True))
    # A membrane column between slices keeps their cells apart in both maps.
    gap = np.zeros((truths[0].shape[0], 1), np.int32)
    truth = np.concatenate([truths[0], gap, truths[1], gap, truths[2]], axis=1)
    pred = np.concatenate([preds[0], gap, preds[1], gap, preds[2]], axis=1)
    np.testing.assert_array_equal(summed, metrics.rand_pair_counts(truth, pred, MEMBRANE))
    assert metrics.isbi_errors(np.eye(2, dtype=int), summed, MEMBRANE)["rand_error"] == (
        pytest.approx(_skimage_rand(truth, pred)[1], rel=1e-12))


def _two_cells(size=10):
    """Two size x size cells side by side, a 1-pixel membrane between them and around."""
    truth = np.zeros((size + 2, 2 * size + 3), np.int32)
    truth[1:-1, 1 : size + 1] = INTERIOR
    truth[1:-1, size + 2 : -1] = INTERIOR
    return truth


def test_isbi_errors_hand_computed():
    truth = _two_cells(size=10)  # cells of a = 100 pixels, a membrane line of 10 between
    errors, _ = _isbi(truth, truth)
    assert errors == {"pixel_error": 0.0, "rand_error": 0.0}
    # A merge: the line between the cells predicted as interior. Pairs together: truth
    # 2 a^2, prediction (2a)^2 -> Rand F = 2 * 2a^2 / (2a^2 + 4a^2) = 2/3.
    merged = truth.copy()
    merged[1:-1, 11] = INTERIOR
    errors, counts = _isbi(truth, merged)
    np.testing.assert_array_equal(counts, [2 * 100**2, 2 * 100**2, 200**2, 200])
    assert errors["rand_error"] == pytest.approx(1 / 3, rel=1e-12)
    assert errors["pixel_error"] == pytest.approx(1 - 2 * 200 / (2 * 200 + 10), rel=1e-12)
    # A split: a membrane line through the second cell; its 10 pixels are singletons, the
    # parts hold 40 and 50 pixels: together in both 40^2 + 50^2 + 100^2 (first cell) + 10.
    split = truth.copy()
    split[1:-1, 17] = MEMBRANE
    both = 50**2 + 40**2 + 100**2 + 10
    errors, counts = _isbi(truth, split)
    np.testing.assert_array_equal(counts, [both, 2 * 100**2, both, 200])
    assert errors["rand_error"] == pytest.approx(1 - 2 * both / (2 * 100**2 + both))
    # Everything membrane: each counted pixel alone.
    errors, counts = _isbi(truth, np.zeros_like(truth))
    np.testing.assert_array_equal(counts, [200, 2 * 100**2, 200, 200])
    assert errors["pixel_error"] == 1.0


def test_void_truth_pixels_are_left_out_of_the_rand_counts():
    truth = _two_cells(size=10)
    pred = truth.copy()
    pred[1:-1, 11] = INTERIOR  # merged
    voided = truth.copy()
    voided[1:-1, 12:-1] = IGNORE  # the second cell is void: nothing left to merge
    counts = metrics.rand_pair_counts(voided, pred, MEMBRANE, ignore_index=IGNORE)
    np.testing.assert_array_equal(counts, [100**2, 100**2, 100**2, 100])


def test_isbi_bad_inputs_and_table():
    with pytest.raises(ValueError, match="membrane_class must be .* in \\[0, 2\\)"):
        metrics.isbi_errors(np.eye(2, dtype=int), np.zeros(4, int), membrane_class=2)
    with pytest.raises(ValueError, match="membrane_class"):
        metrics.check_membrane_class("0", 2)
    with pytest.raises(ValueError, match="one \\[H, W\\] slice"):
        metrics.rand_pair_counts(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), MEMBRANE)
    nothing = metrics.isbi_errors(np.zeros((2, 2), int), np.zeros(4, int), MEMBRANE)
    assert all(math.isnan(v) for v in nothing.values())
    truth = _two_cells()
    scores = metrics.segmentation_scores(np.eye(2, dtype=int))
    scores.update(_isbi(truth, truth)[0])
    table = metrics.format_scores_table(scores)
    assert "pixel error   Rand error" in table and "   0.000000     0.000000" in table


def test_isbi_errors_on_the_real_slices_match_scikit_image(isbi_dir):
    from flaxseg.data import create_source, dataset_config

    source = create_source(dataset_config("isbi2012", path=isbi_dir), "val")
    for index in range(2):
        truth = source[index]["label"].astype(np.int32)
        # A plausible prediction: membranes 1 px thicker (cells shrink, thin ones split),
        # and 1% of the pixels flipped.
        pred = np.where(ndimage.binary_dilation(truth == MEMBRANE), MEMBRANE, INTERIOR)
        pred ^= np.random.default_rng(index).random(truth.shape) < 0.01
        errors, _ = _isbi(truth, pred)
        assert errors["rand_error"] == pytest.approx(_skimage_rand(truth, pred)[1], rel=1e-12)
        assert errors["pixel_error"] == pytest.approx(_pixel_error_oracle(truth, pred), rel=1e-12)
        assert 0.0 < errors["rand_error"] < 1.0 and 0.0 < errors["pixel_error"] < 1.0


def _oracle_band(labels, width):
    """Boundary pixels by shifted comparisons (the border replicated, so it is no
    boundary), dilated with scipy by a (2w-1)-square, image by image."""
    out = np.zeros(labels.shape, bool)
    for index in np.ndindex(labels.shape[:-2]):
        lab = np.pad(labels[index], 1, mode="edge")
        centre = lab[1:-1, 1:-1]
        edge = ((lab[:-2, 1:-1] != centre) | (lab[2:, 1:-1] != centre)
                | (lab[1:-1, :-2] != centre) | (lab[1:-1, 2:] != centre))
        out[index] = ndimage.binary_dilation(edge, np.ones((2 * width - 1,) * 2, bool))
    return out


@pytest.mark.parametrize("width", [1, 2, 4])
def test_boundary_band_is_the_dilated_label_boundary(width):
    rng = np.random.default_rng(width)
    # Blocky labels (few boundaries, wide bands fit) with void pixels, two batch axes.
    labels = np.kron(rng.integers(0, 3, (2, 3, 5, 6)), np.ones((4, 3), np.int64))
    labels[rng.random(labels.shape) < 0.02] = IGNORE
    band = jax.jit(metrics.boundary_band, static_argnums=1)(jnp.asarray(labels), width)
    assert band.dtype == jnp.bool_ and band.shape == labels.shape
    np.testing.assert_array_equal(np.asarray(band), _oracle_band(labels, width))
    assert 0 < band.mean() < 1


def test_boundary_band_of_a_square_and_its_trimap_score():
    labels = np.zeros((1, 12, 12), np.int32)
    labels[0, 4:8, 4:8] = 1
    band = np.asarray(metrics.boundary_band(labels, 1))[0]
    # The square's outline inside and out (no corners outside: 4-neighbours).
    assert band.sum() == 12 + 16 and band[4:8, 4:8].sum() == 12 and not band[5:7, 5:7].any()
    wide = np.asarray(metrics.boundary_band(labels, 2))[0]
    # Within 1 of the outline: the 8x8 block less its 4 far corners.
    assert wide[2:10, 2:10].sum() == wide.sum() == 60 and not wide[2, 2]
    assert not metrics.boundary_band(np.zeros((5, 5), np.int32), 3).any()
    # A prediction one pixel too wide (4-neighbours) is wrong only inside the band.
    preds = labels.copy()
    preds[0][band & (labels[0] == 0)] = 1
    inside, outside = (metrics.segmentation_scores(metrics.confusion_matrix(
        jnp.where(mask, labels, IGNORE), jnp.asarray(preds), 2))["mean_iou"]
        for mask in (band, ~band))
    assert outside == 1.0
    assert inside == pytest.approx((0 / 16 + 12 / 28) / 2)  # background, square


@pytest.mark.parametrize("labels, width, message", [
    (np.zeros((4, 4), np.int32), 0, "positive Python int"),
    (np.zeros((4, 4), np.int32), 1.5, "positive Python int"),
    (np.zeros((4, 4), np.float32), 1, "integer"),
    (np.zeros((4,), np.int32), 1, "integer \\[..., H, W\\]"),
])
def test_boundary_band_refuses_bad_inputs(labels, width, message):
    with pytest.raises(ValueError, match=message):
        metrics.boundary_band(labels, width)


def test_trimap_confusions_and_scores_count_each_band_and_the_rest():
    rng = np.random.default_rng(7)
    labels = np.kron(rng.integers(0, C, (3, 6, 6)), np.ones((3, 3), np.int64))
    labels[rng.random(labels.shape) < 0.05] = IGNORE
    preds = np.where(rng.random(labels.shape) < 0.8, labels, rng.integers(0, C, labels.shape))
    preds[preds == IGNORE] = 0
    widths = (1, 2)
    bands = jax.jit(metrics.trimap_confusions, static_argnums=(2, 3, 4))(
        jnp.asarray(labels), jnp.asarray(preds), C, widths, IGNORE)
    assert bands.shape == (2, C, C) and bands.dtype == jnp.int32
    total = metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), C, IGNORE)
    scores = metrics.trimap_scores(total, bands, widths)
    for i, width in enumerate(widths):
        band = _oracle_band(labels, width)
        np.testing.assert_array_equal(np.asarray(bands[i]),
                                      _oracle_hist(labels[band], preds[band], C))
        outside = _oracle_scores(_oracle_hist(labels[~band], preds[~band], C))
        assert scores[width]["outside"]["mean_iou"] == pytest.approx(outside["mean_iou"],
                                                                  abs=1e-12)
        assert (scores[width]["band"]["num_pixels"] + scores[width]["outside"]["num_pixels"]
                == int(np.asarray(total).sum()))
    table = metrics.format_scores_table({**metrics.segmentation_scores(total), "trimap": scores})
    assert "trimap: pixels within w px of a label boundary" in table
    assert len(table.splitlines()) == len(metrics.format_scores_table(
        metrics.segmentation_scores(total)).splitlines()) + 5
    with pytest.raises(ValueError, match="band confusions"):
        metrics.trimap_scores(total, bands[:1], widths)


@pytest.mark.parametrize("widths", [(), (0,), (1, 1), (2.0,), (True,)])
def test_trimap_refuses_widths_that_are_not_distinct_positive_ints(widths):
    with pytest.raises(ValueError, match="distinct positive ints"):
        metrics.check_trimap_widths(widths)
