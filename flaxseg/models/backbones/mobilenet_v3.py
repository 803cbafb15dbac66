"""MobileNetV3-Large (Howard et al. 2019) as torchvision's `mobilenet_v3_large` builds it.

`features` of torchvision's network, layer for layer: '0' a 3x3/2 convolution (16,
hard-swish), '1' ... '15' inverted residuals (an optional 1x1 expansion, a depthwise
k x k convolution, an optional squeeze-excitation, a 1x1 projection; ReLU or hard-swish;
a residual sum where the stride is 1 and the width unchanged), '16' a 1x1 convolution to
6 x 160 = 960 channels (hard-swish). Every convolution is followed by BatchNorm (eps
1e-3, PyTorch momentum 0.01) and has no bias; the squeeze-excitation's two 1x1
convolutions (`fc1`, `fc2`) have biases and end in a hard sigmoid.

`dilated=True` is torchvision's `mobilenet_v3_large(dilated=True)`, the segmentation
models' backbone: the last stage ('13' ... '15') keeps stride 16 and dilates its
depthwise convolutions by 2. `width_mult` scales every width as torchvision does
(rounded to multiples of 8): 0.25 is a cheap test variant. `blocks` keeps the first
few inverted residuals of each stride's stage (`STAGE_BLOCKS` = (1, 2, 3, 6, 3) at
strides 2 ... 32 is the whole network), as ResNet's `blocks` does; the kept layers keep
torchvision's numbers, so the taps ('4', the last layer '16') stay where they are.

Names are torchvision's (`'3'/block/0/0` is `features.3.block.0.0`), so the ImageNet
state dict and a segmentation model's `backbone.*` keys map onto them key for key.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.base import Coords
from flaxseg.models.backbones.resnet import batch_norm
from flaxseg.models.layers import Dtype, check_remat, conv_output, rematerialized

EPSILON, MOMENTUM = 1e-3, 0.99  # torchvision's BatchNorm2d(eps=0.001, momentum=0.01)


class Bneck(NamedTuple):
    """One inverted residual of torchvision's `_mobilenet_v3_conf` (widths before
    `width_mult`)."""

    kernel: int
    expanded: int
    out: int
    se: bool
    hard_swish: bool
    stride: int


LARGE = (
    Bneck(3, 16, 16, False, False, 1), Bneck(3, 64, 24, False, False, 2),
    Bneck(3, 72, 24, False, False, 1), Bneck(5, 72, 40, True, False, 2),
    Bneck(5, 120, 40, True, False, 1), Bneck(5, 120, 40, True, False, 1),
    Bneck(3, 240, 80, False, True, 2), Bneck(3, 200, 80, False, True, 1),
    Bneck(3, 184, 80, False, True, 1), Bneck(3, 184, 80, False, True, 1),
    Bneck(3, 480, 112, True, True, 1), Bneck(3, 672, 112, True, True, 1),
    Bneck(5, 672, 160, True, True, 2), Bneck(5, 960, 160, True, True, 1),
    Bneck(5, 960, 160, True, True, 1),
)
STEM_WIDTH = 16
DILATED_FROM = 12  # index in LARGE of the last stage's first block
# LARGE's inverted residuals per stride (2, 4, 8, 16, 32): a stage starts at a stride of 2.
STAGE_BLOCKS = (1, 2, 3, 6, 3)
# The registry's cheap variants (`tiny`): 6 of the 15 blocks, each kind still there (ReLU
# and hard-swish, with and without squeeze-excitation, a residual sum, a dilated one).
TINY_BLOCKS = (1, 1, 1, 1, 2)


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: the nearest multiple of `divisor`, never below
    `divisor` nor 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvNormActivation(nn.Module):
    """torchvision's `Conv2dNormActivation`: conv '0' (no bias, padding
    `(k - 1) // 2 * dilation`), BatchNorm '1', then `activation` (None: none)."""

    features: int
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    activation: str | None = "relu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = (self.kernel - 1) // 2 * self.dilation
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                    padding=pad, kernel_dilation=self.dilation,
                    feature_group_count=self.groups, use_bias=False,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    dtype=self.dtype, param_dtype=self.param_dtype, name="0")(x)
        x = batch_norm("1", self.dtype, self.param_dtype, self.axis_name, EPSILON, MOMENTUM)(
            conv_output(x), use_running_average=not train)
        return activate(x, self.activation)


def activate(x: jax.Array, activation: str | None) -> jax.Array:
    """'relu', 'hard_swish' (x * relu6(x + 3) / 6, PyTorch's Hardswish) or None."""
    if activation is None:
        return x
    return nn.relu(x) if activation == "relu" else jax.nn.hard_swish(x)


class SqueezeExcitation(nn.Module):
    """torchvision's `SqueezeExcitation` with a hard sigmoid: `x * hsig(fc2(relu(fc1(
    mean over H, W))))`, `fc1` to `squeeze` channels."""

    squeeze: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # The mean over the whole image: under spatial partitions XLA reduces across them.
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = nn.relu(nn.Conv(self.squeeze, (1, 1), name="fc1", **kw)(scale))
        scale = nn.Conv(x.shape[-1], (1, 1), name="fc2", **kw)(scale)
        return x * jax.nn.hard_sigmoid(scale)


class InvertedBlock(nn.Module):
    """The layers of an inverted residual, torchvision's `block` Sequential: '0' the 1x1
    expansion (absent when `expanded` is the input's width), then the depthwise k x k
    convolution, the squeeze-excitation (if `se`) and the 1x1 projection, numbered on."""

    expanded: int
    out: int
    kernel: int
    stride: int
    dilation: int
    se: bool
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        index = 0
        if self.expanded != x.shape[-1]:
            x = ConvNormActivation(self.expanded, activation=self.activation, name="0",
                                   **kw)(x, train)
            index = 1
        x = ConvNormActivation(self.expanded, self.kernel, self.stride, self.dilation,
                               groups=self.expanded, activation=self.activation,
                               name=str(index), **kw)(x, train)
        if self.se:
            index += 1
            x = SqueezeExcitation(make_divisible(self.expanded // 4), dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=str(index))(x)
        return ConvNormActivation(self.out, activation=None, name=str(index + 1), **kw)(
            x, train)


class InvertedResidual(InvertedBlock):
    """`InvertedBlock` as 'block', plus the input where `residual` (torchvision: the
    configured stride is 1 and the width unchanged)."""

    residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = InvertedBlock(self.expanded, self.out, self.kernel, self.stride, self.dilation,
                          self.se, self.activation, dtype=self.dtype,
                          param_dtype=self.param_dtype, axis_name=self.axis_name,
                          name="block")(x, train)
        return y + x if self.residual else y


class MobileNetV3(nn.Module):
    """MobileNetV3-Large features: `[B, H, W, C]` -> `{'0': ..., '1': ..., '16': ...}`,
    every layer of torchvision's `features` by its index (see `coords()`; the ImageNet
    classifier is not part of it). BatchNorm statistics live in `batch_stats`,
    synchronised over `axis_name` under pmap. `remat`: each inverted residual is one remat
    unit (see `flaxseg.models.layers`). `blocks`: the inverted residuals kept per stride's
    stage (default all, `STAGE_BLOCKS`); a cheap variant, not torchvision's network.
    """

    dilated: bool = False
    width_mult: float = 1.0
    blocks: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    @nn.nowrap
    def _kept(self) -> list[int]:
        """The indices in LARGE of the inverted residuals `blocks` keeps."""
        blocks = STAGE_BLOCKS if self.blocks is None else tuple(self.blocks)
        if len(blocks) != len(STAGE_BLOCKS) or not all(
                1 <= n <= full for n, full in zip(blocks, STAGE_BLOCKS, strict=True)):
            raise ValueError(f"MobileNetV3.blocks must keep 1 to {STAGE_BLOCKS} blocks per "
                             f"stage (strides 2 ... 32); got {self.blocks!r}.")
        starts = [sum(STAGE_BLOCKS[:k]) for k in range(len(STAGE_BLOCKS))]
        return [start + j for start, n in zip(starts, blocks, strict=True) for j in range(n)]

    @nn.nowrap
    def _plan(self) -> list[tuple[int, Bneck, int, int, int]]:
        """(index in LARGE, config, depthwise stride, dilation, output stride) of each
        kept inverted residual."""
        if not self.width_mult > 0:
            raise ValueError(f"MobileNetV3.width_mult must be positive; got {self.width_mult!r}.")
        plan, stride = [], 2
        for i in self._kept():
            b = LARGE[i]
            stride *= b.stride
            dilated = self.dilated and i >= DILATED_FROM
            if dilated and b.stride == 2:
                stride //= 2
            plan.append((i, b, 1 if dilated else b.stride, 2 if dilated else 1, stride))
        return plan

    @nn.nowrap
    def coords(self) -> dict[str, Coords]:
        """Every map is centred on input pixel `stride * j` (symmetric padding)."""
        plan = self._plan()
        out = {"0": Coords(2)}
        out.update({str(i + 1): Coords(stride) for i, *_, stride in plan})
        out[str(len(LARGE) + 1)] = Coords(plan[-1][-1])
        return out

    @nn.nowrap
    def stages(self) -> dict[int, str]:
        return {c.stride: name for name, c in self.coords().items()}

    @nn.nowrap
    def width(self, channels: int) -> int:
        """A torchvision width at this `width_mult`."""
        return make_divisible(channels * self.width_mult)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        check_remat(self.remat, type(self).__name__)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        x = ConvNormActivation(self.width(STEM_WIDTH), 3, 2, activation="hard_swish",
                               name="0", **kw)(x.astype(self.dtype), train)
        maps = {"0": x}
        block = rematerialized(InvertedResidual, self.remat)
        for i, b, stride, dilation, _ in self._plan():
            residual = b.stride == 1 and x.shape[-1] == self.width(b.out)
            x = block(self.width(b.expanded), self.width(b.out), b.kernel, stride, dilation,
                      b.se, "hard_swish" if b.hard_swish else "relu", residual=residual,
                      name=str(i + 1), **kw)(x, train)
            maps[str(i + 1)] = x
        last = str(len(LARGE) + 1)
        maps[last] = ConvNormActivation(6 * self.width(LARGE[-1].out), activation="hard_swish",
                                        name=last, **kw)(x, train)
        return maps
