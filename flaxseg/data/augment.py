"""The train augmentation and the normalisation on the devices: pure, jittable batch functions.

The host only decodes and brings examples to the batch shape (`flaxseg.data.pipeline`):
uint8 images, labels in the smallest integer type (`transforms.label_dtype`), and a little
per-example metadata. Here, under `jax.jit` and sharded like the batch:

    train_batch(batch, seed=..., augment=..., image_size=..., ignore_index=...)
        {'image': uint8 [B, Hc, Wc, C], 'label': int [B, Hc, Wc], 'valid': int32 [B, 2],
         'size': int32 [B, 2], 'epoch': int32 [B], 'index': int32 [B]}
        -> {'image': float32 [B, h, w, C] normalised, 'label': int32 [B, h, w]}
    eval_batch(batch, augment=...)
        {'image': uint8 [B, h, w, C], 'label': int [B, h, w], 'valid': int32 [B, 2]} -> same

The training loop compiles `train_stages` (geometry, then colour: two programs, see there)
with `DataParallel.compile_batch_fn`; `train_fn` is the same function as one program.

Design (why one map): every geometric transform of `transforms.train_transform` (elastic
displacement, rot90, log-uniform scale, uniform crop placement / padding, h/v flips) is a
map of output pixels to source points, so they compose into ONE per-pixel source map,
followed by one bilinear gather for the image and one nearest gather for the label. The
image is read once, nothing is resampled twice, and a gather is cheap on any accelerator.
The label is void (`ignore_index`) wherever the source point lies outside the image; the
image gets `pad_value` outside the crop. Then the colour jitter (the same arithmetic as the
host: `transforms.jitter_coefficients`) and the normalisation (`transforms.normalization_stats`).

Differences from the host path (statistically the same transform; tests compare them):
the bilinear gather reads 4 neighbours (PIL antialiases when it shrinks, so at scale 0.5
the device image is slightly sharper); nested nearest/bilinear resamplings become one; the
elastic field is evaluated at the continuous source point (`_spline_weights`, the same
cubic spline the host samples at pixel centres); `elastic_interpolation='bicubic'`
samples the warped image bilinearly too.

Randomness: example i of epoch e draws from `fold_in(fold_in(key(seed), e), i)` alone, so a
batch depends neither on the devices, processes or data workers nor on its neighbours,
and resume is exact. Every reduction is exact (the contrast pivot is an integer sum), so
results are bitwise equal however the batch is sharded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxseg.data import transforms
from flaxseg.data.config import normalize_image_size

Batch = dict[str, jax.Array]

# The uint32 contrast-pivot sum must not overflow: crop pixels x channels x 255 < 2**32.
_MAX_SUM = 2**32 - 1


def _stats(augment: ml_collections.ConfigDict | None, channels: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, 1 / std, normalised pad value), float32 `[C]`."""
    mean, std = transforms.normalization_stats(augment, channels)
    pad = np.zeros_like(mean) if augment is not None and augment.pad_value == "mean" \
        else -mean / std
    return mean, (np.float32(1.0) / std).astype(np.float32), pad.astype(np.float32)


def normalize(pixels: jax.Array, inside: jax.Array, augment: ml_collections.ConfigDict | None
              ) -> jax.Array:
    """[0, 1] float pixels `[..., C]` -> `(x - mean) / std`; `pad_value` where not `inside`
    (bool `[...]`). Every mode of `augment.normalize` ('unit', 'imagenet', 'custom')."""
    mean, inv_std, pad = _stats(augment, pixels.shape[-1])
    return jnp.where(inside[..., None], (pixels - mean) * inv_std, pad)


def _check_keys(batch: Batch, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"The {what} batch lacks {missing}: build it with "
                         f"flaxseg.data.pipeline (uint8 images with their metadata).")
    if batch["image"].dtype != jnp.uint8:
        raise TypeError(f"batch['image'] must be uint8 (the host sends undecoded pixels); got "
                        f"{batch['image'].dtype}.")


def eval_batch(batch: Batch, *, augment: ml_collections.ConfigDict | None) -> Batch:
    """Normalises an eval batch on the device: `{'image': float32 [B, h, w, C], 'label':
    int32 [B, h, w]}`; pixels outside `valid` (padding) get `pad_value`."""
    _check_keys(batch, ("image", "label", "valid"), "eval")
    _, height, width, _ = batch["image"].shape
    rows = jnp.arange(height)[None, :, None] < batch["valid"][:, 0, None, None]
    cols = jnp.arange(width)[None, None, :] < batch["valid"][:, 1, None, None]
    pixels = batch["image"].astype(jnp.float32) * np.float32(1.0 / 255.0)
    return {"image": normalize(pixels, rows & cols, augment),
            "label": batch["label"].astype(jnp.int32)}


def example_key(seed: int, epoch: jax.Array, index: jax.Array) -> jax.Array:
    """The key of example `index` of `epoch`: `fold_in(fold_in(key(seed), epoch), index)`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), index)


@functools.cache
def _prefilter(points: int) -> np.ndarray:
    """float32 `[points, points]`: control values -> cubic B-spline coefficients, mirror
    boundary (scipy's `spline_filter(order=3, mode='mirror')`, as a matrix)."""
    system = np.zeros((points, points))
    for i in range(points):
        for j in range(i - 1, i + 2):
            system[i, _mirror_index(j, points)] += 2 / 3 if j == i else 1 / 6
    return np.linalg.inv(system).astype(np.float32)


def _mirror_index(j: int, n: int) -> int:
    """Integer index `j` reflected into [0, n) about the edge pixels (scipy 'mirror')."""
    if n == 1:
        return 0
    j = abs(j) % (2 * n - 2)
    return 2 * n - 2 - j if j >= n else j


def _bspline3(x: jax.Array) -> jax.Array:
    """The cubic B-spline kernel."""
    x = jnp.abs(x)
    near = 2 / 3 - x**2 + x**3 / 2
    far = (2 - x) ** 3 / 6
    return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def _spline_weights(position: jax.Array, length: jax.Array, points: int) -> list[jax.Array]:
    """The weight of each of `points` control values at pixel `position` (float, any shape)
    of an axis of `length` pixels: the cubic spline of `transforms.elastic_displacement`
    (control points from the first pixel's centre to the last's), at any position."""
    t = position * (points - 1) / jnp.maximum(length - 1, 1).astype(jnp.float32)
    basis = [jnp.zeros_like(t) for _ in range(points)]
    for j in range(-1, points + 1):  # the knots that reach [0, points - 1]
        basis[_mirror_index(j, points)] = basis[_mirror_index(j, points)] + _bspline3(t - j)
    inverse = _prefilter(points)
    return [sum(basis[j] * inverse[j, k] for j in range(points)) for k in range(points)]


def _elastic_offset(normals: jax.Array, y: jax.Array, x: jax.Array, size: jax.Array,
                    augment: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(dy, dx) of the U-Net paper's displacement field at source points (y, x), from
    standard normal draws `[2 * grid * grid]`."""
    grid = int(augment.elastic_grid)
    vectors = normals.reshape(2, grid, grid) * np.float32(augment.elastic_sigma)
    wy, wx = _spline_weights(y, size[0], grid), _spline_weights(x, size[1], grid)
    # Unrolled sums in a fixed order: exact whatever the sharding.
    out = []
    for c in range(2):
        out.append(sum(wy[k] * wx[m] * vectors[c, k, m] for k in range(grid)
                       for m in range(grid)))
    return out[0], out[1]


def _reflect(u: jax.Array, n: jax.Array) -> jax.Array:
    """Continuous coordinate `u` reflected into [0, n - 1] about the edge pixel centres."""
    period = jnp.maximum(2 * (n - 1), 1).astype(jnp.float32)
    r = jnp.mod(jnp.abs(u), period)
    return jnp.where(n > 1, jnp.where(r > n - 1, period - r, r), 0.0)


def _integer(uniform: jax.Array, count: jax.Array | int) -> jax.Array:
    """A uniform integer in [0, count) from a uniform draw in [0, 1)."""
    return jnp.minimum(jnp.floor(uniform * count).astype(jnp.int32), count - 1)


def _placement(uniform: jax.Array, scaled: jax.Array, crop: int) -> tuple[jax.Array, ...]:
    """Uniform crop placement on one axis: (canvas start, scaled-image start, length), as
    `transforms._crop_axis` draws it."""
    offset = _integer(uniform, jnp.abs(scaled - crop) + 1)
    larger = scaled >= crop
    return (jnp.where(larger, 0, offset), jnp.where(larger, offset, 0),
            jnp.minimum(scaled, crop))


def _source_map(draws: dict[str, jax.Array], size: jax.Array, crop_hw: tuple[int, int],
                augment: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
    """Output pixel -> source point: (y, x) float `[h, w]` in the original image's pixel
    coordinates, and `inside` bool `[h, w]` (the output pixel shows the image, not padding)."""
    crop_h, crop_w = crop_hw
    k = _integer(draws["rot90"], 4) if augment.rot90 else jnp.int32(0)
    rot_h, rot_w = jnp.where(k % 2 == 1, size[1], size[0]), jnp.where(k % 2 == 1, size[0],
                                                                        size[1])
    lo, hi = (math.log(float(v)) for v in augment.scale_range)
    scale = jnp.exp(lo + draws["scale"] * (hi - lo))
    scaled_h = jnp.maximum(1, jnp.round(rot_h * scale).astype(jnp.int32))
    scaled_w = jnp.maximum(1, jnp.round(rot_w * scale).astype(jnp.int32))
    cy, sy, len_y = _placement(draws["crop_y"], scaled_h, crop_h)
    cx, sx, len_x = _placement(draws["crop_x"], scaled_w, crop_w)
    i, j = jnp.arange(crop_h)[:, None], jnp.arange(crop_w)[None, :]
    # Flipping the output canvas = reading it mirrored.
    if augment.vflip:
        i = jnp.where(draws["vflip"] < 0.5, crop_h - 1 - i, i)
    if augment.hflip:
        j = jnp.where(draws["hflip"] < 0.5, crop_w - 1 - j, j)
    a, b = i - cy, j - cx
    inside = (a >= 0) & (a < len_y) & (b >= 0) & (b < len_x)
    # Pixel-centre aligned, as PIL's resize of the box (sx/fx, sy/fy, ...) maps them.
    u = (a + sy + 0.5) * (rot_h / scaled_h) - 0.5
    v = (b + sx + 0.5) * (rot_w / scaled_w) - 0.5
    u, v = jnp.broadcast_arrays(u, v)
    height, width = size[0] - 1.0, size[1] - 1.0
    # np.rot90(A, k)[u, v] = A[y, x]:
    y = jnp.select([k == 0, k == 1, k == 2], [u, v, height - u], height - v)
    x = jnp.select([k == 0, k == 1, k == 2], [v, width - u, width - v], u)
    return y, x, jnp.broadcast_to(inside, y.shape)


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array, valid: jax.Array) -> jax.Array:
    """Bilinear samples float32 `[h, w, C]` of uint8 `image` `[Hc, Wc, C]` at canvas points
    (y, x) `[h, w]`, edge pixels repeated beyond the `valid` extent."""
    y0, x0 = jnp.floor(y), jnp.floor(x)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    ya, yb = jnp.clip(y0, 0, valid[0] - 1), jnp.clip(y0 + 1, 0, valid[0] - 1)
    xa, xb = jnp.clip(x0, 0, valid[1] - 1), jnp.clip(x0 + 1, 0, valid[1] - 1)

    def tap(rows, cols):
        return image[rows, cols].astype(jnp.float32)

    top = tap(ya, xa) * (1 - wx) + tap(ya, xb) * wx
    bottom = tap(yb, xa) * (1 - wx) + tap(yb, xb) * wx
    return top * (1 - wy) + bottom * wy


def _jitter(draws: dict[str, jax.Array], pixels: jax.Array, inside: jax.Array,
            augment: ml_collections.ConfigDict) -> jax.Array:
    """Integer-valued pixels `[h, w, C]` -> [0, 1], colour-jittered as the host path does
    (`transforms.jitter_coefficients`; contrast pivots about the mean of the visible pixels)."""
    channels = pixels.shape[-1]

    def factor(name: str) -> jax.Array | float:
        amount = float(augment[name])
        if not amount or (name == "saturation" and channels != 3):
            return 1.0
        return 1.0 + amount * (2.0 * draws[name] - 1.0)

    if not (augment.brightness or augment.contrast or augment.saturation):
        return pixels * np.float32(1.0 / 255.0)
    mean_value = 0.0
    if augment.contrast:
        # Exact, so the same on any sharding: each row's float sum of integers stays below
        # 2**24 (W * C * 255), and the rows add up as integers.
        rows = jnp.sum(jnp.where(inside[..., None], pixels, 0.0), axis=(1, 2))
        total = jnp.sum(rows.astype(jnp.uint32))
        count = jnp.maximum(jnp.sum(inside.astype(jnp.int32)) * channels, 1)
        mean_value = total.astype(jnp.float32) / (count.astype(jnp.float32) * 255.0)
    a, g, o = transforms.jitter_coefficients(factor("brightness"), factor("contrast"),
                                             factor("saturation"), mean_value)
    out = pixels * (a / 255.0) + o
    if channels == 3 and augment.saturation:
        out = out + transforms.grey(pixels)[..., None] * (g / 255.0)
    return jnp.clip(out, 0.0, 1.0)


# One uniform draw per random choice. One `jax.random.uniform` call per example: each call
# is a threefry program, and compiling ten of them took seconds.
_DRAWS = ("rot90", "scale", "crop_y", "crop_x", "vflip", "hflip", "brightness", "contrast",
          "saturation")


def _draw(key: jax.Array, augment: ml_collections.ConfigDict) -> tuple[dict, jax.Array]:
    """({name: uniform [0, 1) scalar}, standard normals `[2 * grid**2]` for the elastic field)."""
    normals = 2 * int(augment.elastic_grid) ** 2 if augment.get("elastic", False) else 0
    uniform = jax.random.uniform(key, (len(_DRAWS) + normals,))
    # Inverse-CDF normals; the clip keeps erfinv finite at the ends of [0, 1).
    tail = jnp.clip(2.0 * uniform[len(_DRAWS):] - 1.0, -1.0 + 1e-7, 1.0 - 1e-7)
    gaussian = np.float32(math.sqrt(2.0)) * jax.scipy.special.erfinv(tail)
    return dict(zip(_DRAWS, uniform, strict=False)), gaussian


def _geometry(key: jax.Array, image: jax.Array, label: jax.Array, valid: jax.Array,
              size: jax.Array, *, crop_hw: tuple[int, int],
              augment: ml_collections.ConfigDict, ignore_index: int) -> tuple[jax.Array, ...]:
    """One example's geometric transforms: uint8 canvas `[Hc, Wc, C]` + label `[Hc, Wc]` ->
    (integer-valued float32 pixels `[h, w, C]`, inside bool `[h, w]`, int32 label `[h, w]`,
    the example's uniform draws). `valid`: the image's extent on the canvas; `size`: its
    original H, W."""
    draws, normals = _draw(key, augment)
    y, x, inside = _source_map(draws, size, crop_hw, augment)
    image_y, image_x = y, x
    if augment.get("elastic", False):
        dy, dx = _elastic_offset(normals, y, x, size, augment)
        y, x = y + dy, x + dx
        # The U-Net paper mirrors the image where the field points outside it.
        image_y, image_x = _reflect(y, size[0]), _reflect(x, size[1])
    near_y, near_x = jnp.floor(y + 0.5), jnp.floor(x + 0.5)
    in_label = inside & (near_y >= 0) & (near_y < size[0]) & (near_x >= 0) & (near_x < size[1])
    # Original pixel coordinates -> the canvas (the host shrinks an image larger than it).
    fy = valid[0].astype(jnp.float32) / size[0].astype(jnp.float32)
    fx = valid[1].astype(jnp.float32) / size[1].astype(jnp.float32)
    pixels = _bilinear(image, (image_y + 0.5) * fy - 0.5, (image_x + 0.5) * fx - 0.5, valid)
    pixels = jnp.clip(jnp.round(pixels), 0.0, 255.0)  # uint8 values, as PIL's output
    rows = jnp.clip(jnp.floor((near_y + 0.5) * fy), 0, valid[0] - 1).astype(jnp.int32)
    cols = jnp.clip(jnp.floor((near_x + 0.5) * fx), 0, valid[1] - 1).astype(jnp.int32)
    out_label = jnp.where(in_label, label[rows, cols].astype(jnp.int32), ignore_index)
    return pixels, inside, out_label, draws


def _colour(draws: dict[str, jax.Array], pixels: jax.Array, inside: jax.Array,
            augment: ml_collections.ConfigDict) -> jax.Array:
    """One example's colour jitter and normalisation: float32 `[h, w, C]`."""
    return normalize(_jitter(draws, pixels, inside, augment), inside, augment)


def _train_geometry(batch: Batch, *, seed: int, augment: ml_collections.ConfigDict,
                    image_size: tuple[int, int] | int, ignore_index: int) -> dict:
    """Stage 1 of `train_batch`: the keys and the geometry of every example."""
    _check_keys(batch, ("image", "label", "valid", "size", "epoch", "index"), "train")
    crop_hw = normalize_image_size(image_size)
    channels = batch["image"].shape[-1]
    if augment.contrast and crop_hw[0] * crop_hw[1] * channels * 255 > _MAX_SUM:
        raise ValueError(f"Crops of {crop_hw} x {channels} channels are too large for the "
                         "contrast jitter's exact pixel sum; set augment.contrast=0.")
    keys = jax.vmap(functools.partial(example_key, seed))(batch["epoch"], batch["index"])
    geometry = functools.partial(_geometry, crop_hw=crop_hw, augment=augment,
                                 ignore_index=int(ignore_index))
    pixels, inside, labels, draws = jax.vmap(geometry)(
        keys, batch["image"], batch["label"], batch["valid"], batch["size"])
    return {"pixels": pixels, "inside": inside, "label": labels, "draws": draws}


def _train_colour(stage: dict, *, augment: ml_collections.ConfigDict) -> Batch:
    """Stage 2 of `train_batch`: colour jitter and normalisation."""
    colour = functools.partial(_colour, augment=augment)
    images = jax.vmap(colour)(stage["draws"], stage["pixels"], stage["inside"])
    return {"image": images, "label": stage["label"]}


def train_stages(augment: ml_collections.ConfigDict | None, *, seed: int,
                 image_size: tuple[int, int] | int, ignore_index: int
                 ) -> tuple[Callable, ...]:
    """`train_fn` as a sequence of stages, each `fn(previous) -> next`, to compile one by
    one (`DataParallel.compile_batch_fn(*stages)`): geometry, then colour. Why two
    programs: XLA:CPU (jax 0.10.2) ran the colour jitter 4x slower fused into one program
    with the gather (an optimization barrier did not help), 250 vs 70 CPU-ms per batch of
    8 at 352x480."""
    if augment is None:  # the pipeline then sends eval-style canvases
        return (eval_fn(None),)
    return (functools.partial(_train_geometry, seed=int(seed), augment=augment,
                              image_size=image_size, ignore_index=int(ignore_index)),
            functools.partial(_train_colour, augment=augment))


def train_batch(batch: Batch, *, seed: int, augment: ml_collections.ConfigDict,
                image_size: tuple[int, int] | int, ignore_index: int) -> Batch:
    """The train augmentation of a host batch (module docstring): `{'image': float32
    [B, h, w, C], 'label': int32 [B, h, w]}`, `(h, w) = image_size`. Pure; jit it (the
    training loop compiles its two `train_stages` apart, sharded like the batch)."""
    stage = _train_geometry(batch, seed=seed, augment=augment, image_size=image_size,
                            ignore_index=ignore_index)
    return _train_colour(stage, augment=augment)


def train_fn(augment: ml_collections.ConfigDict, *, seed: int, image_size: tuple[int, int] | int,
             ignore_index: int) -> Callable[[Batch], Batch]:
    """`train_batch` with its settings bound: `fn(host_batch) -> batch`, for `jax.jit` or
    `DataParallel.compile_batch_fn`. `augment=None` only normalises ('unit')."""
    if augment is None:  # the pipeline then sends eval-style canvases
        return eval_fn(None)
    return functools.partial(train_batch, seed=int(seed), augment=augment,
                             image_size=image_size, ignore_index=int(ignore_index))


def eval_fn(augment: ml_collections.ConfigDict | None) -> Callable[[Batch], Batch]:
    """`eval_batch` with its settings bound: `fn(host_batch) -> batch`."""
    return functools.partial(eval_batch, augment=augment)
