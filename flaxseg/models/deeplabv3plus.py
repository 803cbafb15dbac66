"""DeepLabV3+ (Chen et al. 2018, ECCV): the DeepLabV3 encoder and a decoder at stride 4.

The encoder is a backbone dilated to `output_stride` 16 (ASPP rates 6, 12, 18) or 8
(12, 24, 36) and the ASPP of `flaxseg.models.deeplabv3` (1x1, three dilated 3x3 and the
image-pooling branch, 256 channels each, projected to 256, dropout 0.5). The decoder
projects the backbone's last stride-4 map to 48 channels (1x1 convolution, BatchNorm,
ReLU: `decoder/project`), concatenates it with the ASPP output resized bilinearly to
stride 4, and fuses them with two 3x3 convolutions (256, BatchNorm, ReLU:
`decoder/fuse`); a 1x1 convolution scores the classes (`classifier`) and the logits are
resized bilinearly to the input's size (`align_corners=False`). Convolutions are plain,
as in the paper's ResNet-101 model (its Xception model uses separable ones).

Backbones: 'resnet50', 'resnet101' (torchvision's ResNet, layer4, or layer3 and layer4,
dilated; stride-4 map layer1), 'mobilenet_v3_large' (stride 16 only: its last stage
dilated; stride-4 map '3') and 'vgg16' (stride 16 only: conv5_3, without pool5; stride-4
map conv3_3). The names under `backbone` are torchvision's, so its ImageNet files load
(`from_torchvision('resnet101', path, model='deeplabv3plus', backbone='resnet101')`, or
`--config.model.backbone_weights=FILE`). 21 classes at stride 16: 40,352,181 parameters
on ResNet-50, 59,344,309 on ResNet-101 (tests/test_models_deeplab.py checks them against
a PyTorch twin).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import backbone_at_stride, last_per_stride
from flaxseg.models.deeplabv3 import ASPP, ConvNormReLU, backbone_options, conv_norm_relu
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import Dtype, check_image_batch, resize_bilinear
from flaxseg.models.registry import register_model

RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # the paper's ASPP rates per output stride
LOW_LEVEL_STRIDE = 4


class Decoder(nn.Module):
    """`(high [B, h, w, C], low [B, h4, w4, C_low])` -> `[B, h4, w4, features]`."""

    low_level_features: int = 48
    features: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        low = ConvNormReLU(self.low_level_features, name="project", **kw)(low, train)
        x = jnp.concatenate([resize_bilinear(high, low.shape[1:3]).astype(low.dtype), low],
                            axis=-1)
        return _Fuse(self.features, name="fuse", **kw)(x, train)


class _Fuse(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ReLU (a Sequential's '0'/'1', '3'/'4')."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        for index in (0, 3):
            x = conv_norm_relu(x, self.features, train, kernel=3, index=index, **kw)
        return x


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: `[B, H, W, C]` -> float32 logits `[B, H, W, num_classes]`.

    `backbone` 'resnet50', 'resnet101', 'mobilenet_v3_large' or 'vgg16'; `output_stride`
    16 or 8 (ResNet only); `atrous_rates` default to the paper's for the stride.
    `blocks`, `base_width` (ResNet), `width_mult` (MobileNetV3), `widths` (VGG-16) and the
    head widths make cheap variants. Dropout (0.5 after the ASPP) runs only with
    `train=True` and reads the `'dropout'` rng stream; BatchNorm statistics live in
    `batch_stats`, synchronised over `axis_name`. `remat`: each backbone block recomputed
    in the backward pass (`flaxseg.models.layers`). `zero_init_residual` (ResNet): each
    bottleneck's last BatchNorm scale starts at 0 (torchvision's option), for training
    from scratch.
    """

    num_classes: int
    backbone: str = "resnet50"
    output_stride: int = 16
    atrous_rates: tuple[int, ...] | None = None
    aspp_features: int = 256
    low_level_features: int = 48
    decoder_features: int = 256
    dropout_rate: float = 0.5
    blocks: tuple[int, ...] | None = None
    base_width: int | None = None
    width_mult: float | None = None
    zero_init_residual: bool | None = None
    widths: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    backbone_scope: ClassVar[tuple[str, ...]] = ("backbone",)

    @nn.nowrap
    def backbone_module(self, name: str | None = None) -> nn.Module:
        """The backbone, dilated to `output_stride`."""
        return backbone_at_stride(self.backbone, self.output_stride, dtype=self.dtype,
                                  param_dtype=self.param_dtype, axis_name=self.axis_name,
                                  remat=self.remat, name=name, **backbone_options(self))

    @nn.nowrap
    def geometry(self) -> Geometry:
        return Geometry(stride=self.output_stride)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_image_batch(x, "DeepLabV3Plus")
        if self.output_stride not in RATES:
            raise ValueError(f"DeepLabV3Plus.output_stride must be 16 or 8; got "
                             f"{self.output_stride!r}.")
        rates = self.atrous_rates or RATES[self.output_stride]
        backbone = self.backbone_module(name="backbone")
        low_name = last_per_stride(backbone.coords())[LOW_LEVEL_STRIDE]
        maps = backbone(x, train)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        high = ASPP(tuple(rates), self.aspp_features, self.dropout_rate, name="aspp",
                    **kw)(list(maps.values())[-1], train)
        y = Decoder(self.low_level_features, self.decoder_features, name="decoder", **kw)(
            high, maps[low_name], train)
        y = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="classifier")(y)
        return resize_bilinear(y, x.shape[1:3]).astype(jnp.float32)


register_model("deeplabv3plus", DeepLabV3Plus,
               paper="Chen et al. 2018 (DeepLabV3+), ResNet-50 at output stride 16",
               tiny={"blocks": (1, 1, 1, 1), "base_width": 4, "aspp_features": 8,
                     "low_level_features": 4, "decoder_features": 8})
