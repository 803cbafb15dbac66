"""Joint transforms: the mask stays registered with the image through every step."""

import numpy as np
import pytest
from scipy import ndimage

from flaxseg.data import augment_config, transforms
from flaxseg.normalization import IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255
# Pixel value that encodes each class; 0 is left for padding.
CLASS_VALUE = 60


def class_coded_example(height=40, width=56, block=8, seed=0):
    """Blocks of random classes 0-3; every image pixel is (class + 1) * CLASS_VALUE."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, size=(height // block + 1, width // block + 1))
    label = np.kron(blocks, np.ones((block, block), int))[:height, :width].astype(np.uint8)
    image = np.repeat(((label + 1) * CLASS_VALUE)[..., None], 3, axis=-1).astype(np.uint8)
    return {"image": image, "label": label}


def decode_class(image):
    """Inverse of the coding above for an image normalised to [0, 1]."""
    return np.rint(image[..., 0] * 255.0 / CLASS_VALUE).astype(int) - 1


def uniform_neighbourhood(label, radius):
    """True where the (2r+1)^2 window around a pixel holds a single label value."""
    h, w = label.shape
    padded = np.pad(label, radius, mode="edge")
    same = np.ones((h, w), bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + h, dx : dx + w] == label
    return same


GEOMETRIC = dict(brightness=0.0, contrast=0.0, saturation=0.0, vflip=True, rot90=True)


@pytest.mark.parametrize("seed", range(12))
def test_mask_stays_aligned_through_scale_crop_flip_rotate(seed):
    example = class_coded_example(block=16, seed=seed)
    augment = augment_config(scale_range=(0.5, 2.0), **GEOMETRIC)
    rng = transforms.example_rng(seed, 0, 0)
    out = transforms.train_transform(example, rng, image_size=(32, 32), augment=augment)
    image, label = out["image"], out["label"]
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert label.shape == (32, 32) and label.dtype == np.int32
    # Padding is exactly where the mask is void, and nowhere else.
    np.testing.assert_array_equal(label == IGNORE, np.all(image == 0, axis=-1))
    # Away from class borders (where bilinear blends neighbours) the image decodes to the mask.
    valid = (label != IGNORE) & uniform_neighbourhood(label, 2)
    assert valid.sum() > 0.1 * valid.size
    np.testing.assert_array_equal(decode_class(image)[valid], label[valid])


def test_without_scaling_every_pixel_matches():
    example = class_coded_example(height=32, width=32)
    augment = augment_config(scale_range=(1.0, 1.0), **GEOMETRIC)
    outs = []
    for seed in range(8):
        rng = transforms.example_rng(seed, 0, 0)
        out = transforms.train_transform(example, rng, image_size=32, augment=augment)
        np.testing.assert_array_equal(decode_class(out["image"]), out["label"])
        outs.append(out["label"])
    # The flips and rotations did something (not all outputs equal the input).
    assert any(not np.array_equal(o, example["label"]) for o in outs)


def test_same_seed_same_output_and_different_seed_differs():
    example = class_coded_example()
    augment = augment_config()
    a = transforms.train_transform(
        example, transforms.example_rng(1, 2, 3), image_size=24, augment=augment
    )
    b = transforms.train_transform(
        example, transforms.example_rng(1, 2, 3), image_size=24, augment=augment
    )
    c = transforms.train_transform(
        example, transforms.example_rng(1, 3, 3), image_size=24, augment=augment
    )
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])


def test_small_image_is_padded_with_ignore_and_mean():
    example = class_coded_example(height=8, width=8)
    augment = augment_config(
        scale_range=(1.0, 1.0),
        hflip=False,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        pad_value="mean",
        normalize="imagenet",
    )
    out = transforms.train_transform(
        example, transforms.example_rng(0, 0, 0), image_size=20, augment=augment
    )
    void = out["label"] == IGNORE
    assert void.sum() == 20 * 20 - 8 * 8
    # Mean padding normalises to exactly zero.
    np.testing.assert_allclose(out["image"][void], 0.0, atol=1e-6)


def test_jitter_changes_values_but_not_geometry():
    example = class_coded_example()
    augment = augment_config(
        scale_range=(1.0, 1.0), hflip=False, brightness=0.3, contrast=0.3, saturation=0.3
    )
    plain = augment_config(
        scale_range=(1.0, 1.0), hflip=False, brightness=0.0, contrast=0.0, saturation=0.0
    )
    size = example["label"].shape
    jittered = transforms.train_transform(
        example, transforms.example_rng(0, 0, 5), image_size=size, augment=augment
    )
    reference = transforms.train_transform(
        example, transforms.example_rng(0, 0, 5), image_size=size, augment=plain
    )
    np.testing.assert_array_equal(jittered["label"], reference["label"])
    assert not np.allclose(jittered["image"], reference["image"])
    assert jittered["image"].min() >= 0.0 and jittered["image"].max() <= 1.0


def test_eval_pad_resize_and_normalisation():
    example = class_coded_example(height=30, width=50)
    # Pad: height grows to 40 (void rows at the bottom); width is centre-cropped to 40.
    out = transforms.eval_transform(example, image_size=40, augment=augment_config())
    np.testing.assert_array_equal(out["label"][:30], example["label"][:, 5:45])
    assert np.all(out["label"][30:] == IGNORE)
    np.testing.assert_allclose(out["image"][:30], example["image"][:, 5:45] / 255.0)
    # Resize: every pixel keeps a class; nearest-neighbour labels stay in the class set.
    out = transforms.eval_transform(
        example, image_size=(15, 25), augment=augment_config(eval_resize="resize")
    )
    assert out["label"].shape == (15, 25)
    assert set(np.unique(out["label"])) <= set(np.unique(example["label"]))
    # ImageNet normalisation: (x / 255 - mean) / std, per channel.
    out = transforms.eval_transform(
        example, image_size=(30, 50), augment=augment_config(normalize="imagenet")
    )
    expected = (example["image"] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(scale_range=(0.0, 1.0)), "scale_range"),
        (dict(scale_range=(2.0, 1.0)), "scale_range"),
        (dict(brightness=1.5), "brightness"),
        (dict(pad_value="edge"), "pad_value"),
        (dict(normalize="zscore"), "normalize"),
        (dict(eval_resize="crop"), "eval_resize"),
        (dict(normalize="custom", mean=(0.5, 0.5), std=(0.5, 0.5)), "mean/std"),
        (dict(normalize="custom", mean=(0.5,), std=(0.0,)), "std must be positive"),
        (dict(normalize="imagenet"), "3-channel"),
        (dict(elastic=True, elastic_grid=1), "elastic_grid"),
        (dict(elastic=True, elastic_sigma=-1.0), "elastic_sigma"),
        (dict(elastic=True, elastic_interpolation="nearest"), "elastic_interpolation"),
    ],
)
def test_bad_augment_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        transforms.validate_augment(augment_config(**overrides), num_channels=1)


def test_unknown_augment_key_and_bad_examples():
    with pytest.raises(ValueError, match="Unknown augment key"):
        augment_config(flip=True)
    example = class_coded_example()
    with pytest.raises(ValueError, match="does not match"):
        transforms.eval_transform(
            {"image": example["image"], "label": example["label"][:4]}, image_size=8
        )
    with pytest.raises(ValueError, match="uint8"):
        transforms.eval_transform(
            {"image": example["image"][..., 0], "label": example["label"]}, image_size=8
        )


# -- elastic deformation (Ronneberger et al. 2015, section 3.1) ------------------------------


def mirror_index(index, size):
    """scipy.ndimage's 'mirror' extension (d c b | a b c d | c b a) of integer indices."""
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index > size - 1, period - index, index)


def reference_field(seed, shape, grid=3, sigma=10.0):
    """The paper's field by direct evaluation: a cubic spline through the grid's vectors at
    every pixel's coordinate on the grid (ndimage.map_coordinates), the same draws."""
    vectors = np.random.default_rng(seed).normal(0.0, sigma, size=(2, grid, grid))
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h) * (grid - 1) / (h - 1), np.arange(w) * (grid - 1) / (w - 1),
                         indexing="ij")
    return vectors, np.stack([ndimage.map_coordinates(v, (yy, xx), order=3, mode="mirror")
                              for v in vectors])


def reference_warp(image, label, field, ignore=IGNORE):
    """Bilinear image with mirrored borders, nearest mask with void outside: plain NumPy."""
    h, w = label.shape
    rows = np.arange(h)[:, None] + field[0]
    cols = np.arange(w)[None, :] + field[1]
    y0, x0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    ty, tx = (rows - y0)[..., None], (cols - x0)[..., None]
    img = image.astype(np.float64)

    def at(y, x):
        return img[mirror_index(y, h), mirror_index(x, w)]

    warped = ((1 - ty) * (1 - tx) * at(y0, x0) + (1 - ty) * tx * at(y0, x0 + 1)
              + ty * (1 - tx) * at(y0 + 1, x0) + ty * tx * at(y0 + 1, x0 + 1))
    ny, nx = np.rint(rows).astype(int), np.rint(cols).astype(int)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    out_label = np.where(inside, label[np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)], ignore)
    return warped, out_label


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_elastic_zero_displacement_is_the_identity(interpolation):
    example = class_coded_example(height=37, width=45)
    example["image"] = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    out = transforms.elastic_deform(example, np.random.default_rng(0), sigma=0.0,
                                    interpolation=interpolation)
    np.testing.assert_array_equal(out["image"], example["image"])
    np.testing.assert_array_equal(out["label"], example["label"])
    assert out["image"].dtype == np.uint8 and out["label"].dtype == np.int32


@pytest.mark.parametrize("shape", [(65, 49), (512, 512)])
def test_elastic_field_is_the_bicubic_interpolant_of_the_grid(shape):
    vectors, expected = reference_field(seed=3, shape=shape)
    field = transforms.elastic_displacement(np.random.default_rng(3), shape)
    assert field.shape == (2, *shape)
    np.testing.assert_allclose(field, expected, rtol=0, atol=1e-9)
    # The 3x3 control points (corners, edge midpoints, centre) carry the drawn vectors.
    h, w = shape
    rows, cols = np.ix_([0, (h - 1) // 2, h - 1], [0, (w - 1) // 2, w - 1])
    if h % 2 and w % 2:
        np.testing.assert_allclose(field[:, rows, cols], vectors, rtol=0, atol=1e-9)


def test_elastic_deform_matches_a_numpy_reference_warp():
    example = class_coded_example(height=48, width=40, block=4, seed=1)
    example["image"] = np.random.default_rng(1).integers(0, 256, (48, 40, 1), dtype=np.uint8)
    out = transforms.elastic_deform(example, np.random.default_rng(7), sigma=6.0)
    _, field = reference_field(seed=7, shape=(48, 40), sigma=6.0)
    image, label = reference_warp(example["image"], example["label"], field)
    # The image is rounded to uint8: within half a grey level of the exact value.
    assert np.abs(out["image"] - image).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(out["label"], label)
    assert (label == IGNORE).any()  # 6 px on a 48 px image pulls some pixels from outside


@pytest.mark.parametrize("seed", range(4))
def test_elastic_mask_keeps_valid_classes_and_stays_registered(seed):
    example = class_coded_example(height=64, width=64, block=16, seed=seed)
    augment = augment_config(elastic=True, scale_range=(0.8, 1.25), **GEOMETRIC)
    out = transforms.train_transform(example, transforms.example_rng(seed, 0, 0),
                                     image_size=(56, 56), augment=augment)
    label = out["label"]
    assert set(np.unique(label)) <= set(np.unique(example["label"])) | {IGNORE}
    valid = (label != IGNORE) & uniform_neighbourhood(label, 2)
    assert valid.sum() > 0.3 * valid.size
    np.testing.assert_array_equal(decode_class(out["image"])[valid], label[valid])


def test_elastic_same_key_same_output():
    example = class_coded_example()
    augment = augment_config(elastic=True)
    runs = [transforms.train_transform(example, transforms.example_rng(1, epoch, 3),
                                       image_size=24, augment=augment) for epoch in (2, 2, 3)]
    np.testing.assert_array_equal(runs[0]["image"], runs[1]["image"])
    np.testing.assert_array_equal(runs[0]["label"], runs[1]["label"])
    assert not np.array_equal(runs[0]["image"], runs[2]["image"])
