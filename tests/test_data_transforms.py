"""Joint transforms: the mask stays registered with the image through every step."""

import numpy as np
import pytest

from flaxseg.data import augment_config, transforms
from flaxseg.data.config import IMAGENET_MEAN, IMAGENET_STD

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
