"""Backbones: VGG-16, AlexNet, ResNet-50/101, MobileNetV3-Large, as feature maps by name
(see `base`).

    from flaxseg.models.backbones import create_backbone
    vgg = create_backbone('vgg16')                  # torchvision's geometry (pad 1)
    maps = vgg.apply(variables, images)             # {'conv1_2', ..., 'pool5', 'fc7'}
    vgg.coords()['pool4']                           # Coords(stride=16, offset=7.5)

FCN's skip heads (`flaxseg.models.fcn`) and the U-Net's pretrained encoder
(`UNet(encoder=...)`) build on these; `flaxseg.models.weights` loads their published
weights (torchvision state dicts, Keras HDF5, flaxseg's .npz).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn

from flaxseg.models.backbones.alexnet import AlexNet
from flaxseg.models.backbones.base import Coords, last_per_stride
from flaxseg.models.backbones.mobilenet_v3 import MobileNetV3
from flaxseg.models.backbones.resnet import ResNet
from flaxseg.models.backbones.vgg import VGG16

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vgg16": VGG16,
    "alexnet": AlexNet,
    "resnet50": functools.partial(ResNet, depth=50),
    "resnet101": functools.partial(ResNet, depth=101),
    "mobilenet_v3_large": MobileNetV3,
}
# The fields that put a backbone's deepest map at an output stride (torchvision's
# `replace_stride_with_dilation` and `dilated=True`; VGG-16 stopped before pool5).
_AT_STRIDE: dict[str, dict[int, dict]] = {
    "resnet50": {8: {"dilation": (False, True, True)}, 16: {"dilation": (False, False, True)},
                 32: {}},
    "mobilenet_v3_large": {16: {"dilated": True}, 32: {}},
    "vgg16": {16: {"max_stride": 16, "fc": False}, 32: {"fc": False}},
}
_AT_STRIDE["resnet101"] = _AT_STRIDE["resnet50"]


def create_backbone(backbone: str, /, **kwargs) -> nn.Module:
    """The backbone 'vgg16', 'alexnet', 'resnet50' or 'resnet101', built with `kwargs`
    (its fields; `name=` names the submodule)."""
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}.")
    try:
        return BACKBONES[backbone](**kwargs)
    except TypeError as e:  # a field of another backbone (e.g. width_mult for a ResNet)
        raise TypeError(f"Backbone {backbone!r} has no such field: {e}.") from e


def backbone_at_stride(backbone: str, output_stride: int, /, **kwargs) -> nn.Module:
    """The backbone whose deepest map is at `output_stride` (ResNet: 8, 16 or 32 by
    dilating layer3/layer4; MobileNetV3-Large: 16 by dilating its last stage, or 32;
    VGG-16: 16 (conv5_3, no pool5) or 32), built with `kwargs` (its fields; VGG-16 has
    no BatchNorm, so `axis_name` is left out for it)."""
    strides = _AT_STRIDE.get(backbone)
    if strides is None:
        raise ValueError(f"Backbone {backbone!r} cannot be dilated; use one of "
                         f"{', '.join(_AT_STRIDE)}.")
    if output_stride not in strides:
        raise ValueError(f"Backbone {backbone!r} has no output stride {output_stride!r}; "
                         f"it takes {sorted(strides)}.")
    if backbone == "vgg16":
        kwargs.pop("axis_name", None)  # no BatchNorm: nothing to synchronise
    return create_backbone(backbone, **strides[output_stride], **kwargs)


__all__ = ["BACKBONES", "AlexNet", "Coords", "MobileNetV3", "ResNet", "VGG16",
           "backbone_at_stride", "create_backbone", "last_per_stride"]
