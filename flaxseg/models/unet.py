"""U-Net (Ronneberger, Fischer, Brox 2015), with the paper's VALID or a SAME padding.

Contracting path: `depth` stages of two 3x3 conv + ReLU and a 2x2/stride-2 max pool,
channels `features * 2**i`; the skip is each stage's output before pooling. A
bottleneck of two 3x3 convs with `features * 2**depth` channels. Dropout after the
last encoder stage and after the bottleneck (the paper's "drop-out layers at the end
of the contracting path"). Expanding path: a 2x2/stride-2 transposed conv halving the
channels, the (centre-cropped) skip concatenated, two 3x3 conv + ReLU. A final 1x1
conv gives `num_classes` logits.

- `padding='VALID'` is the paper's network: unpadded convs, skips centre-cropped,
  572x572 -> 388x388 at depth 4. `unet_output_size` gives the output size and
  `unet_valid_input_sizes` the sizes it accepts; other sizes raise ValueError.
- `padding='SAME'` accepts any H, W: the input is zero-padded (split evenly, the odd
  pixel at the bottom/right) up to a multiple of `2**depth` and the logits are
  cropped back to the input's region, so logits have the input's H, W.
"""

from __future__ import annotations

import functools
import itertools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import create_backbone, last_per_stride
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import (
    NORMS,
    Conv1x1,
    ConvBlock,
    ConvTranspose,
    Dtype,
    center_crop,
    check_image_batch,
    check_remat,
    max_pool_2x2,
    rematerialized,
    resize_bilinear,
)
from flaxseg.models.registry import register_model

PADDINGS = ("SAME", "VALID")
ENCODERS = ("vgg16", "resnet50", "resnet101")
MAX_ENCODER_DEPTH = 5  # the backbones end at stride 32
UPSAMPLES = ("transpose", "bilinear")


def _valid_output_size(size: int, depth: int) -> int | None:
    """The VALID U-Net's output size for input `size`, or None if it cannot take it."""
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4  # bottleneck
    if size <= 0:
        return None
    for _ in range(depth):
        size = 2 * size - 4
    return size if size > 0 else None


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer; got {depth!r}.")


def unet_valid_input_sizes(min_size: int, max_size: int, depth: int = 4) -> list[int]:
    """The input sizes in `[min_size, max_size]` that the VALID U-Net of `depth` accepts.

    They are spaced `2**depth` apart: 572 is one of them at depth 4 (sizes 188, 204, ...).
    """
    _check_depth(depth)
    return [s for s in range(max(1, min_size), max_size + 1) if _valid_output_size(s, depth)]


def _nearest_valid(size: int, depth: int) -> tuple[int | None, int]:
    below = next((s for s in range(size - 1, 0, -1) if _valid_output_size(s, depth)), None)
    # Valid sizes repeat every 2**depth above the smallest one, so this search ends.
    above = next(s for s in itertools.count(size + 1) if _valid_output_size(s, depth))
    return below, above


def unet_output_size(size: int, depth: int = 4) -> int:
    """Output H (or W) of the VALID U-Net for input H (or W) `size`.

    `unet_output_size(572, 4) == 388`. Raises ValueError naming the nearest valid
    input sizes when the unpadded convs or a pool would hit an odd or empty map.
    """
    _check_depth(depth)
    out = _valid_output_size(int(size), depth)
    if out is None:
        below, above = _nearest_valid(int(size), depth)
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"The VALID U-Net (depth {depth}) cannot take an input of size {size}: every "
            f"pool needs an even map after the unpadded convs. Nearest valid sizes: "
            f"{nearest} (see flaxseg.models.unet_valid_input_sizes); or use padding='SAME'."
        )
    return out


class UNet(nn.Module):
    """U-Net: `[B, H, W, C]` float images -> float32 logits `[B, H', W', num_classes]`.

    `H' = H` for `padding='SAME'`, `unet_output_size(H, depth)` for 'VALID'.
    `norm`: None (the paper), 'batch' (statistics in `batch_stats`, synchronised over
    `axis_name` under pmap) or 'group' (GroupNorm, `gcd(features_i, 32)` groups).
    `upsample`: 'transpose' (the paper's 2x2 up-convolution) or 'bilinear' (bilinear
    2x resize followed by a 1x1 conv that halves the channels). Dropout is active only
    with `train=True` and reads the `'dropout'` rng stream.

    `encoder`: None (the paper's contracting path), or a pretrained backbone ('vgg16',
    'resnet50', 'resnet101'; see `flaxseg.models.backbones`) cut at stride `2**depth`
    (depth <= 5), whose deepest map at each stride 1 ... `2**(depth-1)` is the skip of
    the decoder stage at that stride (none where the backbone has no map, e.g. ResNet at
    stride 1) and whose stride-`2**depth` map replaces the bottleneck. Its variables sit
    under 'encoder', as `flaxseg.models.weights` loads them; it needs padding='SAME'.

    `remat`: what the backward pass recomputes instead of storing (`REMAT_POLICIES` in
    `flaxseg.models.layers`: 'none', 'block' — each conv block — or 'save_convs');
    outputs and gradients are the same, memory lower, steps slower.
    """

    num_classes: int
    features: int = 64
    depth: int = 4
    padding: str = "SAME"
    dropout_rate: float = 0.3
    norm: str | None = None
    upsample: str = "transpose"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    encoder: str | None = None
    remat: str = "none"

    skip_connections: ClassVar[bool] = True
    backbone_scope: ClassVar[tuple[str, ...]] = ("encoder",)

    @nn.nowrap
    def geometry(self) -> Geometry:
        """Inputs padded to a multiple of `2**depth`; VALID: `unet_output_size`."""
        if self.padding == "VALID":
            return Geometry(stride=2**self.depth,
                            output_size=functools.partial(unet_output_size, depth=self.depth))
        return Geometry(stride=2**self.depth)

    @nn.nowrap
    def backbone_module(self, name: str | None = None) -> nn.Module:
        """The pretrained encoder (cut at stride `2**depth`)."""
        if self.encoder not in ENCODERS:
            raise ValueError(f"{type(self).__name__}.encoder must be one of {ENCODERS}; "
                             f"got {self.encoder!r}.")
        if self.padding != "SAME" or not 1 <= self.depth <= MAX_ENCODER_DEPTH:
            raise ValueError(
                f"A U-Net with encoder={self.encoder!r} needs padding='SAME' and depth 1 to "
                f"{MAX_ENCODER_DEPTH}; got padding={self.padding!r}, depth={self.depth!r}.")
        kw = dict(max_stride=2**self.depth, dtype=self.dtype, param_dtype=self.param_dtype,
                  name=name)
        if self.encoder == "vgg16":
            return create_backbone("vgg16", fc=False, remat=self.remat, **kw)
        return create_backbone(self.encoder, axis_name=self.axis_name, remat=self.remat, **kw)

    def _check_fields(self) -> None:
        name = type(self).__name__
        if self.padding not in PADDINGS:
            raise ValueError(f"{name}.padding must be one of {PADDINGS}; got {self.padding!r}.")
        if self.norm not in NORMS:
            raise ValueError(f"{name}.norm must be one of {NORMS}; got {self.norm!r}.")
        if self.upsample not in UPSAMPLES:
            raise ValueError(
                f"{name}.upsample must be one of {UPSAMPLES}; got {self.upsample!r}."
            )
        _check_depth(self.depth)
        check_remat(self.remat, name)
        for field in ("num_classes", "features"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive integer; got {value!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"{name}.dropout_rate must be in [0, 1); got {self.dropout_rate!r}."
            )

    def _block(self, features: int, name: str) -> ConvBlock:
        return rematerialized(ConvBlock, self.remat)(
            features,
            padding=self.padding,
            norm=self.norm,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.axis_name,
            name=name,
        )

    def _dropout(self, x: jax.Array, train: bool) -> jax.Array:
        if self.dropout_rate == 0.0:
            return x
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    def _up(self, x: jax.Array, features: int, name: str) -> jax.Array:
        if self.upsample == "transpose":
            return ConvTranspose(
                features, 2, 2, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )(x)
        _, h, w, _ = x.shape
        x = resize_bilinear(x, (2 * h, 2 * w))
        return Conv1x1(
            features,
            kernel_init=nn.initializers.he_normal(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    def _contract(self, x: jax.Array, train: bool) -> tuple[list[jax.Array], jax.Array]:
        """The paper's contracting path: (the skips, the bottleneck's output)."""
        skips = []
        for i in range(self.depth):
            x = self._block(self.features * 2**i, f"encoder_{i}")(x, train)
            if i == self.depth - 1:
                x = self._dropout(x, train)
            skips.append(x)
            x = max_pool_2x2(x)
        x = self._block(self.features * 2**self.depth, "bottleneck")(x, train)
        return skips, self._dropout(x, train)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        name = type(self).__name__
        self._check_fields()
        check_image_batch(x, name)
        height, width = x.shape[1:3]
        if self.padding == "VALID":
            unet_output_size(height, self.depth)  # raises early on a size it cannot take
            unet_output_size(width, self.depth)
        else:
            # Pad to a multiple of 2**depth so every pool sees an even map.
            mult = 2**self.depth
            pad_h, pad_w = -height % mult, -width % mult
            top, left = pad_h // 2, pad_w // 2
            x = jnp.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))
        x = x.astype(self.dtype)

        if self.encoder is None:
            skips, x = self._contract(x, train)
        else:
            encoder = self.backbone_module(name="encoder")
            maps = encoder(x, train)
            by_stride = last_per_stride(encoder.coords())
            skips = [maps.get(by_stride.get(2**i)) for i in range(self.depth)]
            x = self._dropout(maps[by_stride[2**self.depth]], train)
        for i in reversed(range(self.depth)):
            x = self._up(x, self.features * 2**i, f"upconv_{i}")
            if self.skip_connections and skips[i] is not None:
                x = jnp.concatenate([center_crop(skips[i], x.shape[1:3]), x], axis=-1)
            x = self._block(self.features * 2**i, f"decoder_{i}")(x, train)
        logits = Conv1x1(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(x)
        if self.padding == "SAME":
            logits = logits[:, top : top + height, left : left + width]
        return logits.astype(jnp.float32)


_TINY = {"features": 4, "depth": 2}
register_model("unet", functools.partial(UNet, padding="SAME"),
               paper="Ronneberger et al. 2015, SAME padding", tiny=_TINY)
register_model("unet_valid", functools.partial(UNet, padding="VALID"),
               paper="Ronneberger et al. 2015", tiny=_TINY)
register_model("unet_vgg16", functools.partial(UNet, encoder="vgg16", norm="batch"),
               paper="U-Net decoder on an ImageNet VGG-16 encoder", tiny=_TINY)
register_model("unet_resnet50", functools.partial(UNet, encoder="resnet50", norm="batch"),
               paper="U-Net decoder on an ImageNet ResNet-50 encoder", tiny=_TINY)
