"""Where the pure step runs: the three data-parallel modes, and the only place they differ.

    par = DataParallel('mesh')                      # or 'jit', 'pmap'
    step = par.compile(train_step_fn, donate=True)  # (state, batch) -> (state, metrics)
    state = par.put_state(state)                    # replicated over the mesh
    state, metrics = step(state, par.put_batch(process_batch))
    host_metrics = par.to_host(metrics)             # NumPy, the global sums

Every mode runs over a 1-D device mesh with the axis `'data'` (`AXIS_NAME`), and every mode
hands the caller global `jax.Array`s: the state replicated (`P()`), the step's metric sums
replicated. So the loop, checkpoints, evaluation and benchmarks are written once, against
these arrays; only the table below depends on the mode.

* 'mesh' (the default): every device of every process (`jax.make_mesh`); the batch
  `[B, ...]` sharded `P('data')`; the step is `jax.jit` with the state `P()` and the batch
  `P('data')`. BatchNorm statistics and gradients are global by construction: XLA
  partitions the one program and inserts the all-reduces.
* 'jit': the same `jax.jit` program on a 1-device mesh (the first local device, one
  process).
* 'pmap': every device of every process; the batch `[B, ...]` sharded `P('data')` as for
  'mesh'; the step is the per-device program (each device sees its `[B / D, ...]` rows)
  under `jax.shard_map` with the axis `'data'`, the state `P()` in and out, jitted.
  Collectives are explicit: `pmean` in BatchNorm (`model.axis_name`), `psum` of the
  gradients, the pixel weight and the metric sums.

Why 'mesh' is the default: it is the idiom the JAX documentation recommends for data
parallelism (the training cookbook, `migrate_pmap`); `jax.pmap` has been a wrapper over
`jit` + `shard_map` in maintenance mode since JAX 0.8. The 'mesh' step is the global
computation written once: it equals the one-device step up to the order of floating-point
reductions, and its random numbers (dropout) are the same whatever the device count.
'pmap' stays for those who want the per-device program with explicit collectives; each
device draws its own dropout masks there (`fold_in(key, axis_index)`). The mode keeps its
name (configs say `parallel='pmap'`) but runs on `jax.shard_map`, which `jax.pmap` wraps
and whose docstring it points to since JAX 0.12: the same per-device program, on global
arrays, so several processes need no conversion at the boundary.

Several processes (`jax.distributed`): a mesh spans the devices of all of them. Each
process passes its own rows of the global batch to `put_batch`
(`jax.make_array_from_process_local_data`); `process_rows()` says which rows those are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any

AXIS_NAME = "data"
SPACE_AXIS = "space"
MODES = ("mesh", "jit", "pmap")


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


def check_mode(mode: str) -> str:
    """Returns `mode` if it is one of `MODES`, else raises a ValueError naming them."""
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES}; got {mode!r}.")
    return mode


def num_devices(mode: str) -> int:
    """How many devices a global batch is split over in `mode` (without building a mesh)."""
    return 1 if check_mode(mode) == "jit" else jax.device_count()


def check_spatial_partitions(mode: str, spatial_partitions: int) -> int:
    """Returns `spatial_partitions` if this job can split images that many ways."""
    if isinstance(spatial_partitions, bool) or not isinstance(spatial_partitions, int) \
            or spatial_partitions < 1:
        raise ValueError(f"spatial_partitions must be a positive integer; got "
                         f"{spatial_partitions!r}.")
    if spatial_partitions == 1:
        return 1
    if check_mode(mode) != "mesh":
        raise ValueError(f"spatial_partitions={spatial_partitions} splits images over devices "
                         f"of a mesh; it needs parallel='mesh', not {mode!r}.")
    local = jax.local_device_count()
    if local % spatial_partitions:
        raise ValueError(
            f"spatial_partitions={spatial_partitions} must divide the {local} devices of each "
            f"process (an image is split over the devices of one process); use one of "
            f"{[n for n in range(1, local + 1) if local % n == 0]}.")
    return spatial_partitions


def check_image_height(height: int, spatial_partitions: int) -> None:
    """Raises ValueError, naming the nearest heights that work, if images of `height` rows
    cannot be split over `spatial_partitions` devices."""
    if height % spatial_partitions:
        lower = height - height % spatial_partitions
        raise ValueError(
            f"Images of height {height} cannot be split over spatial_partitions="
            f"{spatial_partitions} devices; use a height that is a multiple of "
            f"{spatial_partitions} (e.g. "
            f"{', '.join(str(h) for h in (lower, lower + spatial_partitions) if h > 0)}).")


def _mesh(mode: str, devices: Sequence[Any] | None, spatial_partitions: int) -> Mesh:
    """The 2-D mesh `('data', 'space')`, `spatial_partitions` devices along 'space'."""
    if mode == "jit":
        if jax.process_count() > 1:
            raise ValueError(
                f"parallel='jit' runs on one device of one process, but this job has "
                f"{jax.process_count()} processes; use parallel='mesh' (or 'pmap').")
        if devices is not None and len(devices) != 1:
            raise ValueError(f"parallel='jit' runs on one device; got {len(devices)} devices.")
        devices = devices or jax.local_devices()[:1]
    axes, types = (AXIS_NAME, SPACE_AXIS), (AxisType.Auto, AxisType.Auto)
    if devices is None:
        count = jax.device_count()
        return jax.make_mesh((count // spatial_partitions, spatial_partitions), axes,
                             axis_types=types)
    if not devices or len(devices) % spatial_partitions:
        raise ValueError(f"DataParallel needs a positive multiple of spatial_partitions="
                         f"{spatial_partitions} devices; got {len(devices)}.")
    return Mesh(np.asarray(devices).reshape(-1, spatial_partitions), axes, axis_types=types)


class DataParallel:
    """One data-parallel mode over a mesh `('data', 'space')` (see the module docstring).

    Args:
      mode: 'mesh' (default), 'jit' or 'pmap'.
      devices: the mesh's devices, in order; default: every device of every process
        (`jax.make_mesh`), or the first local device for 'jit'. Under several processes
        each of them must hold the same number of the devices given.
      spatial_partitions: devices along 'space' ('mesh' only): each image is split along H
        over that many devices of one process, and the batch over the rest.
    """

    def __init__(self, mode: str = "mesh", devices: Sequence[Any] | None = None,
                 spatial_partitions: int = 1):
        self.mode = check_mode(mode)
        self.spatial_partitions = check_spatial_partitions(mode, spatial_partitions)
        self.mesh = _mesh(mode, devices, self.spatial_partitions)
        self.devices = list(self.mesh.devices.flat)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        if not self.local_devices:
            raise ValueError(f"None of the mesh's devices belongs to process "
                             f"{jax.process_index()}; give every process some devices.")
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        # [B, H, ...]: the batch over 'data', each image's rows over 'space'.
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS_NAME, SPACE_AXIS))
        self._multiprocess = len({d.process_index for d in self.devices}) > 1

    def __repr__(self) -> str:
        space = (f", spatial_partitions={self.spatial_partitions}"
                 if self.spatial_partitions > 1 else "")
        return f"DataParallel({self.mode!r}, {self.num_devices} devices{space})"

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def batch_splits(self) -> int:
        """How many ways the batch is split: the devices, over `spatial_partitions`."""
        return self.num_devices // self.spatial_partitions

    @property
    def axis_name(self) -> str | None:
        """The collective axis the per-device step names: 'data' under pmap, else None."""
        return AXIS_NAME if self.mode == "pmap" else None

    # -- the batch --------------------------------------------------------------------------
    def process_rows(self, global_batch_size: int) -> slice:
        """The rows of a global batch that this process loads (a contiguous block).

        Raises ValueError (naming the fix) if the batch cannot be split over the devices.
        """
        per_split = check_divisible(int(global_batch_size), self.batch_splits)
        mine = [i for i, row in enumerate(self.mesh.devices)
                if any(d.process_index == jax.process_index() for d in row)]
        for i in mine:
            if {d.process_index for d in self.mesh.devices[i]} != {jax.process_index()}:
                raise ValueError("An image would be split over the devices of several "
                                 "processes; give spatial_partitions at most the devices of "
                                 "one process.")
        if mine[-1] - mine[0] + 1 != len(mine):  # jax.make_mesh keeps a process's devices together
            raise ValueError(f"This process's devices are not contiguous in the mesh "
                             f"{self.devices}; pass devices grouped by process.")
        return slice(mine[0] * per_split, (mine[-1] + 1) * per_split)

    def _local_rows(self, x: np.ndarray) -> None:
        local = len(self.local_devices) // self.spatial_partitions
        if x.ndim == 0 or x.shape[0] % local:
            raise ValueError(
                f"This process's batch of shape {x.shape} cannot be split over its {local} "
                "devices; load process_rows(global_batch_size) of the global batch.")

    def put_examples(self, batch: PyTree) -> PyTree:
        """This process's rows `[b, ...]` of a global batch -> global arrays `[B, ...]`
        sharded over 'data' in every mode: the input of `compile_batch_fn`'s functions (the
        host's uint8 batches, for the on-device augmentation)."""

        def put(x):
            x = np.asarray(x)
            self._local_rows(x)
            # Over 'data' only: an example's source points may lie anywhere in its canvas.
            return jax.make_array_from_process_local_data(
                NamedSharding(self.mesh, PartitionSpec(AXIS_NAME)), x)

        return jax.tree.map(put, batch)

    def put_batch(self, batch: PyTree) -> PyTree:
        """This process's rows `[b, ...]` of the global batch -> the step's global arrays:
        `[B, H, ...]` sharded `P('data', 'space')` in every mode (1-D arrays `P('data')`).
        """

        def put(x):
            x = np.asarray(x)
            self._local_rows(x)
            sharding = self.batch_sharding if x.ndim >= 2 else NamedSharding(
                self.mesh, PartitionSpec(AXIS_NAME))
            return jax.make_array_from_process_local_data(sharding, x)

        return jax.tree.map(put, batch)

    def compile_batch_fn(self, *stages: Callable[[PyTree], PyTree]
                         ) -> Callable[[PyTree], PyTree]:
        """Compiles a per-example batch function (the on-device augmentation or
        normalisation, `flaxseg.data.augment`), given as one or more stages run in turn,
        each its own program, over the mesh: it takes `put_examples`'s arrays and returns
        the batch as the step takes it (`put_batch`'s layout), sharded like it: no example
        leaves its devices (under spatial partitions each device of an example holds its
        whole canvas and keeps its rows of the output)."""
        *first, last = stages
        over_data = NamedSharding(self.mesh, PartitionSpec(AXIS_NAME))
        compiled = [jax.jit(stage, out_shardings=over_data) for stage in first]
        compiled.append(jax.jit(last, out_shardings=self.batch_sharding))

        def run(batch: PyTree) -> PyTree:
            for stage in compiled:
                batch = stage(batch)
            return batch

        return run

    # -- the state --------------------------------------------------------------------------
    def put_state(self, tree: PyTree) -> PyTree:
        """A copy of `tree` on every device of the mesh (every process must pass the same)."""
        if self._multiprocess:
            # device_put cannot place typed PRNG keys on devices of other processes.
            return multihost_utils.host_local_array_to_global_array(
                tree, self.mesh, PartitionSpec())
        return jax.device_put(tree, self.replicated)

    def abstract(self, tree: PyTree) -> PyTree:
        """`ShapeDtypeStruct`s of `tree`, replicated over the mesh: a checkpoint restore
        target that lands directly on every device, whatever topology wrote it."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), tree)

    def to_host(self, tree: PyTree) -> PyTree:
        """NumPy copies of replicated arrays (the step's metric sums, the state)."""
        return jax.device_get(tree)

    def local_copy(self, tree: PyTree) -> PyTree:
        """This process's copy of a replicated tree, on one local device (no transfer):
        for work one process does alone, such as drawing a prediction grid."""
        return jax.tree.map(lambda x: x.addressable_data(0), tree)

    # -- the step ---------------------------------------------------------------------------
    def compile(self, fn: Callable[[PyTree, PyTree], Any], *, donate: bool = False,
                sharded_output: bool = False) -> Callable[[PyTree, PyTree], Any]:
        """Compiles the per-device `fn(state, batch) -> outputs` for this mode.

        `fn` must name `self.axis_name` in its collectives under 'pmap' (and none
        otherwise). The result takes the replicated state and `put_batch`'s arrays and
        returns replicated outputs (sums), or, with `sharded_output`, outputs laid out
        like the batch (e.g. logits). `donate` lets the step reuse the state's buffers.
        """
        donate_argnums = (0,) if donate else ()
        out_sharding = self.batch_sharding if sharded_output else self.replicated
        if self.mode == "pmap":
            # The outputs are psum-ed (or per-device rows): equal where P() says so, which
            # shard_map cannot infer through the model's pmean (hence check_vma=False).
            fn = jax.shard_map(fn, mesh=self.mesh,
                               in_specs=(PartitionSpec(), PartitionSpec(AXIS_NAME)),
                               out_specs=out_sharding.spec, check_vma=False)
        return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=out_sharding, donate_argnums=donate_argnums)


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """The sum of an integer array over all processes, exact in int64 (every process
    must call this with the same shape); the array itself in a single process."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return counts
    if counts.min(initial=0) < 0 or counts.max(initial=0) >= 2**62:
        raise ValueError("sum_over_processes sums counts in [0, 2**62).")
    # JAX computes in 32 bits by default: gather the high and low halves.
    high, low = np.divmod(counts, 2**31)
    gathered = multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32))
    return (gathered[:, 0].astype(np.int64) * 2**31 + gathered[:, 1]).sum(axis=0)
