"""torchvision checkpoints as flaxseg models: `from_torchvision(name, path) -> (model, variables)`.

    model, variables = from_torchvision('fcn_resnet50', 'fcn_resnet50_coco-1167a1af.pth')
    out = model.apply(variables, IMAGENET(images_uint8), train=False)   # {'out', 'aux'}

- 'fcn_resnet50', 'fcn_resnet101': torchvision's segmentation checkpoints, whole
  (`FCNResNet`; `num_classes` and `aux_loss` read from the file, `aux_loss=False` drops
  the auxiliary head).
- 'resnet50', 'vgg16', 'alexnet': ImageNet classifiers as the backbone of a fresh FCN
  (`FCNResNet(depth=50)`, `FCN(variant='8s')`, `FCN(backbone='alexnet', variant='32s')`,
  21 classes unless `num_classes=` says otherwise; other keywords go to the model). The
  FCN heads start as the reference's (score layers zero, bilinear upsampling); the
  FCNResNet head is drawn from `key`.

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

from flaxseg.models.fcn import FCN
from flaxseg.models.fcn_resnet import FCNResNet
from flaxseg.models.weights import (
    WeightsError,
    abstract_variables,
    convert,
    load_model_backbone,
    read_torch,
    torch_key_fn,
    torch_to_flax,
)

BACKBONE_MODELS = {
    "resnet50": functools.partial(FCNResNet, depth=50),
    "vgg16": functools.partial(FCN, variant="8s", backbone="vgg16"),
    "alexnet": functools.partial(FCN, variant="32s", backbone="alexnet"),
}
SEGMENTATION_MODELS = {"fcn_resnet50": 50, "fcn_resnet101": 101}
TORCHVISION_NAMES = (*SEGMENTATION_MODELS, *BACKBONE_MODELS)
_INIT_SIZE = 64  # parameters do not depend on it; FCN-VGG needs at least 32


def from_torchvision(name: str, path: str | os.PathLike, *, key: jax.Array | None = None,
                     **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """`(model, variables)` from a torchvision state-dict file (see the module docstring).

    `model.apply(variables, images, train=False)` on NHWC images normalised as ImageNet
    (`flaxseg.normalization.IMAGENET`) gives float32 logits `[B, H, W, num_classes]`, or
    `{'out': ..., 'aux': ...}` for an FCNResNet with its auxiliary head. `key` draws the
    parameters the file does not hold (default `jax.random.key(0)`). Raises WeightsError
    naming the first missing, mis-shaped or unexpected key.
    """
    path = os.fspath(path)
    if name in SEGMENTATION_MODELS:
        return _segmentation_model(name, path, **kwargs)
    if name not in BACKBONE_MODELS:
        raise ValueError(f"from_torchvision knows {', '.join(TORCHVISION_NAMES)}; "
                         f"got {name!r}.")
    model = BACKBONE_MODELS[name](**{"num_classes": 21, **kwargs})
    pretrained = traverse_util.flatten_dict(load_model_backbone(model, path).variables)

    def init_the_rest(key: jax.Array) -> dict[str, Any]:
        # Only the variables the file does not hold: XLA drops the rest of the init.
        x = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 3))
        flat = traverse_util.flatten_dict(model.init(key, x))
        return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                             if k not in pretrained})

    rest = jax.jit(init_the_rest)(jax.random.key(0) if key is None else key)
    flat = {**traverse_util.flatten_dict(rest),
            **{k: jnp.asarray(v) for k, v in pretrained.items()}}
    return model, traverse_util.unflatten_dict(flat)


def _segmentation_model(name: str, path: str, **kwargs: Any
                        ) -> tuple[nn.Module, dict[str, Any]]:
    source = read_torch(path)
    if "classifier.4.weight" not in source:
        raise WeightsError(f"{path} has no key 'classifier.4.weight': not an {name} "
                           "checkpoint.")
    has_aux = any(k.startswith("aux_classifier.") for k in source)
    kwargs.setdefault("num_classes", int(source["classifier.4.weight"].shape[0]))
    kwargs.setdefault("aux_loss", has_aux)
    if kwargs["aux_loss"] and not has_aux:
        raise WeightsError(f"{path} has no auxiliary head (aux_classifier.*); pass "
                           "aux_loss=False.")
    model = FCNResNet(depth=SEGMENTATION_MODELS[name], **kwargs)
    variables = convert(abstract_variables(model, _INIT_SIZE), source, torch_key_fn(None),
                        torch_to_flax, path,
                        may_skip=lambda key: key.startswith("aux_classifier."))
    return model, jax.tree.map(jnp.asarray, variables)
