"""Host-side helpers for data parallelism: laying a batch out per device.

A leaf module: `flaxseg.data` and `flaxseg.train` both use it, so it imports
neither.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

PyTree = Any


def check_divisible(global_batch_size: int, num_devices: int) -> int:
    """Returns the per-device batch size, or raises a ValueError saying how to fix it."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}.")
    if global_batch_size % num_devices:
        lower = global_batch_size - global_batch_size % num_devices
        upper = lower + num_devices
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"Batch size {global_batch_size} cannot be split evenly over {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {hint}), or run with fewer devices "
            "(parallel='jit' uses one)."
        )
    return global_batch_size // num_devices


def shard_batch(batch: PyTree, num_devices: int) -> PyTree:
    """Reshapes every leaf from `[B, ...]` to `[num_devices, B // num_devices, ...]`.

    Works on NumPy or JAX arrays (no copy for NumPy); the layout `jax.pmap` expects.
    Raises ValueError if B is not divisible by `num_devices`.
    """
    import jax  # local: keep this module importable without initialising JAX

    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("shard_batch got an empty batch.")
    size = leaves[0].shape[0]
    per_device = check_divisible(size, num_devices)

    def reshape(x):
        if x.shape[0] != size:
            raise ValueError(
                f"All batch entries must share the leading dimension; got {x.shape[0]} and {size}."
            )
        return x.reshape((num_devices, per_device) + tuple(x.shape[1:]))

    return jax.tree.map(reshape, batch)


def unshard(tree: PyTree) -> PyTree:
    """Inverse of `shard_batch`: `[D, b, ...]` -> `[D * b, ...]` (as NumPy arrays)."""
    import jax

    return jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + tuple(x.shape[2:])), tree)


@functools.cache
def _replicator(devices: tuple[Any, ...]) -> tuple[Any, Any]:
    """(sharding with one whole copy per device, jitted tree -> [D, ...] broadcast)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("replica",))
    everywhere = NamedSharding(mesh, PartitionSpec())
    stacked = NamedSharding(mesh, PartitionSpec("replica"))
    broadcast = jax.jit(
        lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *x.shape)), tree),
        out_shardings=stacked,
    )
    return everywhere, broadcast


def replicate(tree: PyTree, devices: list[Any] | None = None) -> PyTree:
    """Copies every leaf onto each device: `x` -> `[D, *x.shape]`, one copy per device.

    The layout `jax.pmap` takes for replicated state (the TrainState); it replaces
    `jax.device_put_replicated`, which JAX 0.10 removed. Works for typed PRNG keys. One
    transfer plus one compiled broadcast for the whole tree (compiled once per tree
    structure). `devices` defaults to `jax.local_devices()`.
    """
    import jax

    devices = tuple(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("replicate needs at least one device.")
    everywhere, broadcast = _replicator(devices)
    return broadcast(jax.device_put(tree, everywhere))


def unreplicate(tree: PyTree) -> PyTree:
    """Inverse of `replicate`: the first replica of every leaf (`[D, ...]` -> `[...]`).

    Use it on pmapped state and on psum-ed step metrics, which are identical per replica.
    NumPy leaves are indexed on the host; device arrays are sliced by one compiled call
    and the result is put on the first local device, ready for a jitted step.
    """
    import jax

    leaves = jax.tree.leaves(tree)
    if all(isinstance(x, np.ndarray) for x in leaves):
        return jax.tree.map(lambda x: x[0], tree)
    return jax.device_put(_first_replica()(tree), jax.local_devices()[0])


@functools.cache
def _first_replica() -> Any:
    import jax

    return jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree))
