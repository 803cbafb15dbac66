"""FCN-32s / 16s / 8s (Long, Shelhamer, Darrell 2015) on VGG-16 or AlexNet, layer for layer.

Layers carry the reference's names (`voc-fcn*s/net.py`, `voc-fcn-alexnet/net.py`): the
backbone's (VGG-16: conv1_1 ... conv5_3, fc6, fc7; AlexNet: conv1 ... conv5, fc6, fc7;
see `flaxseg.models.backbones`), side by side with the head's: score_fr (1x1 to
classes), score_pool4 / score_pool3 (1x1 on the stride-16 / stride-8 pools) and the
transposed convolutions upscore2 / upscore_pool4 (x2) and upscore32 / upscore16 /
upscore8 (to the input's resolution), without bias and initialised to bilinear
interpolation. Skips are fused by addition. The score layers start at zero, as in the
reference, so a net grown from a coarser one (or from ImageNet weights) starts out
computing the coarser one's output.

Alignment follows the reference exactly: the backbone's first convolution pads the
input by 100, pooling rounds up (Caffe's ceil mode), and each crop takes the offset
Caffe's `coord_map` derives from the layers' geometry (`_Head.plan`): on VGG-16
score_pool4 at 5, score_pool3 at 9, the final score at 19 / 27 / 31 for 32s / 16s / 8s.
Each transposed convolution has kernel 2f (f its factor), or 2f - 1 where 2f would
leave a half-pixel offset (FCN-AlexNet's upscore: 63 at stride 32, the reference's).
Output pixel (i, j) is aligned with input pixel (i, j): an input shifted by a multiple
of 32 pixels gives logits shifted by as much (away from the image borders, which the
~400 px receptive field sees). Inputs of at least `MIN_SIZE[backbone]` pixels a side
give logits of their own H, W.
"""

from __future__ import annotations

import functools
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.backbones import Coords, create_backbone
from flaxseg.models.geometry import Geometry
from flaxseg.models.layers import ConvTranspose, Dtype, bilinear_init, check_image_batch
from flaxseg.models.registry import register_model

VARIANTS = ("32s", "16s", "8s")
SKIP_STRIDES = {"32s": (), "16s": (16,), "8s": (16, 8)}
INPUT_PAD = 100  # the reference's conv1 padding
# The smallest input side that every crop of the net can take (checked by the tests).
MIN_SIZE = {"vgg16": 32, "alexnet": 1}


class Upscore(NamedTuple):
    """One transposed convolution of the head and the crop that follows it."""

    name: str
    factor: int
    kernel: int
    skip: str | None  # the pool fused after it (cropped at `crop`); None: the final score
    crop: int  # offset of the crop: of the skip's score, or of the final score


def _aligned_kernel(c: Coords, factor: int, target: Coords, crop_target: bool
                    ) -> tuple[int, int]:
    """(kernel, crop): the kernel 2f or 2f - 1 whose upsampled output lines up with
    `target` at a whole, non-negative offset, as Caffe's `coord_map` crops need; the
    crop is taken from `target` (a skip) or, with `crop_target=False`, from the output."""
    for kernel in (2 * factor, 2 * factor - 1):
        up = c.upsample(kernel, factor)
        crop = (up.offset - target.offset) / target.stride
        crop = crop if crop_target else -crop
        if crop >= 0 and crop == int(crop):
            return kernel, int(crop)
    raise ValueError(
        f"FCN cannot align a stride-{c.stride} map (offset {c.offset}) with a stride-"
        f"{target.stride} one (offset {target.offset}) by a x{factor} upsampling.")


def head_plan(coords: dict[str, Coords], stages: dict[int, str], variant: str
              ) -> tuple[Upscore, ...]:
    """The head's upsamplings for a backbone's maps: names, kernels and crop offsets.

    `coords` are the backbone's maps (the last one, fc7, is scored by score_fr) and
    `stages[s]` the pool fused at stride s. On VGG-16 with pad 100 this gives the
    reference's offsets: score_pool4 5, score_pool3 9, final 19 / 27 / 31.
    """
    top = list(coords)[-1]
    c, steps, previous = coords[top], [], None
    for stride in SKIP_STRIDES[variant]:
        skip = stages[stride]
        factor = c.stride // stride
        kernel, crop = _aligned_kernel(c, factor, coords[skip], crop_target=True)
        name = "upscore2" if previous is None else f"upscore_{previous}"
        steps.append(Upscore(name, factor, kernel, skip, crop))
        c, previous = c.upsample(kernel, factor), skip
    kernel, crop = _aligned_kernel(c, c.stride, Coords(1, 0.0), crop_target=False)
    steps.append(Upscore(f"upscore{c.stride}", c.stride, kernel, None, crop))
    return tuple(steps)


def _crop(x: jax.Array, offset: int, size: tuple[int, int]) -> jax.Array:
    """`x[:, offset:offset+h, offset:offset+w]` — Caffe's Crop layer."""
    h, w = size
    if x.shape[1] < offset + h or x.shape[2] < offset + w:
        raise ValueError(f"FCN cannot crop {h}x{w} at offset {offset} from a "
                         f"{x.shape[1]}x{x.shape[2]} map; the input is too small.")
    return x[:, offset : offset + h, offset : offset + w]


class FCN(nn.Module):
    """FCN: `[B, H, W, C]` float images (H, W >= `MIN_SIZE[backbone]`) -> float32 logits
    `[B, H, W, num_classes]`.

    `variant` '32s', '16s' or '8s' picks the skip architecture; `backbone` 'vgg16' (the
    paper's FCN-VGG16) or 'alexnet' (its Table 1's FCN-AlexNet, on torchvision's
    AlexNet). Dropout (after fc6 and fc7) is active only with `train=True` and reads the
    `'dropout'` rng stream. The model has no BatchNorm; `axis_name` is accepted for a
    uniform interface. `widths` (the backbone's convolution channels) and `fc_features`
    default to the backbone's; smaller values give a cheap variant for tests.
    """

    num_classes: int
    variant: str = "8s"
    backbone: str = "vgg16"
    dropout_rate: float = 0.5
    widths: tuple[int, ...] | None = None
    fc_features: int = 4096
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    backbone_scope: ClassVar[tuple[str, ...]] = ()  # the backbone's variables: top level

    @nn.nowrap
    def backbone_module(self) -> nn.Module:
        """The backbone as FCN runs it (pad 100, ceil-mode pools); its parameters sit
        at the top level of FCN's, beside the head's."""
        if self.backbone not in MIN_SIZE:
            raise ValueError(f"FCN.backbone must be one of {tuple(MIN_SIZE)}; "
                             f"got {self.backbone!r}.")
        widths = {} if self.widths is None else {"widths": tuple(self.widths)}
        return create_backbone(
            self.backbone, input_pad=INPUT_PAD, ceil_mode=True, fc_features=self.fc_features,
            dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
            **widths)

    @nn.nowrap
    def geometry(self) -> Geometry:
        return Geometry(stride=32, min_size=MIN_SIZE.get(self.backbone, 1))

    def _check_fields(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"FCN.variant must be one of {VARIANTS}; got {self.variant!r}.")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"FCN.num_classes must be a positive integer; got {n!r}.")

    def _upscore(self, x: jax.Array, step: Upscore) -> jax.Array:
        return ConvTranspose(
            self.num_classes, kernel_size=step.kernel, stride=step.factor, use_bias=False,
            kernel_init=bilinear_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name=step.name,
        )(x)

    def _score(self, x: jax.Array, name: str) -> jax.Array:
        """A 1x1 scoring layer, zero-initialised (see module doc)."""
        return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros_init(),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check_fields()
        check_image_batch(x, "FCN")
        self.geometry().output_shape(*x.shape[1:3], model="FCN")  # raises when too small
        backbone = self.backbone_module()
        nn.share_scope(self, backbone)  # the reference's flat names: conv1_1 beside score_fr
        maps = backbone(x, train)
        plan = head_plan(backbone.coords(), backbone.stages(), self.variant)
        y = self._score(maps[list(backbone.coords())[-1]], "score_fr")
        for step in plan:
            y = self._upscore(y, step)
            if step.skip is not None:
                score = self._score(maps[step.skip], f"score_{step.skip}")
                y = y + _crop(score, step.crop, y.shape[1:3])
        y = _crop(y, plan[-1].crop, x.shape[1:3])
        return y.astype(jnp.float32)


_TINY_VGG = {"widths": (4, 4, 8, 8, 8), "fc_features": 16}
for _variant in VARIANTS:
    register_model(f"fcn{_variant}", functools.partial(FCN, variant=_variant),
                   paper="Long et al. 2015, VGG-16", tiny=_TINY_VGG)
register_model("fcn_alexnet", functools.partial(FCN, variant="32s", backbone="alexnet"),
               paper="Long et al. 2015 (Table 1), AlexNet",
               tiny={"widths": (4, 8, 8, 8, 8), "fc_features": 16})
