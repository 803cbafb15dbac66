"""Losses against NumPy oracles written from the formulas; ignore handling; sum-form exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import losses

C = 4
IGNORE = 255


def _inputs(seed=0, shape=(3, 5, 6)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, C)).astype(np.float32) * 3
    labels = rng.integers(0, C, size=shape).astype(np.int32)
    labels[rng.random(shape) < 0.25] = IGNORE
    return logits, labels


def _np_log_softmax(logits):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_cross_entropy(logits, labels, weights=None, smoothing=0.0):
    """Weighted-mean CE over valid pixels, pixel by pixel."""
    logp = _np_log_softmax(logits)
    weights = np.ones(C) if weights is None else np.asarray(weights, np.float64)
    total, norm = 0.0, 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == IGNORE or not 0 <= y < C:
            continue
        target = np.full(C, smoothing / C)
        target[y] += 1.0 - smoothing
        total += weights[y] * -(target * logp[idx]).sum()
        norm += weights[y]
    return total / norm


def _np_focal(logits, labels, gamma, weights=None):
    logp = _np_log_softmax(logits)
    weights = np.ones(C) if weights is None else np.asarray(weights, np.float64)
    total, norm = 0.0, 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == IGNORE:
            continue
        pt = np.exp(logp[idx][y])
        total += weights[y] * -((1 - pt) ** gamma) * np.log(pt)
        norm += weights[y]
    return total / norm


def _np_dice(logits, labels, smooth=1.0):
    """Per-image soft Dice, images weighted by valid-pixel count."""
    probs = np.exp(_np_log_softmax(logits))
    total, norm = 0.0, 0.0
    for b in range(labels.shape[0]):
        valid = labels[b] != IGNORE
        p = probs[b][valid]  # [N, C]
        g = np.eye(C)[labels[b][valid]]
        dice = (2 * (p * g).sum(0) + smooth) / (p.sum(0) + g.sum(0) + smooth)
        total += valid.sum() * (1 - dice.mean())
        norm += valid.sum()
    return total / norm


def test_cross_entropy_matches_numpy_with_ignore_weights_and_smoothing():
    logits, labels = _inputs()
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels), _np_cross_entropy(logits, labels), rtol=1e-5
    )
    weights = [0.5, 2.0, 1.0, 3.0]
    np.testing.assert_allclose(
        losses.cross_entropy(logits, labels, class_weights=weights, label_smoothing=0.1),
        _np_cross_entropy(logits, labels, weights, 0.1),
        rtol=1e-5,
    )


def test_focal_matches_numpy_and_reduces_to_cross_entropy_at_gamma_0():
    logits, labels = _inputs(1)
    np.testing.assert_allclose(
        losses.focal_loss(logits, labels, gamma=2.0, class_weights=[1, 2, 3, 4]),
        _np_focal(logits, labels, 2.0, [1, 2, 3, 4]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        losses.focal_loss(logits, labels, gamma=0.0),
        losses.cross_entropy(logits, labels),
        rtol=1e-6,
    )


def test_dice_matches_numpy_and_is_near_zero_for_perfect_logits():
    logits, labels = _inputs(2)
    np.testing.assert_allclose(
        losses.dice_loss(logits, labels), _np_dice(logits, labels), rtol=1e-5
    )
    perfect = 50.0 * np.eye(C, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
    assert float(losses.dice_loss(perfect, labels)) < 1e-5


def _np_cross_entropy_grad(logits, labels, weights, smoothing):
    """d(weighted-mean CE)/d(logits): w_i (softmax_i - target_i) / sum(w), 0 where ignored."""
    probs = np.exp(_np_log_softmax(logits))
    grad, norm = np.zeros_like(probs), 0.0
    for idx in np.ndindex(labels.shape):
        y = labels[idx]
        if y == IGNORE:
            continue
        target = np.full(C, smoothing / C)
        target[y] += 1.0 - smoothing
        grad[idx] = weights[y] * (probs[idx] - target)
        norm += weights[y]
    return grad / norm


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient_matches_numpy_in_both_modes(smoothing):
    """The hand-written derivative (no gather, no scatter) against the formula, by
    reverse and by forward mode."""
    logits, labels = _inputs(8)
    weights = [0.5, 2.0, 1.0, 3.0]

    def loss(x):
        return losses.cross_entropy(x, labels, class_weights=weights, label_smoothing=smoothing)

    want = _np_cross_entropy_grad(logits, labels, weights, smoothing)
    grad = jax.jit(jax.grad(loss))(logits)
    # Each entry is w (p - t) / sum(w), p and t in [0, 1] computed in float32 (a few ulps
    # of 1): within 1e-6 * max(w) / sum(w), on any CPU.
    scale = max(weights) / sum(weights[y] for y in labels[labels != IGNORE])
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6 * scale)
    direction = np.random.default_rng(9).normal(size=logits.shape).astype(np.float32)
    _, tangent = jax.jvp(loss, (logits,), (direction,))
    np.testing.assert_allclose(tangent, np.sum(want * direction), rtol=1e-5)
    focal_grad = jax.grad(lambda x: losses.focal_loss(x, labels, gamma=0.0))(logits)
    np.testing.assert_allclose(focal_grad, _np_cross_entropy_grad(logits, labels, [1] * C, 0.0),
                               rtol=0, atol=1e-6 / np.sum(labels != IGNORE))


@pytest.mark.parametrize("num_classes", [1, 4, 21])
def test_class_axis_reductions_agree_on_every_platform_path(num_classes):
    """CPU runs the class-plane form, GPU/TPU the reductions; both give the same parts."""
    rng = np.random.default_rng(num_classes)
    logits = (rng.normal(size=(2, 3, 5, num_classes)) * 4).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(2, 3, 5)).astype(np.int32)
    planes = losses._unrolled_parts(jnp.asarray(logits), jnp.asarray(labels))
    reduced = losses._reduced_parts(jnp.asarray(logits), jnp.asarray(labels))
    log_sum = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    # Sums of <= 21 float32 terms in two orders: within 21 ulps of the largest term.
    for got in (planes, reduced):
        np.testing.assert_allclose(got[0], log_sum, rtol=0, atol=4e-6 * np.abs(log_sum).max())
        np.testing.assert_array_equal(got[1], picked)
        np.testing.assert_allclose(got[2], logits.astype(np.float64).sum(-1), rtol=0,
                                   atol=21 * 6e-8 * np.abs(logits).sum(-1).max())


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_sum_form_is_exact_across_splits(name):
    """(sum, weight) over two halves gives the full batch's mean: no mean of means."""
    logits, labels = _inputs(3, shape=(4, 6, 6))
    labels[:2, :, :4] = IGNORE  # uneven ignore counts between the halves
    fn = losses.get_loss_fn(name, class_weights=[1.0, 2.0, 0.5, 1.0])
    full_sum, full_weight = fn(logits, labels)
    parts = [fn(logits[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(sum(p[0] for p in parts), full_sum, rtol=1e-5)
    np.testing.assert_allclose(sum(p[1] for p in parts), full_weight, rtol=1e-6)
    assert full_sum.dtype == jnp.float32 and full_weight.dtype == jnp.float32


def test_ce_dice_is_the_sum_of_its_terms():
    logits, labels = _inputs(4)
    total, weight = losses.get_loss_fn("ce_dice", dice_weight=0.5)(logits, labels)
    expected = losses.cross_entropy(logits, labels) + 0.5 * losses.dice_loss(logits, labels)
    np.testing.assert_allclose(total / weight, expected, rtol=1e-5)


def test_bfloat16_logits_give_float32_loss():
    logits, labels = _inputs(5)
    loss = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, losses.cross_entropy(logits, labels), rtol=2e-2)


def test_out_of_range_labels_inside_jit_are_ignored_not_crashing():
    logits, labels = _inputs(6)
    bad = labels.copy()
    bad[0, 0, :3] = [7, -1, 254]
    masked = labels.copy()
    masked[0, 0, :3] = IGNORE
    for name in losses.LOSS_NAMES:
        fn = jax.jit(losses.get_loss_fn(name))
        got, want = fn(logits, bad), fn(logits, masked)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert np.isfinite(got[0])
    grad = jax.grad(lambda x: losses.cross_entropy(x, bad))(logits)
    assert np.all(np.asarray(grad)[0, 0, :3] == 0) and np.isfinite(grad).all()


def test_all_ignored_gives_zero_loss_and_zero_gradient():
    logits, labels = _inputs(7)
    labels[...] = IGNORE
    assert float(losses.cross_entropy(logits, labels)) == 0.0
    grad = jax.grad(lambda x: losses.dice_loss(x, labels))(logits)
    assert float(jnp.abs(grad).max()) == 0.0


def test_bad_inputs_raise_clear_errors():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="Unknown loss"):
        losses.get_loss_fn("hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.get_loss_fn("dice", label_smoothing=0.1)
    with pytest.raises(ValueError, match="class_weights"):
        losses.get_loss_fn("cross_entropy", class_weights=[0, 0, 0, 0])
    with pytest.raises(ValueError, match="one weight per class"):
        losses.cross_entropy(logits, labels, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="center_crop"):
        losses.cross_entropy(logits, labels[:, 1:])
    with pytest.raises(TypeError, match="integer"):
        losses.cross_entropy(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(logits, labels, label_smoothing=1.0)
