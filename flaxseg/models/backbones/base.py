"""What a backbone is: feature maps by name, each with its stride and alignment.

A backbone is a Linen module called as `backbone(x, train=bool)` on float NHWC images
`[B, H, W, C]` that returns a dict of feature maps `name -> [B, h, w, c]`, shallow to
deep, and describes them without running:

- `coords()`: for each returned name, a `Coords(stride, offset)`: feature pixel `j` is
  centred on input pixel `stride * j + offset` (what Caffe's `coord_map` computes).
  FCN's skip heads derive their crop offsets from it; the U-Net decoder reads the strides.
- `stages()`: `stride -> name` of the map that ends each downsampling stage (VGG-16:
  pool1 ... pool5 at strides 2 ... 32; ResNet: the stem and layer1 ... layer4).

Layer names are the ones their weights are published under (the FCN reference's
`conv1_1 ... fc7` for VGG-16, torchvision's `conv1`, `bn1`, `layer1.0.conv1` ... for
ResNet), so a converted checkpoint maps onto them name for name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Coords:
    """Feature pixel `j` is centred on input pixel `stride * j + offset`."""

    stride: int = 1
    offset: float = 0.0

    def conv(self, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> Coords:
        """The map after a convolution or pooling window (`kernel`, `stride`, `pad`)."""
        centre = dilation * (kernel - 1) / 2 - pad
        return Coords(self.stride * stride, self.offset + self.stride * centre)

    def upsample(self, kernel: int, stride: int) -> Coords:
        """The map after a 'VALID' transposed convolution (`kernel`, `stride`)."""
        if self.stride % stride:
            raise ValueError(f"cannot upsample a stride-{self.stride} map by {stride}.")
        new_stride = self.stride // stride
        return Coords(new_stride, self.offset - new_stride * (kernel - 1) / 2)


def last_per_stride(coords: dict[str, Coords]) -> dict[int, str]:
    """`stride -> name` of the deepest map at each stride (the U-Net's skips)."""
    return {c.stride: name for name, c in coords.items()}


class Layer(NamedTuple):
    """One layer of a plain convolutional backbone (VGG, AlexNet)."""

    name: str
    features: int  # 0 for a max pool
    kernel: int
    stride: int
    pad: int
    returned: bool  # the layer's output is one of the backbone's maps


class PlainBackbone(nn.Module):
    """A chain of convolutions (each followed by ReLU; the `fc*` ones also by dropout)
    and max pools, as `layers()` lists them; subclasses give the layers and the pool.

    Fields shared by VGG-16 and AlexNet: `widths` (the convolutions' channels, one per
    stage or layer), `fc_features` (fc6, fc7), `input_pad` (the first convolution's
    padding), `ceil_mode` (Caffe's pooling), `dropout_rate`, `dtype`, `param_dtype`.
    """

    widths: tuple[int, ...] = ()
    fc_features: int = 4096
    input_pad: int = 0
    ceil_mode: bool = False
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    default_widths: ClassVar[tuple[int, ...]] = ()

    @nn.nowrap
    def layers(self) -> list[Layer]:
        raise NotImplementedError

    def pool(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    @nn.nowrap
    def check(self) -> None:
        widths = tuple(self.widths)
        name = type(self).__name__
        if len(widths) != len(self.default_widths) or min(widths + (self.fc_features,)) < 1:
            raise ValueError(
                f"{name} widths must be {len(self.default_widths)} positive channel counts "
                f"and fc_features positive; got widths={self.widths!r}, "
                f"fc_features={self.fc_features!r}."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"{name}.dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")

    @nn.nowrap
    def coords(self) -> dict[str, Coords]:
        """Stride and centre offset of every returned map."""
        out, c = {}, Coords()
        for layer in self.layers():
            c = c.conv(layer.kernel, layer.stride, layer.pad)
            if layer.returned:
                out[layer.name] = c
        return out

    @nn.nowrap
    def stages(self) -> dict[int, str]:
        """`stride -> pool name` for the maps that end each downsampling stage."""
        return {c.stride: n for n, c in self.coords().items() if n.startswith("pool")}

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        self.check()
        maps = {}
        x = x.astype(self.dtype)
        for layer in self.layers():
            if not layer.features:
                x = self.pool(x)
            else:
                x = nn.relu(nn.Conv(
                    layer.features, (layer.kernel, layer.kernel), strides=layer.stride,
                    padding=layer.pad, kernel_init=nn.initializers.he_normal(),
                    dtype=self.dtype, param_dtype=self.param_dtype, name=layer.name)(x))
                if layer.name.startswith("fc") and self.dropout_rate > 0.0:
                    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            if layer.returned:
                maps[layer.name] = x
        return maps
