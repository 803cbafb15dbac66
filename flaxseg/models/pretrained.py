"""torchvision checkpoints as flaxseg models: `from_torchvision(name, path) -> (model, variables)`.

    model, variables = from_torchvision('fcn_resnet50', 'fcn_resnet50_coco-1167a1af.pth')
    out = model.apply(variables, IMAGENET(images_uint8), train=False)   # {'out', 'aux'}

- torchvision's segmentation checkpoints, whole: 'fcn_resnet50', 'fcn_resnet101'
  (`FCNResNet`), 'deeplabv3_resnet50', 'deeplabv3_resnet101',
  'deeplabv3_mobilenet_v3_large' (`DeepLabV3`), 'lraspp_mobilenet_v3_large' (`LRASPP`);
  `num_classes` and `aux_loss` are read from the file, `aux_loss=False` drops the
  auxiliary head.
- ImageNet classifiers as the backbone of a fresh model: 'resnet50', 'resnet101' (FCN-
  ResNet), 'mobilenet_v3_large' (DeepLabV3), 'vgg16' (FCN-8s), 'alexnet' (FCN-AlexNet),
  or the registered model `model=` names whose backbone the file is (e.g.
  `model='deeplabv3plus'` or `'lraspp_mobilenet_v3_large'`); 21 classes unless
  `num_classes=` says otherwise, other keywords go to the model. The FCN heads start as
  the reference's (score layers zero, bilinear upsampling); other heads are drawn from
  `key`.

The weights expect torchvision's ImageNet normalisation, `flaxseg.normalization.IMAGENET`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxseg.models.backbones import VGG16, AlexNet, MobileNetV3, ResNet
from flaxseg.models.deeplabv3 import DeepLabV3
from flaxseg.models.fcn_resnet import FCNResNet
from flaxseg.models.lraspp import LRASPP
from flaxseg.models.registry import create_model
from flaxseg.models.weights import (
    WeightsError,
    abstract_variables,
    convert,
    load_model_backbone,
    read_torch,
    torch_key_fn,
    torch_to_flax,
)

# ImageNet classifier -> the registered model it starts by default.
BACKBONE_MODELS = {"resnet50": "fcn_resnet50", "resnet101": "fcn_resnet101",
                   "mobilenet_v3_large": "deeplabv3_mobilenet_v3_large", "vgg16": "fcn8s",
                   "alexnet": "fcn_alexnet"}
SEGMENTATION_MODELS = {
    "fcn_resnet50": functools.partial(FCNResNet, depth=50),
    "fcn_resnet101": functools.partial(FCNResNet, depth=101),
    "deeplabv3_resnet50": functools.partial(DeepLabV3, backbone="resnet50"),
    "deeplabv3_resnet101": functools.partial(DeepLabV3, backbone="resnet101"),
    "deeplabv3_mobilenet_v3_large": functools.partial(DeepLabV3, backbone="mobilenet_v3_large"),
    "lraspp_mobilenet_v3_large": LRASPP,
}
TORCHVISION_NAMES = (*SEGMENTATION_MODELS, *BACKBONE_MODELS)
# A key only each segmentation architecture's file has, and the one giving num_classes.
_HEAD_KEYS = {"fcn": ("classifier.0.weight", "classifier.4.weight"),
              "deeplabv3": ("classifier.0.convs.0.0.weight", "classifier.4.weight"),
              "lraspp": ("classifier.cbr.0.weight", "classifier.low_classifier.weight")}
_INIT_SIZE = 64  # parameters do not depend on it; FCN-VGG needs at least 32


def from_torchvision(name: str, path: str | os.PathLike, *, key: jax.Array | None = None,
                     model: str | None = None, **kwargs: Any
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """`(model, variables)` from a torchvision state-dict file (see the module docstring).

    `model.apply(variables, images, train=False)` on NHWC images normalised as ImageNet
    (`flaxseg.normalization.IMAGENET`) gives float32 logits `[B, H, W, num_classes]`, or
    `{'out': ..., 'aux': ...}` for a model with its auxiliary head. `model` names the fresh
    model an ImageNet file starts (default `BACKBONE_MODELS[name]`); `key` draws the
    parameters the file does not hold (default `jax.random.key(0)`). Raises WeightsError
    naming the first missing, mis-shaped or unexpected key, or the model the file holds.
    """
    path = os.fspath(path)
    if name in SEGMENTATION_MODELS and model is None:
        return _segmentation_model(name, path, **kwargs)
    if name not in BACKBONE_MODELS:
        raise ValueError(f"from_torchvision knows {', '.join(TORCHVISION_NAMES)} (model= only "
                         f"with an ImageNet backbone: {', '.join(BACKBONE_MODELS)}); got "
                         f"{name!r}.")
    model_name = model or BACKBONE_MODELS[name]
    fresh = create_model(model_name, **{"num_classes": 21, **kwargs})
    if hasattr(fresh, "backbone_module") and backbone_name(fresh.backbone_module()) != name:
        raise WeightsError(f"Model {model_name!r} is built on "
                           f"{backbone_name(fresh.backbone_module())}, not on {name} ({path}); "
                           f"pass backbone={name!r} if it takes one, or name a model on {name}.")
    pretrained = traverse_util.flatten_dict(load_model_backbone(fresh, path).variables)

    def init_the_rest(key: jax.Array) -> dict[str, Any]:
        # Only the variables the file does not hold: XLA drops the rest of the init.
        x = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 3))
        flat = traverse_util.flatten_dict(fresh.init(key, x))
        return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                             if k not in pretrained})

    rest = jax.jit(init_the_rest)(jax.random.key(0) if key is None else key)
    flat = {**traverse_util.flatten_dict(rest),
            **{k: jnp.asarray(v) for k, v in pretrained.items()}}
    return fresh, traverse_util.unflatten_dict(flat)


def backbone_name(backbone: nn.Module) -> str:
    """The ImageNet classifier a backbone module is ('resnet50', 'vgg16', ...)."""
    if isinstance(backbone, ResNet):
        return f"resnet{backbone.depth}"
    return {VGG16: "vgg16", AlexNet: "alexnet", MobileNetV3: "mobilenet_v3_large"}.get(
        type(backbone), type(backbone).__name__)


def _architecture(source: dict[str, Any]) -> str | None:
    """The torchvision segmentation model a state dict holds, if it is one."""
    if "backbone.layer1.0.conv1.weight" in source:
        backbone = "resnet101" if "backbone.layer3.22.conv1.weight" in source else "resnet50"
    elif "backbone.1.block.0.0.weight" in source:
        backbone = "mobilenet_v3_large"
    else:
        return None
    family = next((f for f, (marker, _) in _HEAD_KEYS.items() if marker in source), None)
    return None if family is None else f"{family}_{backbone}"


def _segmentation_model(name: str, path: str, **kwargs: Any
                        ) -> tuple[nn.Module, dict[str, Any]]:
    source = read_torch(path)
    family = name.split("_")[0]
    found = _architecture(source)
    if found is not None and (found.split("_")[0], "resnet" in found) != (family,
                                                                          "resnet" in name):
        raise WeightsError(f"{path} holds torchvision's {found}, not {name}; load it with "
                           f"from_torchvision({found!r}, path).")
    classes_key = _HEAD_KEYS[family][1]
    if classes_key not in source:
        raise WeightsError(f"{path} has no key {classes_key!r}: not a {name} checkpoint.")
    kwargs.setdefault("num_classes", int(source[classes_key].shape[0]))
    if family != "lraspp":  # LR-ASPP has no auxiliary head
        has_aux = any(k.startswith("aux_classifier.") for k in source)
        kwargs.setdefault("aux_loss", has_aux)
        if kwargs["aux_loss"] and not has_aux:
            raise WeightsError(f"{path} has no auxiliary head (aux_classifier.*); pass "
                               "aux_loss=False.")
    model = SEGMENTATION_MODELS[name](**kwargs)
    variables = convert(abstract_variables(model, _INIT_SIZE), source, torch_key_fn(None),
                        torch_to_flax, path,
                        may_skip=lambda key: key.startswith("aux_classifier."))
    return model, jax.tree.map(jnp.asarray, variables)
