"""Published weights into flaxseg's models: torchvision state dicts, Keras HDF5, flaxseg .npz.

flaxseg downloads nothing: you bring the file you have.

- torchvision state dicts (`torch.save(model.state_dict())`, e.g. `vgg16-397923af.pth`,
  `alexnet-owt-7be5be79.pth`, `resnet50-*.pth`, `mobilenet_v3_large-*.pth`,
  `fcn_resnet50_coco-*.pth`, `deeplabv3_*_coco-*.pth`), read with
  `torch.load(weights_only=True)` (the `torch` extra). Conv kernels OIHW -> HWIO; the
  classifier's Linear layers become fc6/fc7 convolutions (fc6's `[4096, 512*7*7]` matrix
  unflattened in torchvision's NCHW order); BatchNorm `weight`/`bias` -> `scale`/`bias`,
  `running_mean`/`running_var` -> `batch_stats` `mean`/`var`.
- Keras's VGG-16 HDF5 (`vgg16_weights_tf_dim_ordering_tf_kernels.h5`: groups
  `block{b}_conv{i}`, `fc1`, `fc2`; the `h5` extra): kernels are HWIO already, `fc1`'s
  `[25088, 4096]` matrix is unflattened in Keras's NHWC order, and conv1_1's input
  channels are reversed so the weights take RGB (Keras's VGG expects BGR).
- flaxseg's `.npz` (`python -m flaxseg.models convert-vgg16`): one array per parameter
  keyed by its Flax path joined with '/' (`conv1_1/kernel`), BatchNorm statistics under
  `batch_stats/`, the expected input normalisation under `__normalization__`; NumPy reads it.

The ImageNet classifier's last layer (fc8 / `fc`, 1000 classes; MobileNetV3's whole
`classifier`) is dropped. Every file
comes with the normalisation its weights expect (`flaxseg.normalization`): torchvision's
ImageNet mean/std, Keras's Caffe mean subtraction, or what the .npz records. A file that
is not what it should be raises `WeightsError` naming the first missing, mis-shaped or
unexpected key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxseg.extras import require
from flaxseg.models.backbones import VGG16, AlexNet, ResNet
from flaxseg.normalization import CAFFE, IMAGENET, Normalization

Path = tuple[str, ...]  # (collection, module, ..., leaf)
NPZ_NORMALIZATION = "__normalization__"
NPZ_BACKBONE = "__backbone__"
_TORCH_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                 ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                 ("batch_stats", "var"): "running_var"}
# Keys of published files that no flaxseg model uses: the ImageNet classifiers' last layer,
# BatchNorm's step counter.
_DROPPED = ("classifier.6.", "fc.", "num_batches_tracked")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Variables converted from a file (`{'params': ..., 'batch_stats': ...}`, NumPy,
    nested as in the model), the normalisation they expect, and the file."""

    variables: dict[str, Any]
    normalization: Normalization
    path: str


# ----------------------------------------------------------------------------- files


def file_format(path: str | os.PathLike) -> str:
    """'torch', 'keras' or 'npz', from the file's contents; WeightsError otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"No weights file {path!r}.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        return "keras"
    if head[:1] == b"\x80":  # a legacy (pre-zip) torch.save pickle
        return "torch"
    if head[:2] == b"PK":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as e:
            raise WeightsError(f"{path} is a damaged or truncated zip file ({e}).") from e
        return "torch" if any(n.endswith("data.pkl") for n in names) else "npz"
    raise WeightsError(f"{path} is neither a PyTorch state dict, a Keras HDF5 file nor a "
                       "flaxseg .npz.")


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A torchvision state dict as `{key: float32 array}` (`torch.load(weights_only=True)`)."""
    torch = require("torch", f"Reading {path}", WeightsError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise WeightsError(f"Cannot read {path} as a PyTorch state dict (truncated or not "
                           f"a torch.save file?): {type(e).__name__}: {e}") from e
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of "
                           "tensors; save one with torch.save(model.state_dict(), path).")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def read_keras(path: str) -> dict[str, np.ndarray]:
    """A Keras (2.x) HDF5 weights file as `{'layer/0': kernel, 'layer/1': bias, ...}`."""
    h5py = require("h5py", f"Reading {path}", WeightsError)

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            out = {}
            for layer in (text(n) for n in root.attrs.get("layer_names", list(root))):
                group = root[layer]
                for i, name in enumerate(text(n) for n in group.attrs.get("weight_names", [])):
                    out[f"{layer}/{i}"] = np.asarray(group[name], np.float32)
            return out
    except (OSError, KeyError) as e:
        raise WeightsError(f"Cannot read {path} as a Keras HDF5 weights file: {e}") from e


def read_npz(path: str) -> tuple[dict[str, np.ndarray], Normalization, str]:
    """flaxseg's .npz: (`{'conv1_1/kernel': array, ...}`, its normalisation, backbone)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise WeightsError(f"Cannot read {path} as a .npz file: {e}") from e
    if NPZ_NORMALIZATION not in arrays or NPZ_BACKBONE not in arrays:
        raise WeightsError(f"{path} is not a flaxseg weights file (no {NPZ_NORMALIZATION!r}); "
                           "write one with python -m flaxseg.models convert-vgg16.")
    normalization = Normalization(**json.loads(str(arrays.pop(NPZ_NORMALIZATION))))
    return arrays, normalization, str(arrays.pop(NPZ_BACKBONE))


def weights_normalization(path: str | os.PathLike) -> Normalization:
    """The normalisation a weights file's parameters expect, without loading them."""
    fmt = file_format(path)
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as data:
            if NPZ_NORMALIZATION not in data.files:
                raise WeightsError(f"{os.fspath(path)} is not a flaxseg weights file (no "
                                   f"{NPZ_NORMALIZATION!r}).")
            return Normalization(**json.loads(str(data[NPZ_NORMALIZATION])))
    return IMAGENET if fmt == "torch" else CAFFE


def save_npz(path: str | os.PathLike, pretrained: Pretrained, backbone: str) -> None:
    """Writes `pretrained` as flaxseg's .npz (see the module docstring)."""
    flat = {_npz_key(p): np.asarray(v)
            for p, v in traverse_util.flatten_dict(pretrained.variables).items()}
    flat[NPZ_NORMALIZATION] = np.asarray(json.dumps(pretrained.normalization.to_dict()))
    flat[NPZ_BACKBONE] = np.asarray(backbone)
    with open(path, "wb") as f:
        np.savez(f, **flat)


def _npz_key(path: Path) -> str:
    return "/".join(path[1:] if path[0] == "params" else path)


# ----------------------------------------------------------------------------- key maps


def _sequential_names(backbone: nn.Module, classifier: tuple[int, int]) -> dict[str, str]:
    """Flax layer name -> torchvision module path for VGG / AlexNet: `features.i` counts
    a convolution and its ReLU as two modules and a pool as one; fc6, fc7 are
    `classifier.{classifier}`."""
    names, index = {}, 0
    for layer in backbone.layers():
        if layer.name in ("fc6", "fc7"):
            names[layer.name] = f"classifier.{classifier[layer.name == 'fc7']}"
        elif layer.features:
            names[layer.name], index = f"features.{index}", index + 2
        else:
            index += 1
    return names


def _full(backbone: nn.Module) -> nn.Module:
    """The whole published network of a backbone (every stage, fc6/fc7)."""
    if isinstance(backbone, VGG16):
        return backbone.clone(fc=True, max_stride=32, parent=None)
    if isinstance(backbone, ResNet):
        return backbone.clone(max_stride=32, parent=None)
    return backbone.clone(parent=None)


def torch_key_fn(backbone: nn.Module | None) -> Callable[[Path], str]:
    """Flax variable path (collection, modules..., leaf) -> torchvision state-dict key.

    `backbone` VGG16 / AlexNet map their layer names to torchvision's `features.i` /
    `classifier.i`; a ResNet or None (a model mirroring torchvision's names, such as
    `FCNResNet`) joins the module path with '.'.
    """
    renames = {}
    if isinstance(backbone, VGG16):
        renames = _sequential_names(_full(backbone), (0, 3))
    elif isinstance(backbone, AlexNet):
        renames = _sequential_names(backbone, (1, 4))

    def key(path: Path) -> str:
        modules = list(path[1:-1])
        modules[0] = renames.get(modules[0], modules[0])
        return ".".join([*modules, _TORCH_LEAVES[(path[0], path[-1])]])

    return key


def _keras_key(path: Path) -> str:
    layer = path[1]
    name = {"fc6": "fc1", "fc7": "fc2"}.get(layer)
    if name is None:
        stage, j = layer[len("conv"):].split("_")
        name = f"block{stage}_conv{j}"
    return f"{name}/{0 if path[-1] == 'kernel' else 1}"


# ----------------------------------------------------------------------------- conversion


def torch_to_flax(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.ndim == 4:  # conv OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2 and len(shape) == 4:  # Linear [O, C*h*w] (NCHW flatten) -> conv
        kh, kw, c, o = shape
        if array.size != kh * kw * c * o:
            return array
        return array.reshape(o, c, kh, kw).transpose(2, 3, 1, 0)
    return array


def keras_to_flax(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.ndim == 2 and len(shape) == 4 and array.size == np.prod(shape):
        return array.reshape(shape)  # Dense [h*w*C, O] (NHWC flatten) -> conv
    return array


def convert(abstract: Mapping[str, Any], source: Mapping[str, np.ndarray],
            key_of: Callable[[Path], str], transform: Callable[[np.ndarray, tuple], np.ndarray],
            path: str, may_skip: Callable[[str], bool] = lambda key: False
            ) -> dict[str, Any]:
    """The variables `abstract` describes (ShapeDtypeStructs), read from `source`.

    Each Flax path's `key_of(path)` must be in `source` and have, after `transform`, the
    Flax shape; every key of `source` must be used unless `may_skip(key)` or it is one of
    the published classifiers' dropped layers. Raises WeightsError naming the first key
    that is missing, mis-shaped or unexpected.
    """
    out, used = {}, set()
    flat = traverse_util.flatten_dict(abstract)
    for flax_path, leaf in sorted(flat.items(), key=lambda item: item[0][0] != "params"):
        key = key_of(flax_path)
        name = "/".join(flax_path)
        if key not in source:
            raise WeightsError(f"{path} has no key {key!r} (for {name}, shape "
                               f"{list(leaf.shape)}): not a checkpoint of this network?")
        value = transform(source[key], tuple(leaf.shape))
        if value.shape != tuple(leaf.shape):
            raise WeightsError(f"{path}: key {key!r} has shape {list(source[key].shape)}, "
                               f"which does not fit {name} {list(leaf.shape)}.")
        out[flax_path] = value.astype(leaf.dtype)
        used.add(key)
    for key, value in source.items():
        if key not in used and not may_skip(key) and not any(d in key for d in _DROPPED):
            raise WeightsError(f"{path}: unexpected key {key!r} (shape {list(value.shape)}): "
                               "the file holds a different network.")
    return traverse_util.unflatten_dict(out)


def abstract_variables(module: nn.Module, size: int = 224, channels: int = 3
                       ) -> dict[str, Any]:
    """The variables of `module` as ShapeDtypeStructs (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def load_backbone(path: str | os.PathLike, backbone: nn.Module) -> Pretrained:
    """A backbone's variables (as `backbone` names them, NumPy) from a weights file.

    `backbone` is the module as the model runs it (e.g. `FCN(...).backbone_module()`);
    keys of the published network that it does not build (fc6/fc7 for a U-Net encoder,
    the stages past its `max_stride`) are skipped. A torchvision file of a whole FCN
    (`backbone.*` keys) gives its backbone.
    """
    path = os.fspath(path)
    fmt = file_format(path)
    if fmt == "torch":
        source = _torch_backbone_keys(read_torch(path))
        key_of, transform, normalization = torch_key_fn(backbone), torch_to_flax, IMAGENET
    elif fmt == "keras":
        if not isinstance(backbone, VGG16):
            raise WeightsError(f"{path} is a Keras file; flaxseg reads Keras weights for "
                               f"VGG-16 only, not {type(backbone).__name__}.")
        source = {k: v[:, :, ::-1] if k == "block1_conv1/0" else v  # BGR -> RGB input
                  for k, v in read_keras(path).items()}
        key_of, transform, normalization = _keras_key, keras_to_flax, CAFFE
    else:
        source, normalization, _ = read_npz(path)
        key_of, transform = _npz_key, (lambda array, shape: array)
    full = {key_of(p) for p in traverse_util.flatten_dict(abstract_variables(_full(backbone)))}
    variables = convert(abstract_variables(backbone), source, key_of, transform, path,
                        may_skip=lambda key: key in full or key.startswith("predictions/"))
    return Pretrained(variables, normalization, path)


def _torch_backbone_keys(source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A torchvision file's backbone keys as the backbone module names them: a segmentation
    model's `backbone.*` (FCN, DeepLabV3, LR-ASPP), MobileNetV3's `features.*` (its
    ImageNet classifier dropped); other files as they are."""
    for prefix in ("backbone.", "features."):
        if f"{prefix}0.0.weight" in source or f"{prefix}conv1.weight" in source:
            return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    return source


def nest(variables: dict[str, Any], scope: tuple[str, ...]) -> dict[str, Any]:
    """`{'params': {...}}` placed under the module path `scope` in each collection."""
    out = {}
    for collection, tree in variables.items():
        for name in reversed(scope):
            tree = {name: tree}
        out[collection] = tree
    return out


def merge(variables: Mapping[str, Any], pretrained: Mapping[str, Any],
          place: Callable[[np.ndarray, Any], Any] = lambda new, old: jnp.asarray(new)
          ) -> dict[str, Any]:
    """`variables` with every leaf of `pretrained` (same nesting) put in, as
    `place(new, old)`; raises WeightsError for a leaf the model lacks or shapes differently."""
    flat = traverse_util.flatten_dict(dict(variables))
    for key, value in traverse_util.flatten_dict(dict(pretrained)).items():
        name = "/".join(key)
        if key not in flat:
            raise WeightsError(f"The model has no variable {name} for the pretrained one.")
        if tuple(flat[key].shape) != tuple(value.shape):
            raise WeightsError(f"Pretrained {name} has shape {list(value.shape)}, the model's "
                               f"is {list(flat[key].shape)} (e.g. a different number of "
                               "input channels).")
        flat[key] = place(value, flat[key])
    return traverse_util.unflatten_dict(flat)


def load_model_backbone(model: nn.Module, path: str | os.PathLike) -> Pretrained:
    """The weights file at `path` as variables for `model`'s backbone, nested where the
    model keeps it (`model.backbone_scope`). The model must have a pretrained backbone
    (`backbone_module()`: FCN, FCNResNet, UNet with an encoder)."""
    if not hasattr(model, "backbone_module"):
        raise WeightsError(f"{type(model).__name__} has no pretrained backbone to load "
                           f"{os.fspath(path)} into.")
    pretrained = load_backbone(path, model.backbone_module())
    return dataclasses.replace(pretrained,
                               variables=nest(pretrained.variables, model.backbone_scope))
