"""The model registry: one registration per model, read by everything that lists models.

A model file defines a Linen module that follows the model contract and registers it
once, at import:

    register_model("fcn8s", functools.partial(FCN, variant="8s"),
                   paper="Long et al. 2015, VGG-16", tiny={"widths": (4, 4, 8, 8, 8)})

`create_model`, `available_models`, `python -m flaxseg.models`, the config check and
the tests read the registrations (`tiny`: keyword arguments of a cheap variant for the
tests); the model's geometry comes from its `geometry()` method (`flaxseg.models.
geometry`). Every module in `flaxseg/models/` is imported with the package, so a new
model is one new file.

A model in your own package needs no registration here: name it `package.module:Attr`
(e.g. `--config.model.name=my_package.nets:MyNet`), where `Attr` is a Linen module class
(or a function returning one) that follows the contract, or a name your module
registers with `register_model` when imported.

A run folder is data, never code: a `package.module:Attr` name read from a saved config
(a checkpoint's, another run's) is imported only when the user names the same model
(`check_saved_model`) or passes `--trust_saved_code`; registered models always build.

The model contract: `model(num_classes=..., dtype=..., **kwargs)` is a Linen module with
fields `num_classes`, `dtype` (compute), `param_dtype` and `axis_name` (BatchNorm's
cross-device axis under pmap); `model.apply(variables, images, train=bool, rngs={'dropout':
key}, mutable=['batch_stats'])` on float NHWC images returns float32 logits `[B, H', W',
num_classes]` (or a dict with 'out' and 'aux' logits, see `split_outputs`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

CONTRACT_FIELDS = ("num_classes", "dtype", "param_dtype", "axis_name")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One registration: `name`, the `constructor` (keyword arguments -> Linen module),
    the `paper` (or a one-line description) and `tiny`, the keyword arguments of a cheap
    variant of the same architecture for the tests."""

    name: str
    constructor: Callable[..., nn.Module]
    paper: str
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, constructor: Callable[..., nn.Module], *, paper: str,
                   tiny: Mapping[str, Any] | None = None) -> ModelSpec:
    """Registers a model under `name`; raises ValueError if the name is taken."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"A model name must be a non-empty string without ':'; got {name!r}.")
    if name in _REGISTRY:
        raise ValueError(f"A model named {name!r} is already registered "
                         f"({_REGISTRY[name].paper}); choose another name.")
    spec = ModelSpec(name, constructor, paper, dict(tiny or {}))
    _REGISTRY[name] = spec
    return spec


def available_models() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The registration of `name`: a registered name or `package.module:Attr`.

    Raises ValueError naming the registered models for an unknown name, and saying what
    went wrong for a `module:Attr` that cannot be imported or is not a model.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(
            f"Unknown model {name!r}; available models: {', '.join(sorted(available_models()))}; "
            "or name your own as 'package.module:ClassName'.")
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"Cannot import module {module_name!r} of model {name!r} ({e}); "
                         "it must be installed or on PYTHONPATH.") from e
    target = getattr(module, attr, None)
    if target is None and attr in _REGISTRY:  # registered by the module on import
        return dataclasses.replace(_REGISTRY[attr], name=name)
    if not callable(target):
        raise ValueError(f"Module {module_name!r} has no model class or registered model "
                         f"{attr!r} (model {name!r}).")
    doc = (getattr(target, "__doc__", None) or attr).strip().splitlines()[0]
    return ModelSpec(name, target, doc)


TRUST_FLAG = "--trust_saved_code"


class UntrustedCode(ValueError):
    """A saved config names a `package.module:Attr` model the user has not allowed."""


def names_code(name: str) -> bool:
    """Whether building the model `name` imports a module (a `package.module:Attr` name
    that is not registered)."""
    return isinstance(name, str) and ":" in name and name not in _REGISTRY


def check_saved_model(name: str, *, source: str, named: str | None = None,
                      trusted: bool = False, name_flag: str = "--model") -> None:
    """Allows building the model `name` read from a saved config at `source`, or raises.

    Registered names always pass. A `package.module:Attr` name passes when the user named
    the same model (`named`, given as `name_flag` on the command line) or trusts the saved
    code (`trusted`); otherwise UntrustedCode names what `source` asks to import and how
    to allow it.
    """
    if not names_code(name) or trusted or named == name:
        return
    raise UntrustedCode(
        f"{source} asks to import code: model {name!r} (module {name.split(':', 1)[0]!r}). "
        "A saved config never imports code by itself; if you trust that code, name the model "
        f"({name_flag}={name}) or pass {TRUST_FLAG}.")


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds the model `name` (registered, or `package.module:Attr`) with `kwargs`.

    Raises ValueError for an unknown name or a model that breaks the contract (a missing
    field of `CONTRACT_FIELDS`); TypeError for a keyword the model does not take.
    """
    model = model_spec(name).constructor(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"Model {name!r} built a {type(model).__name__}, not a Linen module.")
    missing = [f for f in CONTRACT_FIELDS if not hasattr(model, f)]
    if missing:
        raise ValueError(
            f"Model {name!r} does not follow the model contract: no field(s) "
            f"{', '.join(missing)}. A model has fields {', '.join(CONTRACT_FIELDS)} "
            "(docs/models.md, 'The model contract').")
    return model


def split_outputs(outputs: jax.Array | Mapping[str, jax.Array]
                  ) -> tuple[jax.Array, jax.Array | None]:
    """`(logits, aux_logits or None)` of a model's output: plain logits, or torchvision's
    `{'out': ..., 'aux': ...}` dict of a model with an auxiliary head."""
    if isinstance(outputs, Mapping):
        return outputs["out"], outputs.get("aux")
    return outputs, None


def logits_of(outputs: jax.Array | Mapping[str, jax.Array]) -> jax.Array:
    """The main logits of a model's output (see `split_outputs`)."""
    return split_outputs(outputs)[0]
