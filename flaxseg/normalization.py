"""Image normalisation conventions: what pretrained weights expect of their input.

A leaf module (NumPy only), shared by the data pipeline (`augment.normalize`), inference
and the weight converters (`flaxseg.models.weights`), so each convention has one home.

    IMAGENET(images_uint8)       # float32 (x / 255 - mean) / std, per RGB channel

`mean` and `std` are per-channel values in [0, 1] units of RGB images: an image `x` in
0..255 becomes `(x / 255 - mean) / std`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Normalization:
    """`(x / 255 - mean) / std` per channel (1 or C values each), with a description."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    description: str = "x / 255"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.mean or not self.std or min(self.std) <= 0:
            raise ValueError(f"Normalization needs mean and positive std values; got "
                             f"mean={self.mean}, std={self.std}.")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (or 0..255 float) images `[..., H, W, C]` -> normalised float32."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (np.asarray(images, np.float32) / 255.0 - mean) / std

    def matches(self, mean: Sequence[float], std: Sequence[float], atol: float = 1e-6
                ) -> bool:
        """Whether per-channel `mean`, `std` ([0, 1] units) are this normalisation's."""
        n = max(len(self.mean), len(self.std), len(mean), len(std))
        pairs = ((self.mean, mean), (self.std, std))
        return all(np.allclose(np.broadcast_to(a, n), np.broadcast_to(b, n), atol=atol)
                   for a, b in pairs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet weights: RGB in [0, 1], standardised per channel.
IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD,
                         "torchvision ImageNet: RGB / 255, mean (0.485, 0.456, 0.406), "
                         "std (0.229, 0.224, 0.225)")
# Keras's (Caffe's) VGG-16: BGR in 0..255 minus the BGR mean (103.939, 116.779, 123.68).
# flaxseg flips the first convolution's input channels when converting, so the weights
# take RGB like every flaxseg pipeline: RGB 0..255 minus (123.68, 116.779, 103.939).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
CAFFE = Normalization(tuple(m / 255 for m in CAFFE_BGR_MEAN[::-1]), (1 / 255,),
                      "Keras/Caffe VGG-16: 0..255 minus the mean (123.68, 116.779, 103.939) "
                      "(RGB; the file's BGR first layer is flipped on conversion)")
UNIT = Normalization()
