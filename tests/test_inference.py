import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flaxseg import inference, visualize
from flaxseg.models import Geometry


class PointwiseNet(nn.Module):
    """1x1 convolutions only: each pixel's logits depend on that pixel alone, so the
    net commutes with flips and crops."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (1, 1))(x))
        return nn.Conv(self.num_classes, (1, 1))(x)


class PoolNet(nn.Module):
    """A SAME net with one 2x2 pooling: it needs even sizes, and is not flip-equivariant."""

    num_classes: int = 3

    @nn.nowrap
    def geometry(self):
        return Geometry(stride=2)

    @nn.compact
    def __call__(self, x, train=False):
        if x.shape[1] % 2 or x.shape[2] % 2:
            raise ValueError(f"PoolNet needs even sizes, got {x.shape[1:3]}")
        a = nn.relu(nn.Conv(4, (3, 3))(x))
        b = nn.relu(nn.Conv(4, (3, 3))(nn.max_pool(a, (2, 2), (2, 2))))
        up = jnp.repeat(jnp.repeat(b, 2, axis=1), 2, axis=2)
        return nn.Conv(self.num_classes, (3, 3))(jnp.concatenate([a, up], -1))


class ValidNet(nn.Module):
    """A two-level VALID U-Net in miniature: 3x3 VALID convolutions, 2x2 pooling,
    nearest upsampling and a centre-cropped skip, so the output is the centre of the
    input and depends on the pooling grid, like the paper's net."""

    num_classes: int = 2
    depth: int = 2
    padding: str = "VALID"

    @nn.nowrap
    def geometry(self):
        """Pooling stride 4; the output is the centre (a user's own model declares its
        geometry: here 'padding' only says whether the declaration is true)."""
        if self.padding != "VALID":  # a wrong declaration, for the output-size check
            return Geometry(stride=2**self.depth)
        return Geometry(stride=2**self.depth, output_size=functools.partial(
            _valid_output_size, depth=self.depth))

    @nn.compact
    def __call__(self, x, train=False):
        skips = []
        for _ in range(self.depth):
            x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
            if x.shape[1] % 2 or x.shape[2] % 2:
                raise ValueError(f"odd size {x.shape[1:3]} before pooling")
            skips.append(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        for skip in reversed(skips):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            top, left = (skip.shape[1] - x.shape[1]) // 2, (skip.shape[2] - x.shape[2]) // 2
            skip = skip[:, top : top + x.shape[1], left : left + x.shape[2]]
            x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(jnp.concatenate([skip, x], -1)))
        return nn.Conv(self.num_classes, (1, 1))(x)


def _valid_output_size(size, depth):
    """ValidNet's output size: two-level VALID U-Net arithmetic (3x3 convs eat 2 px)."""
    for _ in range(depth):
        size -= 2
        if size % 2:
            raise ValueError(f"odd size {size} before pooling")
        size //= 2
    size -= 2
    for _ in range(depth):
        size = 2 * size - 2
    return size


def _init(model, channels=1, size=16):
    return model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))


def _fast_variables(model, input_shape, seed=0):
    """Random variables of `model`'s structure without running its initialisers (He
    initialisation draws truncated normals op by op, which is slow on a busy CPU)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return jnp.full(leaf.shape, 1.0 if "var" in name else 0.0, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        scale = np.sqrt(2.0 / fan_in)  # He scale: activations stay O(1) through the net
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _apply(model, variables, images):
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images)))


def test_whole_mode_is_one_forward_pass():
    model = PoolNet()
    variables = _init(model)
    images = _images((3, 12, 10, 1))
    out = inference.predict_logits(model, variables, images, batch_size=2)
    assert out.dtype == np.float32 and out.shape == (3, 12, 10, 3)
    np.testing.assert_allclose(out, _apply(model, variables, images), rtol=1e-5, atol=1e-6)
    single = inference.predict_logits(model, variables, images[1])
    np.testing.assert_allclose(single, out[1], rtol=1e-5, atol=1e-6)


def test_whole_mode_names_a_size_the_model_rejects():
    model = PoolNet()
    with pytest.raises(ValueError, match=r"cannot take an input of 13x10"):
        inference.predict_logits(model, _init(model), _images((1, 13, 10, 1)))


def test_pad_mode_handles_odd_sizes_by_mirroring_and_cropping():
    model = PoolNet()
    variables = _init(model)
    images = _images((2, 13, 11, 1))
    out = inference.predict_logits(model, variables, images, mode="pad")
    assert out.shape == (2, 13, 11, 3)
    # Oracle: 13 -> 14 (0 top, 1 bottom), 11 -> 12 (0 left, 1 right), mirrored.
    padded = np.pad(images, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
    expected = _apply(model, variables, padded)[:, :13, :11]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # A larger multiple pads on both sides: 13 -> 16 (1 top, 2 bottom).
    out8 = inference.predict_logits(model, variables, images, mode="pad", multiple=(8, 2))
    padded = np.pad(images, ((0, 0), (1, 2), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_allclose(
        out8, _apply(model, variables, padded)[:, 1:14, :11], rtol=1e-5, atol=1e-6
    )


def test_sliding_window_with_one_tile_equals_whole_image():
    model = PoolNet()
    variables = _init(model)
    images = _images((2, 12, 10, 1))
    whole = inference.predict_logits(model, variables, images)
    sliding = inference.predict_logits(
        model, variables, images, mode="sliding", tile_size=(12, 10), stride=4
    )
    np.testing.assert_allclose(sliding, whole, rtol=1e-5, atol=1e-6)


def test_sliding_window_covers_odd_sizes_and_averages_overlaps():
    # A pointwise net gives every tile the same logits at a pixel, so any correct
    # coverage and averaging reproduces the whole-image pass.
    model = PointwiseNet()
    variables = _init(model, channels=3)
    images = _images((2, 23, 17, 3))
    whole = inference.predict_logits(model, variables, images)
    for tile, stride in [((8, 6), (5, 4)), ((8, 8), None), ((32, 32), 16)]:
        sliding = inference.predict_logits(
            model, variables, images, mode="sliding", tile_size=tile, stride=stride, batch_size=3
        )
        assert sliding.shape == whole.shape
        np.testing.assert_allclose(sliding, whole, rtol=1e-5, atol=1e-6)


def test_sliding_window_averages_logits_of_overlapping_tiles():
    model = PoolNet()
    variables = _init(model)
    image = _images((1, 6, 4, 1))
    out = inference.predict_logits(
        model, variables, image, mode="sliding", tile_size=(4, 4), stride=2
    )
    # Tiles start at rows 0 and 2: rows 2-3 are the mean of both tiles' logits.
    first = _apply(model, variables, image[:, 0:4])
    second = _apply(model, variables, image[:, 2:6])
    np.testing.assert_allclose(out[:, 0:2], first[:, 0:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out[:, 2:4], (first[:, 2:4] + second[:, 0:2]) / 2, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(out[:, 4:6], second[:, 2:4], rtol=1e-5, atol=1e-6)


def _overlap_tile_padding(images, tile, out, align):
    """The image mirror-padded as the U-Net paper's tiling pads it: by the margin the
    valid convolutions eat, plus enough at the bottom/right for whole stride steps."""
    margin = (tile - out) // 2
    step = out - out % align
    height, width = images.shape[1:3]
    cover_h = math.ceil(max(height - out, 0) / step) * step + out
    cover_w = math.ceil(max(width - out, 0) / step) * step + out
    return np.pad(
        images,
        ((0, 0), (margin, margin + cover_h - height), (margin, margin + cover_w - width), (0, 0)),
        mode="reflect",
    )


@pytest.mark.parametrize("size", [(37, 23), (9, 30), (4, 4)])
def test_overlap_tile_is_seamless(size):
    model = ValidNet()
    variables = _init(model, size=38)
    # 38 -> 36 -> pool 18 -> 16 -> pool 8 -> 6 -> up 12 -> 10 -> up 20 -> 18: every
    # pooling sees an even size. Output tiles (18) step by 16, a multiple of 2**depth.
    tile, out = 38, 18
    assert inference.output_size(model, variables, tile, tile, 1) == (out, out)
    images = _images((2, *size, 1), seed=sum(size))
    logits = inference.predict_logits(
        model, variables, images, mode="overlap_tile", tile_size=tile, batch_size=3
    )
    assert logits.shape == (2, *size, 2)
    # Seamless: the stitched tiles equal one pass over the whole padded image.
    padded = _overlap_tile_padding(images, tile, out, align=4)
    expected = _apply(model, variables, padded)[:, : size[0], : size[1]]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_flip_averaging_leaves_a_flip_equivariant_net_unchanged():
    model = PointwiseNet()
    variables = _init(model, channels=3)
    images = _images((2, 9, 7, 3))
    plain = inference.predict_logits(model, variables, images)
    for mode, kwargs in [("whole", {}), ("sliding", {"tile_size": 4, "stride": 3})]:
        flipped = inference.predict_logits(model, variables, images, mode=mode, flip=True, **kwargs)
        np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)


def test_flip_averaging_means_the_mirrored_prediction():
    model = PoolNet()
    variables = _init(model)
    images = _images((2, 8, 6, 1))
    flipped = inference.predict_logits(model, variables, images, flip=True)
    plain = _apply(model, variables, images)
    mirrored = _apply(model, variables, images[:, :, ::-1])[:, :, ::-1]
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flipped, plain, atol=1e-4)  # the net is not flip-equivariant


def test_overlap_tile_with_flip_stays_seamless():
    model = ValidNet()
    variables = _init(model, size=38)
    images = _images((1, 21, 19, 1))
    tiled = inference.predict_logits(
        model, variables, images, mode="overlap_tile", tile_size=38, flip=True
    )
    padded = _overlap_tile_padding(images, 38, 18, align=4)
    plain = _apply(model, variables, padded)
    mirrored = _apply(model, variables, padded[:, :, ::-1])[:, :, ::-1]
    expected = 0.5 * (plain + mirrored)[:, :21, :19]
    np.testing.assert_allclose(tiled, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_get_clear_errors():
    model = PoolNet()
    variables = _init(model)
    images = _images((1, 8, 8, 1))
    with pytest.raises(ValueError, match="unknown mode"):
        inference.predict_logits(model, variables, images, mode="tiles")
    with pytest.raises(ValueError, match="needs tile_size"):
        inference.predict_logits(model, variables, images, mode="sliding")
    with pytest.raises(ValueError, match="must not exceed tile_size"):
        inference.predict_logits(model, variables, images, mode="sliding", tile_size=4, stride=6)
    with pytest.raises(ValueError, match="must be float"):
        inference.predict_logits(model, variables, images.astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        inference.predict_logits(model, variables, images[0, 0])
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        inference.predict_logits(model, variables, images, mode="sliding", tile_size=(4, 0))
    # A model without a geometry() takes any size: 'pad' pads to a multiple of 1.
    pointwise = PointwiseNet()
    pointwise_vars = _init(pointwise, 1)
    np.testing.assert_array_equal(
        inference.predict_logits(pointwise, pointwise_vars, images, mode="pad"),
        inference.predict_logits(pointwise, pointwise_vars, images))
    valid = ValidNet()
    valid_vars = _init(valid, size=38)
    with pytest.raises(ValueError, match="use mode='overlap_tile'"):
        inference.predict_logits(valid, valid_vars, _images((1, 38, 38, 1)), mode="pad")
    with pytest.raises(ValueError, match="use mode='overlap_tile'"):  # found by its output size
        inference.predict_logits(
            valid.clone(padding="unknown"),
            valid_vars,
            _images((1, 38, 38, 1)),
            mode="pad",
            multiple=2,
        )
    with pytest.raises(ValueError, match="use mode='overlap_tile'"):
        inference.predict_logits(
            valid, valid_vars, _images((1, 38, 38, 1)), mode="sliding", tile_size=38
        )
    with pytest.raises(ValueError, match="cannot take an input of 40x40"):
        inference.predict_logits(
            valid, valid_vars, _images((1, 50, 50, 1)), mode="overlap_tile", tile_size=40
        )


def _write(path, array):
    Image.fromarray(array).save(path)


def test_predict_writes_masks_and_overlays_and_reports_bad_files(tmp_path):
    model = PoolNet(num_classes=3)
    variables = _init(model)
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    _write(inputs / "a.png", grey)
    _write(inputs / "b_rgb.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    _write(inputs / "c_odd.png", rng.integers(0, 256, (13, 9), dtype=np.uint8))
    (inputs / "d_broken.png").write_bytes(b"not a png")
    (inputs / "notes.txt").write_text("not an image, skipped")
    out = tmp_path / "out"

    results = inference.predict(model, variables, inputs, out, num_channels=1)
    assert [r.input_path for r in results] == [
        str(inputs / n) for n in ("a.png", "b_rgb.png", "c_odd.png", "d_broken.png")
    ]
    good, rgb, odd, broken = results
    assert good.ok and good.mask_path == str(out / "masks" / "a.png")
    mask = np.asarray(Image.open(good.mask_path))
    expected = _apply(model, variables, grey[None, :, :, None] / np.float32(255)).argmax(-1)[0]
    np.testing.assert_array_equal(mask, expected)
    overlay = np.asarray(Image.open(good.overlay_path))
    palette = visualize.generated_palette(3)  # no palette given: no dataset's colours
    np.testing.assert_array_equal(overlay, visualize.overlay(grey, mask, palette))
    assert not rgb.ok and "b_rgb.png" in rgb.error and "3 channel(s)" in rgb.error
    assert not odd.ok and "c_odd.png" in odd.error and "13x9" in odd.error
    assert not broken.ok and "d_broken.png" in broken.error
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]

    # Mode 'pad' takes the odd image; a list input and a custom palette work too.
    results = inference.predict(
        model, variables, [inputs / "c_odd.png"], out, mode="pad", palette=palette[::-1]
    )
    assert results[0].ok
    assert np.asarray(Image.open(results[0].mask_path)).shape == (13, 9)


def test_predict_rejects_inputs_it_cannot_name_apart(tmp_path):
    model = PoolNet()
    variables = _init(model)
    for name in ("x.png", "x.jpg"):
        _write(tmp_path / name, np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="share the names"):
        inference.predict(model, variables, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="no image files"):
        inference.predict(model, variables, _empty(tmp_path), tmp_path / "out")
    with pytest.raises(ValueError, match="neither an image file nor a directory"):
        inference.predict(model, variables, tmp_path / "missing.png", tmp_path / "out")


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_overlap_tile_on_the_valid_unet_equals_one_pass_over_the_padded_image():
    from flaxseg.models import create_model, unet_output_size

    # Depth 3: outputs are 4 (mod 8), so output tiles of 12 step by 8 to stay on the
    # pooling grid; stepping by 12 (align=1) would leave seams.
    model = create_model("unet_valid", num_classes=2, features=4, depth=3, dropout_rate=0.0)
    tile = 100
    out = unet_output_size(tile, 3)
    assert out == 12
    variables = _fast_variables(model, (1, tile, tile, 1))
    images = _images((1, 37, 29, 1), seed=3)
    logits = inference.predict_logits(
        model, variables, images, mode="overlap_tile", tile_size=tile, batch_size=8
    )
    padded = _overlap_tile_padding(images, tile, out, align=8)
    expected = _apply(model, variables, padded)[:, :37, :29]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    naive = inference.predict_logits(
        model, variables, images, mode="overlap_tile", tile_size=tile, align=1, batch_size=8
    )
    assert np.abs(naive - expected).max() > 1e-4
    with pytest.raises(ValueError, match="Nearest valid sizes"):
        inference.predict_logits(model, variables, images, mode="overlap_tile", tile_size=99)


def test_same_unet_sliding_with_one_tile_and_pad_mode():
    from flaxseg.models import create_model

    model = create_model("unet", num_classes=3, features=4, depth=2, norm="batch")
    variables = _fast_variables(model, (1, 16, 16, 3))
    assert "batch_stats" in variables
    images = _images((2, 20, 12, 3))
    whole = inference.predict_logits(model, variables, images)
    sliding = inference.predict_logits(model, variables, images, mode="sliding", tile_size=(20, 12))
    np.testing.assert_allclose(sliding, whole, rtol=1e-5, atol=1e-5)
    # 'pad' mirrors to a multiple of 2**depth = 4 (here 20x12 already is one).
    padded = inference.predict_logits(model, variables, images[:, :19, :11], mode="pad")
    mirrored = np.pad(images[:, :19, :11], ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_allclose(
        padded, _apply(model, variables, mirrored)[:, :19, :11], rtol=1e-5, atol=1e-5
    )
