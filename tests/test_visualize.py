import numpy as np
import pytest
from PIL import Image

from flaxseg import visualize


def test_default_palette_matches_pascal_voc():
    palette = visualize.default_palette(256)
    assert palette.dtype == np.uint8 and palette.shape == (256, 3)
    # Colours of the published VOC colour map.
    expected = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }
    for index, colour in expected.items():
        assert tuple(palette[index]) == colour
    assert len({tuple(c) for c in palette}) == 256
    assert not (palette == visualize.VOID_COLOR).all(axis=1).any()
    assert not (palette == visualize.SEPARATOR_COLOR).all(axis=1).any()
    np.testing.assert_array_equal(visualize.default_palette(21), palette[:21])


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_default_palette_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        visualize.default_palette(bad)


def test_colorize_maps_classes_and_void():
    palette = visualize.default_palette(3)
    mask = np.array([[0, 1], [2, 255]], np.int32)
    out = visualize.colorize(mask, palette)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], palette[0])
    np.testing.assert_array_equal(out[0, 1], palette[1])
    np.testing.assert_array_equal(out[1, 0], palette[2])
    np.testing.assert_array_equal(out[1, 1], visualize.VOID_COLOR)


def test_colorize_rejects_out_of_palette_and_float_masks():
    palette = visualize.default_palette(2)
    with pytest.raises(ValueError, match=r"outside the palette"):
        visualize.colorize(np.array([[0, 5]]), palette)
    with pytest.raises(ValueError, match="integer class indices"):
        visualize.colorize(np.zeros((2, 2), np.float32), palette)
    with pytest.raises(ValueError, match="palette must have shape"):
        visualize.colorize(np.zeros((2, 2), np.int32), np.zeros((2, 4)))


def test_image_to_uint8_conventions():
    unit = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    np.testing.assert_array_equal(
        visualize.image_to_uint8(unit)[..., 0], np.round(unit * 255).astype(np.uint8)
    )
    # A normalised image (outside [0, 1]) is min-max rescaled for display.
    normalised = np.array([[-2.0, 0.0], [2.0, 1.0]], np.float32)[..., None]
    out = visualize.image_to_uint8(normalised)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 1], [[0, 128], [255, 191]])
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(visualize.image_to_uint8(rgb), rgb)
    with pytest.raises(ValueError, match="shape"):
        visualize.image_to_uint8(np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        visualize.image_to_uint8(np.zeros((2, 2), np.int32))


def test_overlay_blends_and_keeps_void_pixels():
    palette = visualize.default_palette(2)
    image = np.full((2, 2), 0.4, np.float32)
    mask = np.array([[0, 1], [1, 255]])
    out = visualize.overlay(image, mask, palette, alpha=0.25)
    grey = np.round(0.4 * 255)
    np.testing.assert_array_equal(out[0, 1], np.round(0.75 * grey + 0.25 * palette[1]))
    np.testing.assert_array_equal(out[0, 0], np.round(0.75 * grey + 0.25 * palette[0]))
    np.testing.assert_array_equal(out[1, 1], [grey] * 3)
    with pytest.raises(ValueError, match="same height"):
        visualize.overlay(np.zeros((3, 3)), mask, palette)
    with pytest.raises(ValueError, match="alpha"):
        visualize.overlay(image, mask, palette, alpha=1.5)


def test_prediction_grid_layout_and_valid_crop():
    palette = visualize.default_palette(3)
    rng = np.random.default_rng(0)
    images = rng.random((2, 8, 10, 1)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 8, 10))
    preds = labels[:, 1:7, 2:8]  # centre 6x6, as a VALID net would give
    grid = visualize.prediction_grid(images, labels, preds, palette, border=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 8, 3 * 8, 3)
    # Row 1: image | truth | prediction, each cell framed by one separator pixel.
    np.testing.assert_array_equal(grid[9:15, 1:7], visualize.image_to_uint8(images[1, 1:7, 2:8]))
    np.testing.assert_array_equal(
        grid[9:15, 9:15], visualize.colorize(labels[1, 1:7, 2:8], palette)
    )
    np.testing.assert_array_equal(grid[9:15, 17:23], visualize.colorize(preds[1], palette))
    np.testing.assert_array_equal(grid[8, :], np.tile(visualize.SEPARATOR_COLOR, (24, 1)))
    with pytest.raises(ValueError, match="batch size"):
        visualize.prediction_grid(images, labels[:1], preds, palette)
    with pytest.raises(ValueError, match="larger than the images"):
        visualize.prediction_grid(images, labels, np.zeros((2, 9, 9), np.int32), palette)


def test_save_png_round_trip(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = tmp_path / "nested" / "rgb.png"
    visualize.save_png(path, rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), rgb)
    indices = np.array([[0, 1, 2]], np.uint8)
    visualize.save_png(tmp_path / "mask.png", indices)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mask.png")), indices)
    with pytest.raises(ValueError, match="uint8"):
        visualize.save_png(tmp_path / "bad.png", indices.astype(np.int32))


def test_generated_palette_is_distinct_and_no_datasets():
    palette = visualize.generated_palette(64)
    assert palette.shape == (64, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette.tolist()}) == 64
    assert (palette.max(-1) - palette.min(-1) > 40).all()  # no black, white or grey
    voc = {tuple(c) for c in visualize.default_palette(64).tolist()}
    assert not voc & {tuple(c) for c in palette.tolist()}
    colours, source = visualize.palette_or_generated(None, 3)
    assert source == "generated" and (colours == palette[:3]).all()
    assert visualize.palette_or_generated([[1, 2, 3]], 1)[1] == "dataset"
