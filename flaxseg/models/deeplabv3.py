"""DeepLabV3 (Chen et al. 2017) in torchvision's form: `deeplabv3_resnet50`,
`deeplabv3_resnet101`, `deeplabv3_mobilenet_v3_large`.

The backbone is torchvision's ResNet with layer3 and layer4 dilated (output stride 8), or
MobileNetV3-Large with its last stage dilated (output stride 16). `classifier` is
torchvision's `DeepLabHead` on the deepest map: the ASPP (a 1x1 branch, three 3x3
branches dilated by `atrous_rates` (12, 24, 36), and the image-pooling branch: a global
average over H and W, 1x1 convolution, BatchNorm, ReLU, broadcast back; each branch 256
channels; concatenated, projected by a 1x1 convolution to 256, dropout 0.5), then a 3x3
convolution, BatchNorm, ReLU and a 1x1 convolution to the classes. The logits are resized
bilinearly to the input's size (PyTorch's `align_corners=False`). With `aux_loss=True`
an `aux_classifier` (torchvision's `FCNHead`) scores layer3 (ResNet) or feature '4'
(MobileNetV3, stride 8), and the model returns `{'out': logits, 'aux': aux_logits}`.

Names are torchvision's (`classifier/0/convs/4/1`, `classifier/0/project/0`,
`backbone/layer4/2/conv3`, `backbone/13/block/2/fc1`), so
`flaxseg.models.from_torchvision('deeplabv3_resnet50', path)` loads torchvision's state
dict key for key. Parameter counts (21 classes, with the auxiliary head) equal
torchvision's `num_params`: 42,004,074 (ResNet-50), 60,996,202 (ResNet-101),
11,029,328 (MobileNetV3-Large).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import backbone_at_stride
from flaxseg.models.backbones.mobilenet_v3 import TINY_BLOCKS
from flaxseg.models.backbones.resnet import batch_norm
from flaxseg.models.fcn_resnet import FCNHead
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import Dtype, check_image_batch, resize_bilinear
from flaxseg.models.registry import register_model

# torchvision's taps: the deepest map feeds the ASPP, this one the auxiliary head.
AUX_MAP = {"resnet50": "layer3", "resnet101": "layer3", "mobilenet_v3_large": "4"}
OUTPUT_STRIDE = {"resnet50": 8, "resnet101": 8, "mobilenet_v3_large": 16}
# Backbone fields a model passes on when it has and sets them (cheap variants; the
# ResNet's zero_init_residual).
BACKBONE_OPTIONS = ("blocks", "base_width", "width_mult", "widths", "zero_init_residual")


def conv_norm_relu(x: jax.Array, features: int, train: bool, *, kernel: int = 1,
                   dilation: int = 1, index: int = 0, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, axis_name: str | None = None
                   ) -> jax.Array:
    """Convolution `str(index)` ('same' padding, no bias), BatchNorm `str(index + 1)`,
    ReLU, created in the calling module: torchvision's `Conv2d, BatchNorm2d, ReLU` at
    `index` of a Sequential. `[B, h, w, C]` -> `[B, h, w, features]`."""
    x = nn.Conv(features, (kernel, kernel), padding=dilation * (kernel - 1) // 2,
                kernel_dilation=dilation, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, name=str(index))(x)
    x = batch_norm(str(index + 1), dtype, param_dtype, axis_name)(
        x, use_running_average=not train)
    return nn.relu(x)


class ConvNormReLU(nn.Module):
    """`conv_norm_relu` as a module of its own (a Sequential inside a Sequential)."""

    features: int
    kernel: int = 1
    dilation: int = 1
    index: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return conv_norm_relu(x, self.features, train, kernel=self.kernel,
                              dilation=self.dilation, index=self.index, dtype=self.dtype,
                              param_dtype=self.param_dtype, axis_name=self.axis_name)


class ASPPBranches(nn.Module):
    """torchvision's `ASPP.convs`: '0' 1x1, '1' ... the dilated 3x3s, then the pooling
    branch (its convolution at index 1, after the pool). `[B, h, w, C]` -> the branches'
    outputs concatenated, `[B, h, w, (len(rates) + 2) * features]`."""

    rates: tuple[int, ...]
    features: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        outs = [ConvNormReLU(self.features, name="0", **kw)(x, train)]
        for i, rate in enumerate(self.rates, 1):
            outs.append(ConvNormReLU(self.features, 3, rate, name=str(i), **kw)(x, train))
        # Image pooling: the mean over the whole image (under spatial partitions XLA
        # reduces across them); bilinear resizing of a 1x1 map is a broadcast.
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = ConvNormReLU(self.features, index=1, name=str(len(self.rates) + 1), **kw)(
            pooled, train)
        outs.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        return jnp.concatenate(outs, axis=-1)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: `[B, h, w, C]` -> `[B, h, w, features]` (branches
    'convs', 1x1 projection 'project', dropout)."""

    rates: tuple[int, ...] = (12, 24, 36)
    features: int = 256
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        x = ASPPBranches(tuple(self.rates), self.features, name="convs", **kw)(x, train)
        x = ConvNormReLU(self.features, name="project", **kw)(x, train)
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x


class DeepLabHead(nn.Module):
    """torchvision's `DeepLabHead`: ASPP '0', 3x3 conv '1', BatchNorm '2', ReLU, 1x1 conv
    to `num_classes` '4' (with bias)."""

    num_classes: int
    rates: tuple[int, ...] = (12, 24, 36)
    features: int = 256
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        x = ASPP(self.rates, self.features, self.dropout_rate, name="0", **kw)(x, train)
        x = conv_norm_relu(x, self.features, train, kernel=3, index=1, **kw)
        return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="4")(x)


def backbone_options(model: nn.Module) -> dict:
    """The `BACKBONE_OPTIONS` fields `model` sets (not None), for `backbone_at_stride`."""
    return {f: getattr(model, f) for f in BACKBONE_OPTIONS
            if getattr(model, f, None) is not None}


class DeepLabV3(nn.Module):
    """DeepLabV3: `[B, H, W, C]` -> float32 logits `[B, H, W, num_classes]`, or
    `{'out': ..., 'aux': ...}` with `aux_loss=True`.

    `backbone`: 'resnet50', 'resnet101' (output stride 8) or 'mobilenet_v3_large' (16).
    `blocks` (per stage), `base_width` (ResNet) and `width_mult` (MobileNetV3) make cheap
    variants; `aspp_features` is the ASPP's and the head's width (256). Dropout (0.5 after
    the ASPP, 0.1 in the auxiliary head) runs only with `train=True` and reads the
    `'dropout'` rng stream; BatchNorm statistics live in `batch_stats`, synchronised over
    `axis_name`. `remat`: each backbone block recomputed in the backward pass
    (`flaxseg.models.layers`).
    `zero_init_residual` (ResNet): each bottleneck's last BatchNorm scale starts at 0
    (torchvision's option), for training from scratch.
    """

    num_classes: int
    backbone: str = "resnet50"
    aux_loss: bool = False
    atrous_rates: tuple[int, ...] = (12, 24, 36)
    aspp_features: int = 256
    dropout_rate: float = 0.5
    blocks: tuple[int, ...] | None = None
    base_width: int | None = None
    width_mult: float | None = None
    zero_init_residual: bool | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    backbone_scope: ClassVar[tuple[str, ...]] = ("backbone",)

    @nn.nowrap
    def backbone_module(self, name: str | None = None) -> nn.Module:
        """The dilated backbone of this model."""
        if self.backbone not in OUTPUT_STRIDE:
            raise ValueError(f"DeepLabV3.backbone must be one of {tuple(OUTPUT_STRIDE)}; got "
                             f"{self.backbone!r}.")
        return backbone_at_stride(self.backbone, OUTPUT_STRIDE[self.backbone],
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  axis_name=self.axis_name, remat=self.remat, name=name,
                                  **backbone_options(self))

    @nn.nowrap
    def geometry(self) -> Geometry:
        return Geometry(stride=OUTPUT_STRIDE.get(self.backbone, 1))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        check_image_batch(x, "DeepLabV3")
        size = x.shape[1:3]
        maps = self.backbone_module(name="backbone")(x, train)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        head = DeepLabHead(self.num_classes, tuple(self.atrous_rates), self.aspp_features,
                           self.dropout_rate, name="classifier", **kw)
        out = resize_bilinear(head(list(maps.values())[-1], train), size).astype(jnp.float32)
        if not self.aux_loss:
            return out
        aux = FCNHead(self.num_classes, name="aux_classifier", **kw)(
            maps[AUX_MAP[self.backbone]], train)
        return {"out": out, "aux": resize_bilinear(aux, size).astype(jnp.float32)}


_TINY_RESNET = {"blocks": (1, 1, 1, 1), "base_width": 4, "aspp_features": 8}
register_model("deeplabv3_resnet50", functools.partial(DeepLabV3, backbone="resnet50"),
               paper="Chen et al. 2017 on ResNet-50, torchvision's deeplabv3_resnet50",
               tiny=_TINY_RESNET)
register_model("deeplabv3_resnet101", functools.partial(DeepLabV3, backbone="resnet101"),
               paper="Chen et al. 2017 on ResNet-101, torchvision's deeplabv3_resnet101",
               tiny=_TINY_RESNET)
register_model("deeplabv3_mobilenet_v3_large",
               functools.partial(DeepLabV3, backbone="mobilenet_v3_large"),
               paper="Chen et al. 2017 on MobileNetV3-Large, torchvision's "
                     "deeplabv3_mobilenet_v3_large",
               tiny={"width_mult": 0.25, "blocks": TINY_BLOCKS, "aspp_features": 8})
