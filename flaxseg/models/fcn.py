"""FCN-32s / 16s / 8s on VGG-16 (Long, Shelhamer, Darrell 2015), layer for layer.

Layers carry the reference's names (`voc-fcn*s/net.py`): conv1_1 ... conv5_3 (3x3,
pad 1, ReLU), pool1 ... pool5 (2x2/2 max, Caffe's ceil mode), fc6 (7x7 conv, 4096),
fc7 (1x1 conv, 4096), each followed by ReLU and dropout; score_fr (1x1 to classes);
score_pool4 / score_pool3 (1x1, zero-initialised, so a net grown from a coarser one
starts out computing the coarser one's output); upscore2 / upscore_pool4 (4x4/2) and
upscore32 / upscore16 / upscore8 (kernel 2f, stride f), transposed convs without bias
initialised to bilinear interpolation. Skips are fused by addition.

Alignment follows the reference exactly: conv1_1 pads the input by 100, pooling
rounds up (Caffe's ceil mode), and the crops take fixed offsets (score_pool4 at 5,
score_pool3 at 9, the final score at 19 / 27 / 31 for 32s / 16s / 8s), the offsets
Caffe's `coord_map` derives. Output pixel (i, j) is aligned with input pixel (i, j):
the crops are centred, and an input shifted by a multiple of 32 pixels gives logits
shifted by as much (away from the image borders, which the ~400 px receptive field
sees). Any input of at least 32x32 gives logits of its own H, W.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.layers import (
    ConvTranspose,
    Dtype,
    bilinear_init,
    check_image_batch,
    max_pool_2x2,
)

VARIANTS = ("32s", "16s", "8s")
MIN_SIZE = 32

# VGG-16: number of 3x3 convs and channels of each of the five stages; fc6/fc7 width.
VGG16_CONVS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_FC = 4096

# Crop offsets of the reference nets (Caffe coord_map with conv1_1 pad 100).
INPUT_PAD = 100
SCORE_POOL4_OFFSET = 5
SCORE_POOL3_OFFSET = 9
FINAL_OFFSET = {"32s": 19, "16s": 27, "8s": 31}


def _crop(x: jax.Array, offset: int, size: tuple[int, int]) -> jax.Array:
    """`x[:, offset:offset+h, offset:offset+w]` — Caffe's Crop layer."""
    h, w = size
    return x[:, offset : offset + h, offset : offset + w]


class FCN(nn.Module):
    """FCN on VGG-16: `[B, H, W, C]` float images (H, W >= 32) -> float32 logits
    `[B, H, W, num_classes]`.

    `variant` '32s', '16s' or '8s' picks the skip architecture. Dropout (after fc6
    and fc7) is active only with `train=True` and reads the `'dropout'` rng stream.
    The model has no BatchNorm; `axis_name` is accepted for a uniform interface.
    `widths` (the five stages' channels) and `fc_features` default to VGG-16's;
    smaller values give a cheap variant of the same architecture for tests.
    """

    num_classes: int
    variant: str = "8s"
    dropout_rate: float = 0.5
    widths: tuple[int, ...] = VGG16_WIDTHS
    fc_features: int = VGG16_FC
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    def _check_fields(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"FCN.variant must be one of {VARIANTS}; got {self.variant!r}.")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"FCN.num_classes must be a positive integer; got {n!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"FCN.dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")
        widths = tuple(self.widths)
        if len(widths) != len(VGG16_CONVS) or min(widths + (self.fc_features,)) < 1:
            raise ValueError(
                f"FCN.widths must be {len(VGG16_CONVS)} positive channel counts and "
                f"fc_features positive; got widths={self.widths!r}, "
                f"fc_features={self.fc_features!r}."
            )

    def _conv(self, features: int, kernel: int, name: str, padding=0, zero: bool = False):
        return nn.Conv(
            features,
            (kernel, kernel),
            padding=padding,
            kernel_init=nn.initializers.zeros_init() if zero else nn.initializers.he_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _upscore(self, x: jax.Array, stride: int, name: str) -> jax.Array:
        return ConvTranspose(
            self.num_classes,
            kernel_size=2 * stride,
            stride=stride,
            use_bias=False,
            kernel_init=bilinear_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    def _score(self, x: jax.Array, name: str) -> jax.Array:
        """A 1x1 scoring layer on a pool output, zero-initialised (see module doc)."""
        return self._conv(self.num_classes, 1, name, zero=True)(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check_fields()
        check_image_batch(x, "FCN")
        height, width = x.shape[1:3]
        if min(height, width) < MIN_SIZE:
            raise ValueError(
                f"FCN needs inputs of at least {MIN_SIZE}x{MIN_SIZE}; got {height}x{width}. "
                "Pad or resize the images."
            )
        x = x.astype(self.dtype)
        pools = {}
        stages = zip(VGG16_CONVS, self.widths, strict=True)
        for stage, (convs, features) in enumerate(stages, start=1):
            for j in range(1, convs + 1):
                pad = INPUT_PAD if (stage, j) == (1, 1) else 1
                x = nn.relu(self._conv(features, 3, f"conv{stage}_{j}", pad)(x))
            x = max_pool_2x2(x, ceil_mode=True)
            pools[stage] = x
        for name, kernel in (("fc6", 7), ("fc7", 1)):
            x = nn.relu(self._conv(self.fc_features, kernel, name)(x))
            if self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Conv(
            self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
            name="score_fr",
        )(x)

        if self.variant == "32s":
            x = self._upscore(x, 32, "upscore32")
        else:
            x = self._upscore(x, 2, "upscore2")
            pool4 = self._score(pools[4], "score_pool4")
            x = x + _crop(pool4, SCORE_POOL4_OFFSET, x.shape[1:3])
            if self.variant == "16s":
                x = self._upscore(x, 16, "upscore16")
            else:
                x = self._upscore(x, 2, "upscore_pool4")
                pool3 = self._score(pools[3], "score_pool3")
                x = x + _crop(pool3, SCORE_POOL3_OFFSET, x.shape[1:3])
                x = self._upscore(x, 8, "upscore8")
        x = _crop(x, FINAL_OFFSET[self.variant], (height, width))
        return x.astype(jnp.float32)
