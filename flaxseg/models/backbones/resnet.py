"""ResNet-50 / ResNet-101 (He et al. 2016) as torchvision builds them, layer for layer.

torchvision's `ResNet` with `Bottleneck` blocks (v1.5: the stride sits on the 3x3
convolution): conv1 7x7/2 (64, no bias), bn1, ReLU, 3x3/2 max pool (pad 1), then
layer1 ... layer4 of 3, 4, 6, 3 (ResNet-50) or 3, 4, 23, 3 (ResNet-101) blocks of
1x1 -> 3x3 -> 1x1 convolutions (`planes` 64, 128, 256, 512; output 4 x planes), each
followed by BatchNorm (eps 1e-5, PyTorch momentum 0.1 = Flax momentum 0.9), the
first block of each layer with a `downsample` (1x1 conv + BatchNorm) shortcut.

`dilation` is torchvision's `replace_stride_with_dilation` for layer2 ... layer4: a
replaced stride becomes a dilation of the following 3x3 convolutions, as in
torchvision's segmentation models (`(False, True, True)`: output stride 8).
Names are torchvision's (`conv1`, `bn1`, `layer3/5/conv2`, `layer1/0/downsample/0`),
so a state dict maps onto them key for key.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones.base import Coords
from flaxseg.models.layers import (
    Dtype,
    check_remat,
    conv_output,
    max_pool_3x3,
    rematerialized,
)

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


def _conv(features: int, kernel: int, name: str, stride: int = 1, dilation: int = 1,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Conv:
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad,
                   kernel_dilation=dilation, use_bias=False,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   dtype=dtype, param_dtype=param_dtype, name=name)


def batch_norm(name: str, dtype: Dtype, param_dtype: Dtype, axis_name: str | None,
               epsilon: float = 1e-5, momentum: float = 0.9, zero_scale: bool = False
               ) -> nn.BatchNorm:
    """torchvision's `BatchNorm2d` (default eps 1e-5, PyTorch momentum 0.1 = Flax
    `momentum` 0.9) as a Flax BatchNorm; call it with `use_running_average=not train`.
    `zero_scale`: its scale starts at 0 instead of 1 (torchvision's `zero_init_residual`)."""
    return nn.BatchNorm(momentum=momentum, epsilon=epsilon, axis_name=axis_name, dtype=dtype,
                        param_dtype=param_dtype, name=name,
                        scale_init=nn.initializers.zeros if zero_scale else
                        nn.initializers.ones)


class Downsample(nn.Module):
    """The shortcut's 1x1 convolution ('0') and BatchNorm ('1'), torchvision's names."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, 1, "0", self.stride, dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
        norm = batch_norm("1", self.dtype, self.param_dtype, self.axis_name)
        return norm(x, use_running_average=not train)


class Bottleneck(nn.Module):
    """1x1 (planes) -> 3x3 (planes, `stride`, `dilation`) -> 1x1 (4 x planes), each with
    BatchNorm; ReLU after the sum with the (downsampled) input. `zero_init_residual`: the
    last BatchNorm's scale starts at 0, so the block starts as its shortcut."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def norm(name: str, y: jax.Array) -> jax.Array:
            bn = batch_norm(name, self.dtype, self.param_dtype, self.axis_name,
                            zero_scale=self.zero_init_residual and name == "bn3")
            return bn(conv_output(y), use_running_average=not train)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = nn.relu(norm("bn1", _conv(self.planes, 1, "conv1", **kw)(x)))
        out = _conv(self.planes, 3, "conv2", self.stride, self.dilation, **kw)(out)
        out = nn.relu(norm("bn2", out))
        out = norm("bn3", _conv(self.planes * EXPANSION, 1, "conv3", **kw)(out))
        if self.downsample:
            x = Downsample(self.planes * EXPANSION, self.stride, name="downsample",
                           axis_name=self.axis_name, **kw)(x, train)
        return nn.relu(out + x)


class ResLayer(nn.Module):
    """torchvision's `_make_layer`: `blocks` Bottlenecks named '0', '1', ..."""

    planes: int
    blocks: int
    stride: int
    dilation: int  # of the blocks after the first
    first_dilation: int
    downsample: bool
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name,
                  zero_init_residual=self.zero_init_residual)
        block = rematerialized(Bottleneck, self.remat)
        x = block(self.planes, self.stride, self.first_dilation, self.downsample,
                  name="0", **kw)(x, train)
        for i in range(1, self.blocks):
            x = block(self.planes, dilation=self.dilation, name=str(i), **kw)(x, train)
        return x


class ResNet(nn.Module):
    """ResNet features: `[B, H, W, C]` -> `{'stem', 'layer1', ..., 'layer4'}`.

    `stem` is ReLU(bn1(conv1)) at stride 2 (before the max pool); layer1 ... layer4 are
    at strides 4, 8, 16, 32, or 8 for every dilated layer (see `coords()`). `depth` 50
    or 101 picks the block counts; `blocks` and `base_width` (planes of layer1, default
    64) override them for cheap test variants. Layers past `max_stride` are not built.
    BatchNorm statistics live in `batch_stats`, synchronised over `axis_name` under pmap.
    `remat`: each bottleneck is one remat unit (see `flaxseg.models.layers`).
    `zero_init_residual` is torchvision's (Goyal et al. 2017): each block's last BatchNorm
    scale starts at 0, so every block starts as its shortcut; it speeds up training from
    scratch and does not change a loaded file.
    """

    depth: int = 50
    dilation: tuple[bool, bool, bool] = (False, False, False)
    blocks: tuple[int, ...] | None = None
    base_width: int = 64
    max_stride: int = 32
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    remat: str = "none"

    @nn.nowrap
    def _blocks(self) -> tuple[int, ...]:
        if self.blocks is not None:
            blocks = tuple(self.blocks)
        elif self.depth in BLOCKS:
            blocks = BLOCKS[self.depth]
        else:
            raise ValueError(f"ResNet depth must be one of {tuple(BLOCKS)}; got {self.depth!r}.")
        if len(blocks) != 4 or min(blocks) < 1 or len(tuple(self.dilation)) != 3:
            raise ValueError(
                f"ResNet needs 4 positive block counts and 3 dilation flags; got "
                f"blocks={blocks}, dilation={self.dilation!r}.")
        return blocks

    @nn.nowrap
    def _plan(self) -> list[tuple[str, int, int, int]]:
        """(layer name, stride, dilation of later blocks, dilation of the first block)."""
        plan, dilation, stride = [], 1, 4
        for i, dilate in enumerate((False, *self.dilation)):
            previous, step = dilation, 1 if i == 0 else 2
            if dilate:
                dilation, step = dilation * 2, 1
            stride *= step
            if stride > self.max_stride:
                break
            plan.append((f"layer{i + 1}", step, dilation, previous))
        return plan

    @nn.nowrap
    def coords(self) -> dict[str, Coords]:
        """Every map is centred on input pixel `stride * j` (offset 0)."""
        out = {"stem": Coords(2)}
        stride = 4
        for name, step, _, _ in self._plan():
            stride *= step
            out[name] = Coords(stride)
        return out

    @nn.nowrap
    def stages(self) -> dict[int, str]:
        return {c.stride: name for name, c in self.coords().items()}

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        blocks = self._blocks()
        check_remat(self.remat, type(self).__name__)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.base_width, 7, "conv1", 2, **kw)(x.astype(self.dtype))
        x = batch_norm("bn1", self.dtype, self.param_dtype, self.axis_name)(
            x, use_running_average=not train)
        maps = {"stem": nn.relu(x)}
        x = max_pool_3x3(maps["stem"], padding=1)
        channels = self.base_width
        for i, (name, step, dilation, first) in enumerate(self._plan()):
            planes = self.base_width * 2**i
            x = ResLayer(planes, blocks[i], step, dilation, first,
                         downsample=step != 1 or channels != planes * EXPANSION,
                         zero_init_residual=self.zero_init_residual, axis_name=self.axis_name,
                         remat=self.remat, name=name, **kw)(x, train)
            channels = planes * EXPANSION
            maps[name] = x
        return maps
