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
import jax
import jax.numpy as jnp

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


def _abstract_variables(model: nn.Module, input_shape: tuple[int, ...]):
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x), x


def param_count(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Number of trainable parameters of `model` on inputs `[B, H, W, C]`.

    Computed with `jax.eval_shape`: no parameter is materialised.
    """
    variables, _ = _abstract_variables(model, input_shape)
    return sum(int(leaf.size) for leaf in jax.tree.leaves(variables["params"]))


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one inference forward pass on `[B, H, W, C]`, from XLA's cost analysis.

    A multiply-add counts as 2 FLOPs; XLA leaves out the products that fall on zero
    padding. The model is lowered and compiled from abstract shapes only.
    """
    variables, x = _abstract_variables(model, input_shape)
    apply = jax.jit(functools.partial(model.apply, train=False))
    cost = apply.lower(variables, x).compile().cost_analysis()
    return float(cost["flops"])


__all__ = [
    "FCN",
    "EncoderDecoder",
    "UNet",
    "available_models",
    "create_model",
    "forward_flops",
    "param_count",
    "unet_output_size",
    "unet_valid_input_sizes",
]
