"""The on-device augmentation (flaxseg.data.augment) against the host transforms.

The device and the host draw different random numbers, so they are compared as
distributions: scale, crop placement, flips, colour, the elastic field's size. Geometry is
read back from a coordinate-coded image (channel 0 = 4 x row, channel 1 = 4 x column; a
bilinear resampling of a linear ramp is the ramp at the source point), so each output says
where it came from. Every statistical bound below is a fixed, seeded computation (no flakes).
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from scipy import stats
from test_data_transforms import class_coded_example, decode_class, uniform_neighbourhood

from flaxseg.data import augment, augment_config, transforms
from flaxseg.normalization import IMAGENET_MEAN, IMAGENET_STD
from flaxseg.train.parallel import DataParallel

SOURCE = 64  # coordinate-coded source images are SOURCE x SOURCE
CROP = 32
N = 256  # examples per statistical comparison
STILL = dict(brightness=0.0, contrast=0.0, saturation=0.0, hflip=False)


def coordinate_example(size=SOURCE, step=4):
    rows, cols = np.mgrid[:size, :size]
    image = np.stack([step * rows, step * cols, np.full_like(rows, 128)], -1).astype(np.uint8)
    return {"image": image, "label": np.ones((size, size), np.uint8)}


def host_batch(examples, augment_cfg, crop=CROP):
    """The host side of the pipeline for `examples` (epoch 0, index i)."""
    canvas = transforms.canvas_size(augment_cfg, examples[0]["label"].shape)
    fitted = [transforms.fit_to_canvas(e, canvas, ignore_index=255, label_type=np.uint8)
              for e in examples]
    batch = {k: np.stack([f[k] for f in fitted]) for k in fitted[0]}
    batch["epoch"] = np.zeros(len(examples), np.int32)
    batch["index"] = np.arange(len(examples), dtype=np.int32)
    return batch


@functools.cache
def _compiled(augment_json: str, crop: int):
    cfg = ml_collections.ConfigDict(__import__("json").loads(augment_json))
    return jax.jit(augment.train_fn(cfg, seed=0, image_size=crop, ignore_index=255))


def device_outputs(example, augment_cfg, n=N, crop=CROP):
    """`n` device augmentations of one example: (float32 images, int32 labels)."""
    out = _compiled(augment_cfg.to_json(), crop)(host_batch([example] * n, augment_cfg, crop))
    return np.asarray(out["image"]), np.asarray(out["label"])


def host_outputs(example, augment_cfg, n=N, crop=CROP):
    outs = [transforms.train_transform(example, transforms.example_rng(0, 0, i),
                                       image_size=crop, augment=augment_cfg)
            for i in range(n)]
    return np.stack([o["image"] for o in outs]), np.stack([o["label"] for o in outs])


def _slopes(images):
    """Per example: (source rows per output row, source columns per output column), from
    the coded ramps between a quarter and three quarters of the crop (away from edges)."""
    lo, hi = CROP // 4, 3 * CROP // 4
    codes = images * 255.0 / 4.0  # 'unit' normalisation: back to source coordinates
    dy = (codes[:, hi, :, 0] - codes[:, lo, :, 0]).mean(axis=1) / (hi - lo)
    dx = (codes[:, :, hi, 1] - codes[:, :, lo, 1]).mean(axis=1) / (hi - lo)
    return dy, dx


# -- geometry -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled():
    """Scale 0.5-2 and flips (no jitter), host and device."""
    cfg = augment_config(scale_range=(0.5, 2.0), vflip=True, **{**STILL, "hflip": True})
    return host_outputs(coordinate_example(), cfg), device_outputs(coordinate_example(), cfg)


def test_scale_is_log_uniform_on_host_and_device(scaled):
    # Source 64 >= crop 32 / scale: no padding; 1 / |slope| is the scale. The rounded
    # sizes and the ramp's uint8 rounding move the log-scale by < 0.02: KS D < 0.1.
    for images, _ in scaled:
        dy, dx = _slopes(images)
        np.testing.assert_allclose(np.abs(dy), np.abs(dx), rtol=0.05)
        log_scale = -np.log(np.abs(dy))
        uniform = stats.uniform(loc=np.log(0.5), scale=np.log(4.0))
        assert stats.kstest(log_scale, uniform.cdf).statistic < 0.1


def test_flip_rates_are_one_half(scaled):
    # Binomial(256, 0.5): 4 standard deviations are 0.125.
    for images, _ in scaled:
        dy, dx = _slopes(images)
        assert abs(np.mean(dy < 0) - 0.5) < 0.125 and abs(np.mean(dx < 0) - 0.5) < 0.125


def test_crop_placement_is_uniform(scaled):
    # Where the window starts, relative to the room it has: uniform in [0, 1] (mean 1/2,
    # standard error 0.29 / 16 = 0.018; 4 of them: 0.075), on host and device alike.
    for images, _ in scaled:
        dy, _ = _slopes(images)
        codes = images[..., 0] * 255.0 / 4.0
        first = np.where(dy > 0, codes[:, 0].mean(1), codes[:, -1].mean(1))
        window = CROP * np.abs(dy)
        room = SOURCE - window
        relative = (first + 0.5 - np.abs(dy) / 2) / np.maximum(room, 1e-6)
        assert abs(np.clip(relative, 0, 1).mean() - 0.5) < 0.075


def test_labels_hold_classes_and_void_and_stay_registered():
    cfg = augment_config(scale_range=(0.5, 2.0), vflip=True, rot90=True,
                         **{**STILL, "hflip": True})
    example = class_coded_example(height=40, width=56, block=16)
    images, labels = device_outputs(example, cfg, n=64)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
    # Void exactly where there is no image (padding is 0, every class pixel > 0).
    np.testing.assert_array_equal(labels == 255, np.all(images == 0, axis=-1))
    assert 0 < np.mean(labels == 255) < 0.9
    for image, label in zip(images, labels, strict=True):
        # Away from class borders, the crop's edge included (beyond it lies what bilinear
        # may still blend in), the image decodes to the mask.
        framed = np.pad(label.astype(int), 2, constant_values=-1)
        inner = (label != 255) & uniform_neighbourhood(framed, 2)[2:-2, 2:-2]
        np.testing.assert_array_equal(decode_class(image)[inner], label[inner])


def test_a_shrunk_image_keeps_its_original_scale():
    # A 128-pixel image on a 64-pixel canvas (crop 32): the scale is still
    # relative to 128 pixels, so a scale-1 crop shows a 32-row window of the original.
    cfg = augment_config(scale_range=(1.0, 1.0), **STILL)
    cfg.canvas_size = (64, 64)
    images, _ = device_outputs(coordinate_example(128, step=2), cfg, n=8)
    dy, dx = _slopes(images)
    np.testing.assert_allclose(dy * 2, 1.0, atol=0.05)


# -- colour -------------------------------------------------------------------------------
def test_colour_jitter_statistics_match_the_host():
    # Identity geometry, so only the jitter differs: the per-example mean and standard
    # deviation of the output have the same distribution on host and device (means within
    # 5 standard errors of their difference).
    cfg = augment_config(scale_range=(1.0, 1.0), hflip=False)
    rng = np.random.default_rng(0)
    example = {"image": rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8),
               "label": np.zeros((CROP, CROP), np.uint8)}
    host, _ = host_outputs(example, cfg)
    device, _ = device_outputs(example, cfg)
    for statistic in (lambda x: x.mean(axis=(1, 2, 3)), lambda x: x.std(axis=(1, 2, 3)),
                      lambda x: (x[..., 0] - x[..., 2]).std(axis=(1, 2))):
        a, b = statistic(host), statistic(device)
        standard_error = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 5 * standard_error
        assert 0.5 < b.std() / a.std() < 2.0
    assert device.min() >= 0.0 and device.max() <= 1.0


# -- elastic ------------------------------------------------------------------------------
def test_spline_weights_are_the_host_fields():
    # At pixel centres the device's continuous spline is the host's (float32: a cubic with
    # terms below 1 and a 3x3 product, a few ulps of 1).
    for length, points in ((37, 3), (64, 4), (5, 3)):
        position = np.arange(length, dtype=np.float32)
        weights = augment._spline_weights(position, np.int32(length), points)
        np.testing.assert_allclose(np.stack(weights, 1),
                                   transforms._cubic_spline_weights(length, points), atol=1e-5)


def test_elastic_field_magnitude_matches_the_host():
    # Scale 1, no flips: a pixel's source row minus its own row is the field. Its RMS over
    # 64 examples (1152 normal draws each side) agrees with the host's field within 15%
    # (5 standard errors).
    cfg = augment_config(scale_range=(1.0, 1.0), elastic=True, elastic_sigma=3.0, **STILL)
    images, labels = device_outputs(coordinate_example(CROP), cfg, n=64)
    codes = images[..., 0] * 255.0 / 4.0
    rows = np.arange(CROP)[None, :, None]
    inner = (labels != 255) & (codes > 1) & (codes < CROP - 2)  # mirrored points left out
    device_rms = np.sqrt(np.mean((codes - rows)[inner] ** 2))
    host = [transforms.elastic_displacement(transforms.example_rng(0, 0, i), (CROP, CROP),
                                            sigma=3.0)[0] for i in range(64)]
    host_rms = np.sqrt(np.mean(np.square(host)))
    assert abs(device_rms / host_rms - 1) < 0.15
    assert set(np.unique(labels)) <= {1, 255}


# -- normalisation ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    dict(), dict(normalize="imagenet"), dict(normalize="imagenet", pad_value="mean"),
    dict(normalize="custom", mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125)),
])
def test_eval_normalisation_matches_the_host(overrides):
    # (x / 255 - mean) / std in float32 on both sides, differently rounded: values below
    # 8.2 (1 / 0.125) differ by a few ulps (< 1e-5).
    cfg = augment_config(**overrides)
    example = class_coded_example(height=20, width=12)
    want = transforms.eval_transform(example, image_size=16, augment=cfg)
    canvas = transforms.eval_canvas(example, image_size=16, augment=cfg, label_type=np.uint8)
    got = augment.eval_batch({k: v[None] for k, v in canvas.items()}, augment=cfg)
    np.testing.assert_allclose(np.asarray(got["image"][0]), want["image"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["label"][0]), want["label"])
    if overrides.get("normalize") == "imagenet":
        pixel = example["image"][0, 0] / 255
        assert np.allclose(np.asarray(got["image"][0, 0, 0]),
                           (pixel - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD),
                           atol=1e-5)


def test_host_batches_without_metadata_are_refused():
    with pytest.raises(ValueError, match="lacks"):
        augment.eval_batch({"image": np.zeros((1, 2, 2, 3), np.uint8)}, augment=None)
    with pytest.raises(TypeError, match="uint8"):
        augment.eval_batch({"image": np.zeros((1, 2, 2, 3), np.float32),
                            "label": np.zeros((1, 2, 2), np.uint8),
                            "valid": np.zeros((1, 2), np.int32)}, augment=None)


# -- sharding -----------------------------------------------------------------------------
def test_batches_are_bitwise_equal_on_1_and_4_devices_and_spatial_partitions(num_devices):
    cfg = augment_config(vflip=True, rot90=True, elastic=True)
    examples = [class_coded_example(height=40, width=56, seed=s) for s in range(8)]
    batch = host_batch(examples, cfg, crop=16)
    # The training loop's two programs; one program (train_fn) must give the same.
    stages = augment.train_stages(cfg, seed=0, image_size=16, ignore_index=255)
    single = jax.jit(augment.train_fn(cfg, seed=0, image_size=16, ignore_index=255))(batch)
    outputs = [{k: np.asarray(v) for k, v in single.items()}]
    for par in (DataParallel("mesh", devices=jax.devices()[:1]), DataParallel("mesh"),
                DataParallel("mesh", spatial_partitions=2), DataParallel("pmap")):
        out = par.compile_batch_fn(*stages)(par.put_examples(batch))
        outputs.append({k: np.asarray(v).reshape(8, *v.shape[-3 + (k == "label"):])
                        for k, v in out.items()})
    for other in outputs[1:]:
        for key in ("image", "label"):
            np.testing.assert_array_equal(other[key], outputs[0][key])
