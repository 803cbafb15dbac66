"""Segmentation models: U-Net (SAME / VALID), FCN-32s/16s/8s on VGG-16, encoder-decoder.

Every model is a Linen module with fields `num_classes`, `dtype` (compute),
`param_dtype` and `axis_name` (BatchNorm's cross-replica axis under pmap), called as
`model.apply(variables, x, train=bool, rngs={'dropout': key})` on float NHWC images
`[B, H, W, C]` and returning float32 logits `[B, H', W', num_classes]` (H' = H except
for the VALID U-Net, see `unet_output_size`).

    model = create_model('unet', num_classes=2, features=16)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn

from flaxseg.models.encoder_decoder import EncoderDecoder
from flaxseg.models.fcn import FCN
from flaxseg.models.unet import UNet, unet_output_size, unet_valid_input_sizes

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "unet": functools.partial(UNet, padding="SAME"),
    "unet_valid": functools.partial(UNet, padding="VALID"),
    "fcn32s": functools.partial(FCN, variant="32s"),
    "fcn16s": functools.partial(FCN, variant="16s"),
    "fcn8s": functools.partial(FCN, variant="8s"),
    "encoder_decoder": EncoderDecoder,
}


def available_models() -> tuple[str, ...]:
    """The names `create_model` accepts."""
    return tuple(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name` with the module's keyword arguments.

    `unet` / `unet_valid` are `UNet` with padding 'SAME' / 'VALID'; `fcn32s`, `fcn16s`,
    `fcn8s` are `FCN` with that variant; `encoder_decoder` is `EncoderDecoder`.
    Raises ValueError for an unknown name; TypeError for an unknown keyword.
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown model {name!r}; available models: {', '.join(available_models())}."
        )
    return _REGISTRY[name](**kwargs)


__all__ = [
    "FCN",
    "EncoderDecoder",
    "UNet",
    "available_models",
    "create_model",
    "unet_output_size",
    "unet_valid_input_sizes",
]
