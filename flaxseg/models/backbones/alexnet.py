"""AlexNet (Krizhevsky et al. 2012) in torchvision's form, with fc6/fc7 as convolutions.

torchvision's `alexnet()` (the single-tower variant, no grouped convolutions): conv1
11x11/4 (64), 3x3/2 max pool, conv2 5x5 (192), pool, conv3 3x3 (384), conv4 3x3 (256),
conv5 3x3 (256), pool; then the classifier's hidden layers as convolutions: fc6 (6x6,
VALID, 4096) and fc7 (1x1, 4096), each with ReLU and dropout. The ImageNet
classifier's last layer (fc8) is not part of it.

`input_pad=2, ceil_mode=False` is torchvision's network; FCN-AlexNet (the FCN paper's
Table 1, `voc-fcn-alexnet`) pads conv1 by 100 and pools in Caffe's ceil mode.
"""

from __future__ import annotations

import jax

from flaxseg.models.backbones.base import Layer, PlainBackbone
from flaxseg.models.layers import max_pool_3x3

WIDTHS = (64, 192, 384, 256, 256)
FC6_KERNEL = 6


class AlexNet(PlainBackbone):
    """AlexNet features: `[B, H, W, C]` -> `{'pool1', 'pool2', 'pool5', 'fc7'}`, maps at
    strides 8, 16, 32 and 32 (see `coords()`). `widths` (the five convolutions) and
    `fc_features` default to torchvision's. Dropout after fc6 and fc7 runs only with
    `train=True` (the `'dropout'` rng stream)."""

    widths: tuple[int, ...] = WIDTHS
    input_pad: int = 2

    default_widths = WIDTHS

    def layers(self) -> list[Layer]:
        w, fc = self.widths, self.fc_features
        return [
            Layer("conv1", w[0], 11, 4, self.input_pad, False),
            Layer("pool1", 0, 3, 2, 0, True),
            Layer("conv2", w[1], 5, 1, 2, False),
            Layer("pool2", 0, 3, 2, 0, True),
            Layer("conv3", w[2], 3, 1, 1, False),
            Layer("conv4", w[3], 3, 1, 1, False),
            Layer("conv5", w[4], 3, 1, 1, False),
            Layer("pool5", 0, 3, 2, 0, True),
            Layer("fc6", fc, FC6_KERNEL, 1, 0, False),
            Layer("fc7", fc, 1, 1, 0, True),
        ]

    def pool(self, x: jax.Array) -> jax.Array:
        return max_pool_3x3(x, ceil_mode=self.ceil_mode)
