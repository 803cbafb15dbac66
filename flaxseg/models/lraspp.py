"""LR-ASPP on MobileNetV3-Large (Howard et al. 2019) in torchvision's form,
`lraspp_mobilenet_v3_large`.

The backbone is MobileNetV3-Large with its last stage dilated (output stride 16).
torchvision's `LRASPPHead` has two branches on the deepest map ('16', 960 channels): `cbr`,
a 1x1 convolution to 128 channels with BatchNorm and ReLU, gated by `scale`, a global
average over H and W, a 1x1 convolution to 128 channels and a sigmoid; the product is
resized bilinearly to the stride-8 map ('4', 40 channels), scored by `high_classifier`
and added to `low_classifier`'s scores of the stride-8 map. The sum is resized
bilinearly to the input's size (PyTorch's `align_corners=False`).

Names are torchvision's (`classifier/cbr/0`, `classifier/scale/1`,
`classifier/low_classifier`, `backbone/16/0`), so
`flaxseg.models.from_torchvision('lraspp_mobilenet_v3_large', path)` loads torchvision's
state dict key for key; 21 classes: 3,221,538 parameters (torchvision's `num_params`).
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import backbone_at_stride
from flaxseg.models.backbones.mobilenet_v3 import TINY_BLOCKS
from flaxseg.models.backbones.resnet import batch_norm
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import Dtype, check_image_batch, resize_bilinear
from flaxseg.models.registry import register_model

LOW, HIGH = "4", "16"  # torchvision's taps: the first stride-8 block, the last layer


class LRASPPHead(nn.Module):
    """`(low [B, h, w, C_low], high [B, h', w', C_high])` -> scores `[B, h, w, classes]`."""

    num_classes: int
    inter_features: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _Cbr(self.inter_features, axis_name=self.axis_name, name="cbr", **kw)(high, train)
        # The gate's mean is over the whole image (under spatial partitions too).
        s = _Scale(self.inter_features, name="scale", **kw)(
            jnp.mean(high, axis=(1, 2), keepdims=True))
        x = resize_bilinear(x * jax.nn.sigmoid(s), low.shape[1:3])
        return (nn.Conv(self.num_classes, (1, 1), name="low_classifier", **kw)(low)
                + nn.Conv(self.num_classes, (1, 1), name="high_classifier", **kw)(x))


class _Cbr(nn.Module):
    """`cbr`: 1x1 convolution '0' (no bias), BatchNorm '1', ReLU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="0")(x)
        x = batch_norm("1", self.dtype, self.param_dtype, self.axis_name)(
            x, use_running_average=not train)
        return nn.relu(x)


class _Scale(nn.Module):
    """`scale` after its pool: the 1x1 convolution '1' (no bias)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="1")(x)


class LRASPP(nn.Module):
    """LR-ASPP MobileNetV3-Large: `[B, H, W, C]` -> float32 logits `[B, H, W, num_classes]`.

    `width_mult` scales the backbone and `blocks` thins its stages (0.25 and
    `TINY_BLOCKS`: a cheap variant), `inter_features` the head (128). No dropout;
    BatchNorm statistics live in `batch_stats`, synchronised over `axis_name`. `remat`:
    each inverted residual recomputed in the backward pass.
    """

    num_classes: int
    inter_features: int = 128
    width_mult: float = 1.0
    blocks: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    backbone_scope: ClassVar[tuple[str, ...]] = ("backbone",)

    @nn.nowrap
    def backbone_module(self, name: str | None = None) -> nn.Module:
        """The dilated MobileNetV3-Large of this model."""
        return backbone_at_stride("mobilenet_v3_large", 16, width_mult=self.width_mult,
                                  blocks=self.blocks, dtype=self.dtype,
                                  param_dtype=self.param_dtype, axis_name=self.axis_name,
                                  remat=self.remat, name=name)

    @nn.nowrap
    def geometry(self) -> Geometry:
        return Geometry(stride=16)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_image_batch(x, "LRASPP")
        maps = self.backbone_module(name="backbone")(x, train)
        head = LRASPPHead(self.num_classes, self.inter_features, dtype=self.dtype,
                          param_dtype=self.param_dtype, axis_name=self.axis_name,
                          name="classifier")
        out = head(maps[LOW], maps[HIGH], train)
        return resize_bilinear(out, x.shape[1:3]).astype(jnp.float32)


register_model("lraspp_mobilenet_v3_large", LRASPP,
               paper="Howard et al. 2019 (LR-ASPP), torchvision's lraspp_mobilenet_v3_large",
               tiny={"width_mult": 0.25, "blocks": TINY_BLOCKS, "inter_features": 8})
