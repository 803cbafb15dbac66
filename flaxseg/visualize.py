"""Pictures of segmentations: colour palettes, colourised masks, overlays and grids.

Everything here is host-side NumPy and returns `uint8` RGB arrays `[H, W, 3]`, so
the results go straight into a PNG (`save_png`) or a TensorBoard image summary.

Display convention for images: `uint8` images are shown as they are; float images
already in [0, 1] are scaled by 255; any other float image (e.g. one normalised
with a mean and standard deviation) is min-max rescaled per image to [0, 1] for
display, so what you see is the image's contrast, not its absolute values.
"""

from __future__ import annotations

import colorsys
import os
from typing import Any

import numpy as np
from PIL import Image

#: Colour of void (`ignore_index`) pixels in colourised masks. The PASCAL VOC
#: palette never produces pure white for fewer than 2**24 classes.
VOID_COLOR = np.array([255, 255, 255], np.uint8)
#: Colour of the frames around the cells of `prediction_grid`: light grey, visible on
#: black (class 0) and on white (void), and not in the VOC
#: palette for the first 256 classes.
SEPARATOR_COLOR = np.array([160, 160, 160], np.uint8)


def default_palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map: uint8 `[num_classes, 3]`, class 0 black.

    Class index bits are interleaved into the high bits of R, G and B (bit 0 -> R,
    bit 1 -> G, bit 2 -> B, next three bits one level lower, ...), so nearby
    classes get clearly different colours and VOC masks display in their usual
    colours.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        code, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << shift
            code >>= 3
        palette[index] = rgb
    return palette


# The golden angle as a fraction of the hue circle: consecutive classes far apart in hue.
_GOLDEN_HUE_STEP = 0.38196601125


def generated_palette(num_classes: int) -> np.ndarray:
    """Colours for classes whose dataset gives none: uint8 `[num_classes, 3]`.

    Hues step round the circle by the golden angle, brightness alternates; no black,
    white or grey. Unlike `default_palette` (PASCAL VOC's map) it does not pretend to be
    a dataset's colours, and it keeps void (white) apart.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    colours = [colorsys.hsv_to_rgb((i * _GOLDEN_HUE_STEP) % 1.0, 0.75, 0.95 - 0.3 * (i % 2))
               for i in range(int(num_classes))]
    return np.round(np.array(colours) * 255).astype(np.uint8)


def palette_or_generated(palette: Any, num_classes: int) -> tuple[np.ndarray, str]:
    """`(colours, source)`: the dataset's `palette` (source 'dataset'), or, where it gave
    none, `generated_palette` (source 'generated')."""
    if palette is None:
        return generated_palette(num_classes), "generated"
    return np.asarray(palette, np.uint8), "dataset"


def _check_palette(palette: np.ndarray) -> np.ndarray:
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < 1:
        raise ValueError(
            f"palette must have shape [num_classes, 3], got {palette.shape}; "
            "use default_palette(num_classes)"
        )
    if palette.dtype != np.uint8:
        if palette.min() < 0 or palette.max() > 255:
            raise ValueError("palette values must lie in [0, 255] (uint8 RGB)")
        palette = palette.astype(np.uint8)
    return palette


def _check_mask(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape [H, W], got {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ValueError(
            f"{name} must hold integer class indices, got dtype {mask.dtype}; "
            "take argmax of the logits first"
        )
    return mask.astype(np.int64)


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Colours a class-index mask: int `[H, W]` -> uint8 `[H, W, 3]`.

    Class `k` gets `palette[k]`; void pixels (`ignore_index`) are drawn in
    `VOID_COLOR` (white). A class index outside the palette raises ValueError.
    """
    palette = _check_palette(palette)
    mask = _check_mask(mask, "mask")
    void = mask == ignore_index
    bad = ~void & ((mask < 0) | (mask >= len(palette)))
    if bad.any():
        values = np.unique(mask[bad])[:5].tolist()
        raise ValueError(
            f"mask holds class indices {values} outside the palette's {len(palette)} "
            f"classes (ignore_index={ignore_index}); pass a larger palette or fix the labels"
        )
    out = palette[np.where(void, 0, mask)]
    out[void] = VOID_COLOR
    return out


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """An image for display: `[H, W]`, `[H, W, 1]` or `[H, W, 3]` -> uint8 `[H, W, 3]`.

    uint8 is kept; floats in [0, 1] are scaled by 255; other floats are min-max
    rescaled per image (a constant image becomes black).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must have shape [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
    if image.dtype == np.uint8:
        out = image
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
        if not np.isfinite(image).all():
            raise ValueError("image holds NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:  # normalised: rescale for display
            image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        out = np.round(image * 255.0).astype(np.uint8)
    else:
        raise ValueError(
            f"image dtype must be uint8 or floating, got {image.dtype}; "
            "convert to float32 in [0, 1] or uint8"
        )
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> np.ndarray:
    """Blends class colours onto an image: -> uint8 `[H, W, 3]`.

    `image` is `[H, W]`, `[H, W, 1]` or `[H, W, 3]` (uint8 or float, see the module
    docstring), `mask` int `[H, W]` of the same size. Each pixel becomes
    `(1 - alpha) * image + alpha * palette[class]`; void pixels keep the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = image_to_uint8(image)
    colours = colorize(mask, palette, ignore_index)
    if rgb.shape[:2] != colours.shape[:2]:
        raise ValueError(
            f"image {rgb.shape[:2]} and mask {colours.shape[:2]} must have the same height "
            "and width; centre-crop the image to the mask (VALID U-Net outputs are smaller)"
        )
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    blend = np.round(blend).astype(np.uint8)
    void = _check_mask(mask, "mask") == ignore_index
    blend[void] = rgb[void]
    return blend


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (array.shape[1] - height) // 2
    left = (array.shape[2] - width) // 2
    return array[:, top : top + height, left : left + width]


def prediction_grid(
    images: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    palette: np.ndarray,
    ignore_index: int = 255,
    border: int = 1,
) -> np.ndarray:
    """One row per example: image | truth | prediction -> uint8 `[N*H', 3*W', 3]`.

    images `[N, H, W, C]` (C = 1 or 3), labels int `[N, H, W]`, preds int
    `[N, h, w]`. When the predictions are smaller than the images (the VALID
    U-Net predicts the centre of its input), images and labels are centre-cropped
    to `[h, w]`. Every cell gets a `border`-pixel frame in `SEPARATOR_COLOR`, so
    `H' = h + 2 * border` and `W' = w + 2 * border`.
    """
    images, labels, preds = np.asarray(images), np.asarray(labels), np.asarray(preds)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}")
    if labels.ndim != 3 or preds.ndim != 3:
        raise ValueError(
            f"labels and preds must have shape [N, H, W], got {labels.shape} and {preds.shape}"
        )
    if not images.shape[0] == labels.shape[0] == preds.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"images, labels and preds need the same non-zero batch size, got "
            f"{images.shape[0]}, {labels.shape[0]}, {preds.shape[0]}"
        )
    if labels.shape[1:] != images.shape[1:3]:
        raise ValueError(f"labels {labels.shape[1:]} must match images {images.shape[1:3]}")
    height, width = preds.shape[1:]
    if height > images.shape[1] or width > images.shape[2]:
        raise ValueError(f"preds {preds.shape[1:]} are larger than the images {images.shape[1:3]}")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    images = _center_crop(images, height, width)
    labels = _center_crop(labels, height, width)

    cell_h, cell_w = height + 2 * border, width + 2 * border
    grid = np.empty((len(preds) * cell_h, 3 * cell_w, 3), np.uint8)
    grid[...] = SEPARATOR_COLOR
    for row, (image, label, pred) in enumerate(zip(images, labels, preds, strict=True)):
        cells = (
            image_to_uint8(image),
            colorize(label, palette, ignore_index),
            colorize(pred, palette, ignore_index),
        )
        top = row * cell_h + border
        for column, cell in enumerate(cells):
            left = column * cell_w + border
            grid[top : top + height, left : left + width] = cell
    return grid


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 `[H, W]` (grey / class indices), `[H, W, 1]`, `[H, W, 3]` or
    `[H, W, 4]` array as a lossless PNG, creating missing parent directories."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(
            f"save_png needs a uint8 array, got {array.dtype}; use colorize/image_to_uint8 "
            "or .astype(np.uint8) for class indices below 256"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"save_png needs [H, W], [H, W, 3] or [H, W, 4], got {array.shape}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
