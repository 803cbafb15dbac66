"""VGG-16 (Simonyan & Zisserman 2015), configuration D, with the FCN reference's layer names.

Five stages of 3x3 convolutions (pad 1, ReLU; 2, 2, 3, 3, 3 of them, 64 ... 512
channels) each ending in a 2x2/2 max pool; then, with `fc=True`, the classifier's two
hidden layers as convolutions: fc6 (7x7, VALID, 4096) and fc7 (1x1, 4096), each with
ReLU and dropout. The ImageNet classifier's last layer (fc8) is not part of it.

`input_pad=1, ceil_mode=False` is torchvision's `vgg16()` (features and the classifier's
first two layers); FCN uses `input_pad=100, ceil_mode=True` (the reference's conv1_1
padding and Caffe's pooling), which lets every input of at least 32x32 through fc6.
"""

from __future__ import annotations

import jax

from flaxseg.models.backbones.base import Layer, PlainBackbone
from flaxseg.models.layers import max_pool_2x2

CONVS = (2, 2, 3, 3, 3)  # 3x3 convolutions per stage
WIDTHS = (64, 128, 256, 512, 512)
FC6_KERNEL = 7


class VGG16(PlainBackbone):
    """VGG-16 features: `[B, H, W, C]` -> `{name: [B, h, w, c]}` (see `coords()`).

    Returns each stage's last convolution before its pool (`conv1_2`, `conv2_2`,
    `conv3_3`, `conv4_3`, `conv5_3`: the U-Net's skips), each pool (`pool1` ... `pool5`)
    and, with `fc=True`, `fc7`. Layers past an output stride of `max_stride` are not
    built (a depth-4 U-Net encoder stops at conv5_3, stride 16). `widths` (five stages)
    and `fc_features` default to VGG-16's; smaller values give cheap test variants.
    Dropout after fc6 and fc7 runs only with `train=True` (the `'dropout'` rng stream).
    """

    widths: tuple[int, ...] = WIDTHS
    input_pad: int = 1
    fc: bool = True
    max_stride: int = 32

    default_widths = WIDTHS

    def layers(self) -> list[Layer]:
        layers, stride = [], 1
        for stage, (convs, width) in enumerate(zip(CONVS, self.widths, strict=True), 1):
            for j in range(1, convs + 1):
                pad = self.input_pad if (stage, j) == (1, 1) else 1
                layers.append(Layer(f"conv{stage}_{j}", width, 3, 1, pad, j == convs))
            stride *= 2
            if stride > self.max_stride:
                return layers
            layers.append(Layer(f"pool{stage}", 0, 2, 2, 0, True))
        if self.fc:
            layers.append(Layer("fc6", self.fc_features, FC6_KERNEL, 1, 0, False))
            layers.append(Layer("fc7", self.fc_features, 1, 1, 0, True))
        return layers

    def pool(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x, ceil_mode=self.ceil_mode)
