"""TrainState: everything a train step reads and writes, as one pytree.

Fields: `step` (int32 `[]`), `params`, `batch_stats` (`{}` for models without
BatchNorm), `opt_state`, `rng` (a typed PRNG key from `jax.random.key`; the step derives
its key as `fold_in(rng, step)`, so `rng` itself never changes). `tx` (the optax
transformation) is static: it is not a leaf and is not checkpointed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def apply_gradients(self, grads: PyTree, batch_stats: PyTree) -> TrainState:
        """One optimiser update; `step` + 1 and the new BatchNorm statistics."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )


def fast_random():
    """A context in which JAX random ops lower to the non-partitionable threefry.

    jax 0.10.2's default (partitionable) threefry makes XLA CPU compile every random op
    ~6x slower: a tiny U-Net's initialiser 19 s -> 3 s. Used for initialisation only, which
    runs unsharded on one device (the state is replicated afterwards), so sharding-invariance
    is not needed there. The train step keeps the default: its dropout masks are sharded
    over the mesh, and partitionable bits are the same whatever the sharding.
    """
    return jax.threefry_partitionable(False)


def _as_typed_key(rng: Any) -> jax.Array:
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng must be a single key (shape ()); got shape {rng.shape}.")
        return rng
    if isinstance(rng, jax.Array) and rng.dtype == jnp.uint32 and rng.shape == (2,):
        return jax.random.wrap_key_data(rng)  # a legacy jax.random.PRNGKey
    raise TypeError(f"rng must be a key from jax.random.key(seed); got {type(rng).__name__}.")


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(
            f"input_shape must be NHWC (batch, height, width, channels) with positive sizes; "
            f"got {tuple(input_shape)}."
        )
    return shape  # type: ignore[return-value]


def _init_variables(
    model: nn.Module, input_shape: tuple[int, int, int, int], rng: jax.Array
) -> tuple[PyTree, PyTree, jax.Array]:
    """(params, batch_stats, the state's own key) from one key."""
    _, height, width, channels = input_shape
    with fast_random():
        params_key, dropout_key, state_key = jax.random.split(rng, 3)
        # Batch 1: initialisation only needs the spatial size and channel count.
        images = jnp.zeros((1, height, width, channels), jnp.float32)
        variables = model.init(
            {"params": params_key, "dropout": dropout_key}, images, train=False
        )
    extra = sorted(set(variables) - {"params", "batch_stats"})
    if extra:
        raise ValueError(
            f"The model creates variable collections {extra}; TrainState holds only "
            "'params' and 'batch_stats'."
        )
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    # flax's BatchNorm creates its statistics in float32 whatever `param_dtype` is, and a
    # float64 step returns them in float64: start them there, so the step compiles once and
    # a float64 checkpoint restores into a target of its own dtypes.
    if any(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params)):
        batch_stats = jax.tree.map(lambda x: x.astype(jnp.float64), batch_stats)
    return params, batch_stats, state_key


# Compiled once per (model, input shape): a second seed or a restore target reuses it.
_cached_init_variables = jax.jit(_init_variables, static_argnums=(0, 1))


def _state_builder(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: Sequence[int]
) -> Callable[[jax.Array], TrainState]:
    """A pure function `rng -> TrainState`."""
    shape = _check_input_shape(input_shape)
    try:
        hash(model)
        init = functools.partial(_cached_init_variables, model, shape)
    except TypeError:  # a model with an unhashable field: compile for this call only
        init = jax.jit(functools.partial(_init_variables, model, shape))

    def build(rng: jax.Array) -> TrainState:
        params, batch_stats, state_key = init(rng)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=jax.jit(tx.init)(params),
            rng=state_key,
            tx=tx,
        )

    return build


def abstract_train_state(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: Sequence[int]
) -> TrainState:
    """The state's structure as `jax.ShapeDtypeStruct` leaves, computed without FLOPs.

    The restore target for a checkpoint; `create_train_state` checks it first.
    """
    return jax.eval_shape(_state_builder(model, tx, input_shape), jax.random.key(0))


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: Sequence[int],
) -> TrainState:
    """Initialises params, BatchNorm statistics and the optimiser state in one jitted call.

    Args:
      model: a Linen module with `__call__(x, train: bool)`.
      tx: the optax transformation (`create_optimizer`).
      rng: a typed key (`jax.random.key(seed)`); split into init, dropout-init and the
        state's own key, so the init keys are never reused by the steps.
      input_shape: NHWC `(B, H, W, C)` of a training batch.

    Shape-first: `jax.eval_shape` traces the initialisation (raising shape errors early,
    without building anything), then compiled code builds the real arrays, so a big model
    is not built op by op. The model's initialiser is compiled once per (model, input
    shape) and reused, e.g. for a second seed. Params take the model's `param_dtype`
    (float32 for mixed precision).
    """
    rng = _as_typed_key(rng)
    build = _state_builder(model, tx, input_shape)
    jax.eval_shape(build, rng)
    return build(rng)


def init_backbone(state: TrainState, model: Any, path: str) -> tuple[TrainState, str]:
    """`state` with `model`'s backbone loaded from the weights file at `path` (see
    `flaxseg.models.weights`: torchvision .pth, Keras .h5, flaxseg .npz), placed as the
    state's leaves are; the optimiser state starts fresh. Returns the state and a line
    saying what was loaded. Every process reads the file."""
    from flaxseg.models.weights import load_model_backbone, merge

    pretrained = load_model_backbone(model, path)

    def place(new: np.ndarray, old: jax.Array) -> jax.Array:
        new = np.asarray(new, old.dtype)
        return jax.make_array_from_callback(new.shape, old.sharding, lambda index: new[index])

    loaded = {"params": state.params, "batch_stats": state.batch_stats}
    loaded = merge(loaded, pretrained.variables, place)
    count = sum(np.size(x) for x in jax.tree.leaves(pretrained.variables.get("params", {})))
    message = (f"Initialised the backbone from {path}: {count:,} parameters; the weights "
               f"expect {pretrained.normalization.description}.")
    return state.replace(params=loaded["params"],
                         batch_stats=loaded.get("batch_stats", state.batch_stats),
                         opt_state=state.tx.init(loaded["params"])), message
