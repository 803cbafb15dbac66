"""The embedded default dataset: procedurally drawn shapes, generated on the fly.

Each scene is a function of (seed, split, index): a low-saturation background with
an illumination gradient, then 2-5 overlapping discs, rotated rectangles and
triangles (later shapes occlude earlier ones), then uniform pixel noise. Each class
draws its colour from its own hue band (saturated, per-instance jitter) and the
background stays grey-ish, so colour and shape both tell the classes apart and a
small U-Net learns the task in about a minute. With one channel the classes get
disjoint brightness bands instead. Splits use disjoint seed streams.
"""

from __future__ import annotations

import colorsys
import math

import ml_collections
import numpy as np

from flaxseg.data.base import SourceInfo
from flaxseg.data.config import SYNTHETIC_CLASS_NAMES

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DISC, RECTANGLE, TRIANGLE = 1, 2, 3

# Hue bands (fractions of the colour wheel) per shape class; they do not overlap.
_HUE_BANDS = {DISC: (-0.05, 0.05), RECTANGLE: (0.28, 0.38), TRIANGLE: (0.58, 0.68)}
# Brightness bands for one-channel scenes, background first.
_GRAY_BANDS = {0: (0.0, 0.25), DISC: (0.35, 0.5), RECTANGLE: (0.6, 0.75), TRIANGLE: (0.85, 1.0)}


def _class_colour(rng: np.random.Generator, cls: int, num_channels: int) -> np.ndarray:
    if num_channels == 1:
        return np.array([rng.uniform(*_GRAY_BANDS[cls])], np.float32)
    hue = rng.uniform(*_HUE_BANDS[cls]) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb, np.float32)


def _paint_shape(
    rng: np.random.Generator,
    cls: int,
    instance: np.ndarray,
    value: int,
    yy: np.ndarray,
    xx: np.ndarray,
) -> None:
    """Paints one random shape of class `cls` into `instance` (`[H, W]`) with `value`.

    `yy` is `[H, 1]` and `xx` `[1, W]` (pixel-centre coordinates); the inside test runs
    only over the shape's bounding box.
    """
    h, w = instance.shape
    size = min(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    radius = rng.uniform(0.1, 0.25) * size
    # Every shape lies within 1.5 radii of its centre (triangle vertices: 1.3).
    y0, y1 = max(0, int(cy - 1.5 * radius)), min(h, int(cy + 1.5 * radius) + 2)
    x0, x1 = max(0, int(cx - 1.5 * radius)), min(w, int(cx + 1.5 * radius) + 2)
    ys, xs = yy[y0:y1], xx[:, x0:x1]
    dy, dx = ys - cy, xs - cx
    if cls == DISC:
        inside = dy * dy + dx * dx <= radius * radius
    else:
        angle = rng.uniform(0, np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
    if cls == RECTANGLE:
        half_a, half_b = radius, radius * rng.uniform(0.5, 1.0)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        inside = (np.abs(u) <= half_a) & (np.abs(v) <= half_b)
    elif cls == TRIANGLE:
        # Inside all three edges of a jittered equilateral triangle.
        phis = angle + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
        vy, vx = cy + radius * 1.3 * np.sin(phis), cx + radius * 1.3 * np.cos(phis)
        inside = np.ones((y1 - y0, x1 - x0), bool)
        for k in range(3):
            ay, ax, by, bx = vy[k], vx[k], vy[(k + 1) % 3], vx[(k + 1) % 3]
            # Cross product sign; vertices are counter-clockwise in (x, y) order.
            inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
    instance[y0:y1, x0:x1][inside] = value


def render_scene(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    num_channels: int = 3,
    min_shapes: int = 2,
    max_shapes: int = 5,
    noise_std: float = 0.04,
) -> dict[str, np.ndarray]:
    """Draws one scene: `{'image': uint8 [H, W, C], 'label': uint8 [H, W]}` (classes 0-3)."""
    h, w = image_size
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if num_channels == 1:
        base = np.array([rng.uniform(*_GRAY_BANDS[0])], np.float32)
    else:
        rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.7))
        base = np.array(rgb, np.float32)
    # A gentle linear illumination gradient across the scene.
    gy, gx = rng.uniform(-0.08, 0.08, size=2)
    shade = (gy * (yy / h - 0.5) + gx * (xx / w - 0.5)).astype(np.float32)
    # Paint instance ids (later shapes occlude earlier ones), then look colours up at once.
    instance = np.zeros((h, w), np.uint8)
    colours, classes = [base], [0]
    for k in range(1, int(rng.integers(min_shapes, max_shapes + 1)) + 1):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASS_NAMES)))
        _paint_shape(rng, cls, instance, k, yy, xx)
        colours.append(_class_colour(rng, cls, num_channels))
        classes.append(cls)
    image = np.stack(colours)[instance]
    image += shade[..., None]
    # Uniform noise of standard deviation noise_std, from random bytes (cheaper than normals).
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8).astype(np.float32)
    image += (noise - 127.5) * np.float32(noise_std * math.sqrt(12.0) / 256.0)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return {"image": image, "label": np.asarray(classes, np.uint8)[instance]}


class SyntheticSource:
    """Random-access synthetic scenes; `source[i]` is the same array every call."""

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        if split not in SPLIT_IDS:
            raise ValueError(
                f"Unknown split {split!r} for synthetic data; use one of {sorted(SPLIT_IDS)}."
            )
        if config.num_channels not in (1, 3):
            raise ValueError(
                f"Synthetic scenes have 1 or 3 channels, got num_channels={config.num_channels}."
            )
        if config.num_classes != len(SYNTHETIC_CLASS_NAMES):
            raise ValueError(
                f"Synthetic scenes have {len(SYNTHETIC_CLASS_NAMES)} classes "
                f"{SYNTHETIC_CLASS_NAMES}; got num_classes={config.num_classes}."
            )
        if not 1 <= config.min_shapes <= config.max_shapes:
            raise ValueError(
                f"Need 1 <= min_shapes <= max_shapes, got {config.min_shapes}, {config.max_shapes}."
            )
        self._length = int(config[f"num_{split}"])
        if self._length < 1:
            raise ValueError(f"Synthetic split {split!r} is empty; set num_{split} >= 1.")
        self._config = config
        self._split_id = SPLIT_IDS[split]
        self.info = SourceInfo(
            num_classes=len(SYNTHETIC_CLASS_NAMES),
            class_names=SYNTHETIC_CLASS_NAMES,
            num_channels=config.num_channels,
            ignore_index=config.ignore_index,
            palette=((0, 0, 0), (230, 25, 25), (25, 200, 60), (40, 90, 230)),
        )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} synthetic scenes")
        c = self._config
        rng = np.random.default_rng([c.seed, self._split_id, index])
        return render_scene(
            rng, tuple(c.image_size), c.num_channels, c.min_shapes, c.max_shapes, c.noise_std
        )

    def __repr__(self) -> str:
        return f"SyntheticSource(len={self._length}, image_size={tuple(self._config.image_size)})"
