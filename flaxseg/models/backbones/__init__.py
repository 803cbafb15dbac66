"""Backbones: VGG-16, AlexNet, ResNet-50/101, as feature maps by name (see `base`).

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
from flaxseg.models.backbones.resnet import ResNet
from flaxseg.models.backbones.vgg import VGG16

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "vgg16": VGG16,
    "alexnet": AlexNet,
    "resnet50": functools.partial(ResNet, depth=50),
    "resnet101": functools.partial(ResNet, depth=101),
}


def create_backbone(backbone: str, /, **kwargs) -> nn.Module:
    """The backbone 'vgg16', 'alexnet', 'resnet50' or 'resnet101', built with `kwargs`
    (its fields; `name=` names the submodule)."""
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}.")
    return BACKBONES[backbone](**kwargs)


__all__ = ["BACKBONES", "AlexNet", "Coords", "ResNet", "VGG16", "create_backbone",
           "last_per_stride"]
