"""Segmentation models: U-Net (SAME / VALID, optionally on a pretrained encoder), FCN-32s /
16s / 8s on VGG-16, FCN-AlexNet, torchvision's FCN-ResNet-50/101, DeepLabV3 (ResNet-50/101,
MobileNetV3-Large) and LR-ASPP, DeepLabV3+, the encoder-decoder.

Every model is a Linen module with fields `num_classes`, `dtype` (compute),
`param_dtype` and `axis_name` (BatchNorm's cross-replica axis under pmap), called as
`model.apply(variables, x, train=bool, rngs={'dropout': key})` on float NHWC images
`[B, H, W, C]` and returning float32 logits `[B, H', W', num_classes]` (H' = H except
for the VALID U-Net; `model_geometry(model)` says) — or, for a model with an auxiliary
head, `{'out': logits, 'aux': aux_logits}` (`split_outputs`).

    model = create_model('unet', num_classes=2, features=16)
    model, variables = from_torchvision('fcn_resnet50', 'fcn_resnet50_coco-1167a1af.pth')

Models register themselves in their own file (`flaxseg.models.registry`); every module
of this package is imported here, so a new model is one new file.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseg.models.deeplabv3 import DeepLabV3
from flaxseg.models.deeplabv3plus import DeepLabV3Plus
from flaxseg.models.encoder_decoder import EncoderDecoder
from flaxseg.models.fcn import FCN
from flaxseg.models.fcn_resnet import FCNResNet
from flaxseg.models.geometry import Geometry, model_geometry
from flaxseg.models.lraspp import LRASPP
from flaxseg.models.pretrained import from_torchvision
from flaxseg.models.registry import (
    ModelSpec,
    available_models,
    create_model,
    logits_of,
    model_spec,
    register_model,
    split_outputs,
)
from flaxseg.models.unet import UNet, unet_output_size, unet_valid_input_sizes
from flaxseg.models.weights import WeightsError

# Every module of the package, so that a model file's registration runs with the package
# (but the NNX bridge, which registers none: see `__getattr__` below).
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "nnx_bridge":
        importlib.import_module(f"{__name__}.{_module.name}")


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
    "LRASPP",
    "DeepLabV3",
    "DeepLabV3Plus",
    "EncoderDecoder",
    "FCNResNet",
    "Geometry",
    "ModelSpec",
    "UNet",
    "WeightsError",
    "available_models",
    "create_model",
    "forward_flops",
    "from_torchvision",
    "linen_variables",
    "load_variables",
    "logits_of",
    "model_geometry",
    "model_spec",
    "param_count",
    "register_model",
    "split_outputs",
    "to_nnx",
    "unet_output_size",
    "unet_valid_input_sizes",
]


# The NNX bridge imports flax.nnx (0.2 s): loaded on first use, not by every training run.
_NNX_BRIDGE = ("linen_variables", "load_variables", "to_nnx")


def __getattr__(name: str):
    if name in _NNX_BRIDGE:
        from flaxseg.models import nnx_bridge

        return getattr(nnx_bridge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
