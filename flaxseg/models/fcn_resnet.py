"""FCN on ResNet-50 / ResNet-101 in torchvision's form (`fcn_resnet50`, `fcn_resnet101`).

The backbone is torchvision's ResNet with layer3 and layer4 dilated instead of strided
(output stride 8); `classifier` is its `FCNHead` on layer4: a 3x3 convolution 2048 ->
512 without bias, BatchNorm, ReLU, dropout 0.1, a 1x1 convolution to the classes; the
logits are resized bilinearly to the input's size (PyTorch's `align_corners=False`).
With `aux_loss=True` an `aux_classifier` (the same head, 1024 -> 256) scores layer3 and
the model returns `{'out': logits, 'aux': aux_logits}`, as torchvision's does.

Names are torchvision's (`backbone/layer4/2/conv3`, `classifier/0`, `classifier/4`,
`aux_classifier/...`), so `flaxseg.models.from_torchvision('fcn_resnet50', path)` loads
`fcn_resnet50_coco-*.pth` key for key. Parameter counts (21 classes) equal torchvision's
`num_params`: 35,322,218 (ResNet-50) and 54,314,346 (ResNet-101), both with the
auxiliary head.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.resnet import ResNet, batch_norm
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import Dtype, check_image_batch, resize_bilinear
from flaxseg.models.registry import register_model

DILATION = (False, True, True)  # torchvision's replace_stride_with_dilation for FCN


class FCNHead(nn.Module):
    """torchvision's `FCNHead`: 3x3 conv (C -> C/4, no bias) '0', BatchNorm '1', ReLU,
    dropout (0.1), 1x1 conv to `num_classes` '4'."""

    num_classes: int
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(x.shape[-1] // 4, (3, 3), padding=1, use_bias=False, name="0", **kw)(x)
        x = batch_norm("1", self.dtype, self.param_dtype, self.axis_name)(
            x, use_running_average=not train)
        x = nn.relu(x)
        if self.dropout_rate > 0.0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Conv(self.num_classes, (1, 1), name="4", **kw)(x)


class FCNResNet(nn.Module):
    """FCN-ResNet: `[B, H, W, C]` -> float32 logits `[B, H, W, num_classes]`, or
    `{'out': ..., 'aux': ...}` with `aux_loss=True`.

    `depth` 50 or 101; `blocks` / `base_width` make cheap test variants (see `ResNet`).
    Dropout (0.1, in the heads) runs only with `train=True` and reads the `'dropout'` rng
    stream; BatchNorm statistics live in `batch_stats`, synchronised over `axis_name`.
    `remat`: each backbone bottleneck recomputed in the backward pass ('block',
    'save_convs'; see `flaxseg.models.layers`).
    """

    num_classes: int
    depth: int = 50
    aux_loss: bool = False
    dropout_rate: float = 0.1
    blocks: tuple[int, ...] | None = None
    base_width: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    backbone_scope: ClassVar[tuple[str, ...]] = ("backbone",)  # where the backbone's variables sit

    @nn.nowrap
    def backbone_module(self, name: str | None = None) -> ResNet:
        """The dilated ResNet of this model."""
        return ResNet(depth=self.depth, dilation=DILATION, blocks=self.blocks,
                      base_width=self.base_width, dtype=self.dtype,
                      param_dtype=self.param_dtype, axis_name=self.axis_name,
                      remat=self.remat, name=name)

    @nn.nowrap
    def geometry(self) -> Geometry:
        return Geometry(stride=8)

    def _head(self, name: str) -> FCNHead:
        return FCNHead(self.num_classes, self.dropout_rate, dtype=self.dtype,
                       param_dtype=self.param_dtype, axis_name=self.axis_name, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        check_image_batch(x, "FCNResNet")
        size = x.shape[1:3]
        maps = self.backbone_module(name="backbone")(x, train)
        out = resize_bilinear(self._head("classifier")(maps["layer4"], train), size)
        if not self.aux_loss:
            return out.astype(jnp.float32)
        aux = resize_bilinear(self._head("aux_classifier")(maps["layer3"], train), size)
        return {"out": out.astype(jnp.float32), "aux": aux.astype(jnp.float32)}


_TINY = {"blocks": (1, 1, 1, 1), "base_width": 4}
register_model("fcn_resnet50", functools.partial(FCNResNet, depth=50),
               paper="Long et al. 2015 on ResNet-50, torchvision's fcn_resnet50", tiny=_TINY)
register_model("fcn_resnet101", functools.partial(FCNResNet, depth=101),
               paper="Long et al. 2015 on ResNet-101, torchvision's fcn_resnet101",
               tiny=_TINY)
