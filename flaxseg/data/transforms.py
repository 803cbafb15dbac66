"""Joint image/mask transforms, seeded per example from (seed, epoch, index).

Images enter as uint8 `[H, W, C]` and labels as uint8/int32 `[H, W]`; they leave
as float32 `[h, w, C]` (normalised) and int32 `[h, w]`, `(h, w) = image_size`.
Every geometric step is applied to both with the same parameters: the image is
resampled bilinearly, the mask by nearest neighbour (PIL, pixel-centre aligned,
so the two stay registered), and padding gives the mask `ignore_index`. The elastic
deformation of the U-Net paper (`elastic_deform`) resamples with `scipy.ndimage`.
"""

from __future__ import annotations

import functools
import math

import ml_collections
import numpy as np
from PIL import Image

from flaxseg.data.config import normalize_image_size
from flaxseg.extras import require
from flaxseg.normalization import IMAGENET_MEAN, IMAGENET_STD

Example = dict[str, np.ndarray]

_PAD_VALUES = ("zero", "mean")
_NORMALIZE = ("unit", "imagenet", "custom")
_EVAL_RESIZE = ("pad", "resize")
# Image resampling of the elastic deformation -> spline order of scipy.ndimage.
_ELASTIC_ORDERS = {"bilinear": 1, "bicubic": 3}


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example's random transform: a pure function of its args."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def validate_augment(augment: ml_collections.ConfigDict, num_channels: int) -> None:
    """Raises ValueError naming the bad key of an `augment_config()` and the fix."""
    lo, hi = augment.scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"augment.scale_range must satisfy 0 < min <= max, got {(lo, hi)}.")
    for key in ("brightness", "contrast", "saturation"):
        if not 0 <= augment[key] < 1:
            raise ValueError(f"augment.{key} must be in [0, 1), got {augment[key]}.")
    if augment.pad_value not in _PAD_VALUES:
        raise ValueError(
            f"augment.pad_value must be one of {_PAD_VALUES}, got {augment.pad_value!r}."
        )
    if augment.eval_resize not in _EVAL_RESIZE:
        raise ValueError(
            f"augment.eval_resize must be one of {_EVAL_RESIZE}, got {augment.eval_resize!r}."
        )
    _validate_elastic(augment)
    if augment.get("canvas_size"):
        try:
            normalize_image_size(augment.canvas_size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"augment.canvas_size must be None (automatic) or (H, W) positive "
                             f"ints, got {augment.canvas_size!r}.") from e
    normalization_stats(augment, num_channels)


def _validate_elastic(augment: ml_collections.ConfigDict) -> None:
    # .get: a config saved before the elastic keys existed has elastic off.
    if not augment.get("elastic", False):
        return
    grid, sigma = augment.elastic_grid, augment.elastic_sigma
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
        raise ValueError(
            f"augment.elastic_grid must be an int >= 2 (control points per side; the U-Net "
            f"paper uses 3), got {grid!r}."
        )
    if not isinstance(sigma, int | float) or not 0 <= sigma < math.inf:
        raise ValueError(
            f"augment.elastic_sigma must be a finite number >= 0 (pixels; the paper uses 10), "
            f"got {sigma!r}."
        )
    if augment.elastic_interpolation not in _ELASTIC_ORDERS:
        raise ValueError(
            f"augment.elastic_interpolation must be one of {tuple(_ELASTIC_ORDERS)}, got "
            f"{augment.elastic_interpolation!r}."
        )


def normalization_stats(
    augment: ml_collections.ConfigDict | None, num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std), float32 `[C]` in [0, 1] units, for the configured normalisation."""
    mode = "unit" if augment is None else augment.normalize
    if mode == "unit":
        mean, std = (0.0,), (1.0,)
    elif mode == "imagenet":
        if num_channels != 3:
            raise ValueError(
                f"normalize='imagenet' needs 3-channel images, got {num_channels}; use "
                "normalize='custom' with per-dataset mean/std, or 'unit'."
            )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif mode == "custom":
        mean, std = tuple(augment.mean), tuple(augment.std)
    else:
        raise ValueError(f"augment.normalize must be one of {_NORMALIZE}, got {mode!r}.")
    if len(mean) not in (1, num_channels) or len(std) not in (1, num_channels):
        raise ValueError(
            f"augment.mean/std need 1 or {num_channels} values, got {len(mean)} and {len(std)}."
        )
    mean_a = np.broadcast_to(np.asarray(mean, np.float32), (num_channels,)).copy()
    std_a = np.broadcast_to(np.asarray(std, np.float32), (num_channels,)).copy()
    if np.any(std_a <= 0):
        raise ValueError(f"augment.std must be positive, got {tuple(std)}.")
    return mean_a, std_a


def _resize(
    array: np.ndarray, size_hw: tuple[int, int], box: tuple[float, ...] | None, nearest: bool
) -> np.ndarray:
    """Resamples `array` (`[H, W]` or `[H, W, C]`) region `box` (x0, y0, x1, y1) to `size_hw`."""
    h, w = size_hw
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if array.ndim == 2:
        # uint8 -> PIL mode L, int32 -> mode I.
        src = array if array.dtype == np.uint8 else array.astype(np.int32)
        out = Image.fromarray(src).resize((w, h), resample, box=box)
        return np.asarray(out).astype(array.dtype, copy=False)
    channels = array.shape[-1]
    if channels in (3, 4):
        return np.asarray(Image.fromarray(array).resize((w, h), resample, box=box))
    planes = [_resize(array[..., c], size_hw, box, nearest) for c in range(channels)]
    return np.stack(planes, axis=-1)


def _crop_axis(rng: np.random.Generator, scaled: int, crop: int) -> tuple[int, int, int]:
    """Random placement along one axis: (canvas start, scaled-image start, length)."""
    if scaled >= crop:
        return 0, int(rng.integers(0, scaled - crop + 1)), crop
    return int(rng.integers(0, crop - scaled + 1)), 0, scaled


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _jitter_coefficients(
    rng: np.random.Generator, augment, channels: int, mean_value: float
) -> tuple[float, float, float]:
    """Draws the brightness, contrast and saturation factors; `jitter_coefficients` of them."""
    brightness = contrast = saturation = 1.0
    if augment.brightness:
        brightness += rng.uniform(-augment.brightness, augment.brightness)
    if augment.contrast:
        contrast += rng.uniform(-augment.contrast, augment.contrast)
    if augment.saturation and channels == 3:
        saturation += rng.uniform(-augment.saturation, augment.saturation)
    return jitter_coefficients(brightness, contrast, saturation, mean_value)


def jitter_coefficients(brightness, contrast, saturation, mean_value):
    """Brightness, contrast and saturation jitter as `a * x + g * grey(x) + o` on [0, 1] pixels.

    Brightness scales, contrast scales about the (brightened) image mean `mean_value`,
    saturation blends each pixel with its grey value (3 channels only). All three are
    linear, so they fold into one pass; returns (a, g, o). Plain arithmetic: the factors
    may be Python floats (the host path) or JAX arrays (`flaxseg.data.augment`).
    """
    gain = brightness * contrast
    # Blending with grey keeps a constant image constant, so the contrast pivot passes through.
    return gain * saturation, gain * (1.0 - saturation), (1.0 - contrast) * brightness * mean_value


def grey(pixels: np.ndarray) -> np.ndarray:
    """Luma of `[..., 3]` pixels (per-channel slices: much faster than a BLAS matvec here;
    NumPy or JAX arrays)."""
    r, g, b = _GRAY_WEIGHTS
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return red * np.float32(r) + green * np.float32(g) + blue * np.float32(b)


def _check_example(example: Example) -> tuple[np.ndarray, np.ndarray]:
    image, label = example["image"], example["label"]
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}.")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}.")
    return image, label


@functools.cache
def _cubic_spline_weights(length: int, points: int) -> np.ndarray:
    """float64 `[length, points]`: row i interpolates `points` control values at pixel i.

    The control points are spread evenly from the first pixel's centre to the last's; the
    weights are those of `scipy.ndimage.zoom(order=3, grid_mode=False)` (a cubic spline,
    linear in its input, so zooming the unit vectors gives them). Read-only (cached).
    """
    ndimage = require("scipy.ndimage", "The elastic deformation")
    unit = np.eye(points)
    weights = np.stack(
        [ndimage.zoom(unit[k], length / points, order=3, mode="mirror", grid_mode=False)
         for k in range(points)],
        axis=1,
    )
    weights.flags.writeable = False
    return weights


def elastic_displacement(
    rng: np.random.Generator, shape_hw: tuple[int, int], *, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """The U-Net paper's displacement field: float64 `[2, H, W]`, (dy, dx) in pixels.

    Ronneberger et al. (2015), section 3.1: random displacement vectors on a coarse
    `grid` x `grid` lattice, drawn from a Gaussian with `sigma` pixels standard deviation
    (`rng.normal`, shape `[2, grid, grid]`), per-pixel displacements by bicubic
    interpolation. The lattice's outer points sit on the border pixels; the bicubic
    interpolation is the tensor product of 1-D cubic splines (`ndimage.zoom(order=3)`),
    computed as `W_y @ vectors @ W_x^T` since the spline is linear in its control values.
    """
    h, w = shape_hw
    vectors = rng.normal(0.0, sigma, size=(2, grid, grid))
    return _cubic_spline_weights(h, grid) @ vectors @ _cubic_spline_weights(w, grid).T


def elastic_deform(
    example: Example,
    rng: np.random.Generator,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    interpolation: str = "bilinear",
    ignore_index: int = 255,
) -> Example:
    """Deforms image and mask by one `elastic_displacement` field (pixel p takes the value at
    p + displacement(p)).

    The image is resampled by `interpolation` ('bilinear' or 'bicubic' spline,
    `scipy.ndimage.map_coordinates`), mirrored where the source point lies outside (the
    edge pixel not repeated: the U-Net paper's mirroring) and rounded back to uint8. The
    mask takes its nearest source pixel, or `ignore_index` where that lies outside the
    image, so it holds only its own values and void. Returns `{'image': uint8 [H, W, C],
    'label': int32 [H, W]}`.
    """
    ndimage = require("scipy.ndimage", "The elastic deformation")
    image, label = _check_example(example)
    h, w = label.shape
    dy, dx = elastic_displacement(rng, (h, w), grid=grid, sigma=sigma)
    rows, cols = np.arange(h)[:, None] + dy, np.arange(w)[None, :] + dx
    order = _ELASTIC_ORDERS[interpolation]
    planes = [
        ndimage.map_coordinates(image[..., c], (rows, cols), output=np.float32, order=order,
                                mode="mirror")
        for c in range(image.shape[-1])
    ]
    warped = np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)
    # Nearest neighbour by hand: a source point outside the pixel grid is void, not clamped.
    src_y, src_x = np.floor(rows + 0.5).astype(np.intp), np.floor(cols + 0.5).astype(np.intp)
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    out_label = np.full((h, w), ignore_index, np.int32)
    out_label[inside] = label[src_y[inside], src_x[inside]]
    return {"image": warped, "label": out_label}


def train_transform(
    example: Example,
    rng: np.random.Generator,
    *,
    image_size: tuple[int, int] | int,
    augment: ml_collections.ConfigDict,
    ignore_index: int = 255,
) -> Example:
    """Random elastic -> rot90 -> scale -> crop/pad -> jitter -> normalise -> flips, jointly.

    `augment.elastic` deforms image and mask first (`elastic_deform`, with
    `elastic_grid`, `elastic_sigma`, `elastic_interpolation`). The scale factor is drawn
    log-uniformly from `augment.scale_range`; the crop window is uniform over all
    placements, and an image smaller than the crop lands at a random position in a canvas
    padded with `pad_value` (mask: `ignore_index`).
    Returns `{'image': float32 [h, w, C], 'label': int32 [h, w]}`.
    """
    image, label = _check_example(example)
    crop_h, crop_w = normalize_image_size(image_size)
    channels = image.shape[-1]
    mean, std = normalization_stats(augment, channels)
    if augment.get("elastic", False):
        deformed = elastic_deform(
            example, rng, grid=augment.elastic_grid, sigma=augment.elastic_sigma,
            interpolation=augment.elastic_interpolation, ignore_index=ignore_index,
        )
        image, label = deformed["image"], deformed["label"]
    if augment.rot90:
        k = int(rng.integers(0, 4))
        image, label = np.rot90(image, k), np.rot90(label, k)
        image, label = np.ascontiguousarray(image), np.ascontiguousarray(label)
    h, w = label.shape
    lo, hi = augment.scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    scaled_h, scaled_w = max(1, round(h * scale)), max(1, round(w * scale))
    cy, sy, len_y = _crop_axis(rng, scaled_h, crop_h)
    cx, sx, len_x = _crop_axis(rng, scaled_w, crop_w)
    # The visible window in source coordinates (the exact per-axis scale factors).
    fy, fx = scaled_h / h, scaled_w / w
    box = (sx / fx, sy / fy, (sx + len_x) / fx, (sy + len_y) / fy)
    patch = _resize(image, (len_y, len_x), box, nearest=False)
    label_patch = _resize(label, (len_y, len_x), box, nearest=True)
    pixels = patch.astype(np.float32)
    if augment.brightness or augment.contrast or augment.saturation:
        mean_value = float(patch.mean()) / 255.0 if augment.contrast else 0.0
        a, g, o = _jitter_coefficients(rng, augment, channels, mean_value)
        jittered = pixels * np.float32(a / 255.0)
        jittered += np.float32(o)
        if g:
            jittered += grey(pixels)[..., None] * np.float32(g / 255.0)
        pixels = np.clip(jittered, 0.0, 1.0, out=jittered)
    else:
        pixels *= np.float32(1.0 / 255.0)
    # Normalise the patch alone: padding gets its normalised value directly below.
    pixels -= mean
    pixels *= np.float32(1.0) / std
    # Flipping the whole canvas = flipping the patch and mirroring where it lands.
    if augment.hflip and rng.random() < 0.5:
        pixels, label_patch, cx = pixels[:, ::-1], label_patch[:, ::-1], crop_w - cx - len_x
    if augment.vflip and rng.random() < 0.5:
        pixels, label_patch, cy = pixels[::-1], label_patch[::-1], crop_h - cy - len_y
    # Padding in normalised units: the mean maps to 0, black to -mean / std.
    pad = np.zeros_like(mean) if augment.pad_value == "mean" else -mean / std
    out_image = np.empty((crop_h, crop_w, channels), np.float32)
    out_image[...] = pad
    out_image[cy : cy + len_y, cx : cx + len_x] = pixels
    out_label = np.full((crop_h, crop_w), ignore_index, np.int32)
    out_label[cy : cy + len_y, cx : cx + len_x] = label_patch
    return {"image": out_image, "label": out_label}


def label_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """The smallest integer dtype (uint8, int16, int32) holding the class ids
    `0 .. num_classes - 1` and `ignore_index`: what the host sends the devices."""
    low, high = min(0, int(ignore_index)), max(int(num_classes) - 1, int(ignore_index))
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"Labels 0..{num_classes - 1} and ignore_index={ignore_index} do not fit "
                     "in int32; use fewer classes or a smaller ignore_index.")


def canvas_size(augment: ml_collections.ConfigDict,
                source_hw: tuple[int, int]) -> tuple[int, int]:
    """(Hc, Wc) of the uint8 canvas a training example travels on to the devices.

    `augment.canvas_size` if set, else `source_hw`: the size of the source's first
    example. The canvas holds the whole image (a crop's window may lie anywhere in it;
    rotations and scales are the device's coordinates), so a dataset of one image size
    (CamVid, Cityscapes, ISBI, the synthetic scenes) travels without padding. Larger images
    are shrunk to fit (`fit_to_canvas`): for a dataset of mixed sizes set
    `augment.canvas_size` to the largest.
    """
    configured = augment.get("canvas_size")
    return normalize_image_size(configured if configured else tuple(source_hw))


def fit_to_canvas(
    example: Example, canvas_hw: tuple[int, int], *, ignore_index: int, label_type: np.dtype
) -> Example:
    """A training example as the host sends it: on a fixed uint8 canvas, top-left.

    An image larger than the canvas is shrunk to fit, aspect ratio kept (bilinear image,
    nearest mask); the device augmentation (`flaxseg.data.augment`) still draws its scale
    relative to the original size, so only resolution is lost. Returns `{'image': uint8
    [Hc, Wc, C] (zero outside the image), 'label': label_type [Hc, Wc] (ignore_index
    outside), 'valid': int32 [2] (the image's extent on the canvas), 'size': int32 [2]
    (the original H, W)}`.
    """
    image, label = _check_example(example)
    height, width = label.shape
    canvas_h, canvas_w = canvas_hw
    if height > canvas_h or width > canvas_w:
        factor = min(canvas_h / height, canvas_w / width)
        fit = (min(canvas_h, max(1, round(height * factor))),
               min(canvas_w, max(1, round(width * factor))))
        image = _resize(image, fit, None, nearest=False)
        label = _resize(label, fit, None, nearest=True)
    valid_h, valid_w = label.shape
    out_image = np.zeros((canvas_h, canvas_w, image.shape[-1]), np.uint8)
    out_image[:valid_h, :valid_w] = image
    out_label = np.full((canvas_h, canvas_w), ignore_index, label_type)
    out_label[:valid_h, :valid_w] = label
    return {"image": out_image, "label": out_label,
            "valid": np.array([valid_h, valid_w], np.int32),
            "size": np.array([height, width], np.int32)}


def eval_canvas(
    example: Example,
    *,
    image_size: tuple[int, int] | int,
    augment: ml_collections.ConfigDict | None = None,
    ignore_index: int = 255,
    label_type: type | np.dtype = np.int32,
) -> Example:
    """Deterministic, uint8: brings an example to `image_size` as the host sends it.

    `augment.eval_resize == 'pad'` (default) places the image top-left (the rest is
    padding: zero pixels, `ignore_index` labels) and centre-crops an axis that is too
    long; 'resize' resamples (bilinear image, nearest mask). Returns `{'image': uint8
    [h, w, C], 'label': label_type [h, w], 'valid': int32 [2]}`, `valid` the image's
    extent (padding gets `pad_value` when normalised).
    """
    image, label = _check_example(example)
    out_h, out_w = normalize_image_size(image_size)
    mode = "pad" if augment is None else augment.eval_resize
    h, w = label.shape
    if mode == "resize":
        if (h, w) != (out_h, out_w):
            image = _resize(image, (out_h, out_w), None, nearest=False)
            label = _resize(label, (out_h, out_w), None, nearest=True)
        return {"image": image, "label": label.astype(label_type),
                "valid": np.array([out_h, out_w], np.int32)}
    top, left = max(0, (h - out_h) // 2), max(0, (w - out_w) // 2)
    image = image[top : top + out_h, left : left + out_w]
    label = label[top : top + out_h, left : left + out_w]
    vh, vw = label.shape
    out_image = np.zeros((out_h, out_w, image.shape[-1]), np.uint8)
    out_image[:vh, :vw] = image
    out_label = np.full((out_h, out_w), ignore_index, label_type)
    out_label[:vh, :vw] = label
    return {"image": out_image, "label": out_label, "valid": np.array([vh, vw], np.int32)}


def eval_transform(
    example: Example,
    *,
    image_size: tuple[int, int] | int,
    augment: ml_collections.ConfigDict | None = None,
    ignore_index: int = 255,
) -> Example:
    """Deterministic, on the host: `eval_canvas`, then the normalisation (padding gets
    `pad_value`). Returns float32 `[h, w, C]` / int32 `[h, w]` arrays; training and
    evaluation normalise on the devices instead (`flaxseg.data.augment.normalize`)."""
    canvas = eval_canvas(example, image_size=image_size, augment=augment,
                         ignore_index=ignore_index)
    image = canvas["image"]
    mean, std = normalization_stats(augment, image.shape[-1])
    vh, vw = (int(v) for v in canvas["valid"])
    pad = mean if augment is not None and augment.pad_value == "mean" else 0.0
    out_image = np.empty(image.shape, np.float32)
    out_image[...] = pad
    out_image[:vh, :vw] = image[:vh, :vw].astype(np.float32) / 255.0
    return {"image": (out_image - mean) / std, "label": canvas["label"]}
