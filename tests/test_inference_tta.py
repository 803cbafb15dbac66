"""The Gaussian-weighted sliding window and multi-scale test-time augmentation."""

from fractions import Fraction

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import random_variables, tiny_model

from flaxseg import inference, tiling


class Pointwise(nn.Module):
    """1x1 convolutions: translation-equivariant with a receptive field of one pixel, so
    every tile predicts exactly what the whole image predicts at its pixels."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(self.num_classes, (1, 1))(nn.relu(nn.Conv(4, (1, 1))(x)))


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.mark.parametrize("tile", [(32, 32), (17, 8), (1, 5)])
def test_gaussian_weights_are_positive_and_peak_at_the_centre(tile):
    weights = tiling.gaussian_weights(tile)
    assert weights.shape == (*tile, 1) and weights.dtype == np.float32
    assert weights.min() > 0  # no pixel a tile covers is left unweighted
    assert weights.max() == 1.0
    np.testing.assert_array_equal(weights, weights[::-1, ::-1])  # mirrored tiles alike
    if tile == (32, 32):  # sigma = tile / 8 = 4 around the centre 15.5 of each axis
        distance = np.arange(32) - 15.5
        profile = np.exp(-0.5 * (distance / 4) ** 2)
        np.testing.assert_allclose(weights[15, :, 0], profile / profile.max(), rtol=1e-6)


def test_gaussian_with_one_tile_is_the_tiles_prediction():
    model = tiny_model("unet")
    variables = random_variables(model, (1, 32, 32, 3))
    images = _images((2, 32, 32, 3))
    whole = inference.predict_logits(model, variables, images)
    gaussian = inference.predict_logits(model, variables, images, mode="gaussian",
                                        tile_size=32)
    np.testing.assert_allclose(gaussian, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.5, 0.75])
def test_gaussian_stitching_equals_the_whole_image_for_an_equivariant_net(overlap):
    model = Pointwise()
    variables = random_variables(model, (1, 8, 8, 3))
    images = _images((2, 37, 22, 3), seed=1)
    whole = inference.predict_logits(model, variables, images)
    stitched = inference.predict_logits(model, variables, images, mode="gaussian",
                                        tile_size=(16, 8), overlap=overlap, tile_batch=3)
    np.testing.assert_allclose(stitched, whole, rtol=1e-5, atol=1e-6)


def test_gaussian_weighs_tile_centres_above_tile_borders():
    # Two tiles over rows 0-7 and 4-11: at row 5 the first tile sees the pixel near its
    # centre, the second near its border, so the blend leans towards the first.
    model = tiny_model("unet")
    variables = random_variables(model, (1, 8, 8, 3), seed=2)
    image = _images((1, 12, 8, 3), seed=2)
    out = inference.predict_logits(model, variables, image, mode="gaussian", tile_size=8)
    first = inference.predict_logits(model, variables, image[:, :8])
    second = inference.predict_logits(model, variables, image[:, 4:])
    w = tiling.gaussian_weights((8, 8))[:, 0, 0]
    expect = (w[5] * first[:, 5] + w[1] * second[:, 1]) / (w[5] + w[1])
    np.testing.assert_allclose(out[:, 5], expect, rtol=1e-5, atol=1e-5)
    uniform = inference.predict_logits(model, variables, image, mode="sliding", tile_size=8)
    np.testing.assert_allclose(uniform[:, 5], (first[:, 5] + second[:, 1]) / 2,
                               rtol=1e-5, atol=1e-5)


def test_scaled_sizes_round_half_up_to_the_multiple():
    assert tiling.scaled_size(37, Fraction(3, 4)) == 28  # 27.75
    assert tiling.scaled_size(10, Fraction(1, 4)) == 3  # 2.5 rounds up
    assert tiling.scaled_size(64, Fraction(3, 4), multiple=8) == 48
    assert tiling.scaled_size(36, Fraction(1, 2), multiple=8) == 16  # 18 -> 16
    assert tiling.scaled_size(3, Fraction(1, 8), multiple=4) == 4  # at least one step
    assert inference.parse_scales([0.5, 1, 1.75]) == (Fraction(1, 2), 1, Fraction(7, 4))
    with pytest.raises(ValueError, match="positive"):
        inference.parse_scales([1.0, -0.5])


def test_multi_scale_averages_the_logits_resized_back():
    model = tiny_model("unet")
    variables = random_variables(model, (1, 32, 32, 3), seed=3)
    images = _images((2, 32, 32, 3), seed=3)
    plain = inference.predict_logits(model, variables, images)
    np.testing.assert_allclose(
        inference.predict_logits(model, variables, images, scales=[1.0]), plain)
    out = inference.predict_logits(model, variables, images, scales=[0.5, 1.0])
    # Oracle: JAX's own bilinear resize (half-pixel centres, no antialiasing).
    small = jax.image.resize(images, (2, 16, 16, 3), "linear", antialias=False)
    back = jax.image.resize(inference.predict_logits(model, variables, np.asarray(small)),
                            (2, 32, 32, 3), "linear", antialias=False)
    np.testing.assert_allclose(out, (plain + np.asarray(back)) / 2, rtol=1e-4, atol=1e-5)


def test_bad_tiling_options_get_clear_errors():
    model = tiny_model("unet")
    variables = random_variables(model, (1, 32, 32, 3))
    images = _images((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"overlap must lie in \[0, 1\)"):
        inference.predict_logits(model, variables, images, mode="gaussian", tile_size=16,
                                 overlap=1.0)
    with pytest.raises(ValueError, match="tile_batch must be a positive int"):
        inference.predict_logits(model, variables, images, mode="gaussian", tile_size=16,
                                 tile_batch=0)
    valid = tiny_model("unet_valid")
    with pytest.raises(ValueError, match="use mode='overlap_tile'"):
        inference.predict_logits(valid, None, images, mode="gaussian", tile_size=16)
