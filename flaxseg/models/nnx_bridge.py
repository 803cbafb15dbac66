"""flaxseg's models from Flax NNX code: any registered model as an `nnx.Module`.

    model = to_nnx(create_model('unet', num_classes=3), images, rngs=nnx.Rngs(0, dropout=1))
    logits = model(images, train=False)                       # as the Linen model's apply
    logits = model(images, train=True, mutable=['batch_stats'])  # updates its statistics

The Linen module is wrapped by `flax.nnx.bridge.ToNNX` and initialised lazily from a
sample batch; `variables=` loads Linen variables (a checkpoint, `from_torchvision`) so
the NNX model computes exactly what the Linen one does. Train it with `nnx.Optimizer(
model, tx, wrt=nnx.Param)` and `nnx.jit` (docs/models.md has an example that runs as a
test). `linen_variables(model)` gives the variables back as Linen's nested dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge

_KINDS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def to_nnx(model: nn.Module, sample: jax.Array, *, rngs: nnx.Rngs,
           variables: Mapping[str, Any] | None = None) -> nnx.Module:
    """`model` (a Linen module of `flaxseg.models`) as an NNX module, initialised on
    `sample` (an NHWC batch; only its shape matters) with `rngs` ('params', and 'dropout'
    for training), then given `variables` (`{'params': ..., 'batch_stats': ...}`) if any.

    The initialisation is one compiled program with the training state's random numbers
    (`flaxseg.train.state.fast_random`): run op by op it compiled every op on its own
    (a tiny FCN-ResNet-50: 8.3 s eager, 2.7 s compiled)."""
    from flaxseg.train.state import fast_random

    nnx_model = bridge.ToNNX(model, rngs=rngs)
    with fast_random():
        _lazy_init(nnx_model, sample)
    if variables is not None:
        load_variables(nnx_model, variables)
    return nnx_model


@nnx.jit
def _lazy_init(nnx_model: bridge.ToNNX, sample: jax.Array) -> None:
    nnx_model.lazy_init(sample, train=False)


def load_variables(nnx_model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Puts Linen variables into a `to_nnx` model, in place; every collection must be
    'params' or 'batch_stats', with the model's structure."""
    for collection, tree in variables.items():
        if collection not in _KINDS:
            raise ValueError(f"Unknown variable collection {collection!r}; expected "
                             f"{tuple(_KINDS)}.")
        kind = _KINDS[collection]
        nnx.update(nnx_model, jax.tree.map(kind, dict(tree)))


def linen_variables(nnx_model: nnx.Module) -> dict[str, Any]:
    """The variables of a `to_nnx` model as Linen's `{'params': ..., 'batch_stats': ...}`."""
    out = {}
    for collection, kind in _KINDS.items():
        state = nnx.state(nnx_model, kind)
        if jax.tree.leaves(state):
            out[collection] = nnx.to_pure_dict(state)
    return out
