"""Device memory a compiled step needs, asked of the compiler before anything runs.

    budget, where = memory_budget(config.memory_budget_gb)
    batch, report = fit_batch_size(lambda b: train_step_bytes(step, state, par, b, shape),
                                   budget, step=par.batch_splits)

`compiled_bytes` reads XLA's `memory_analysis()` of a compiled program: arguments + outputs
+ temporaries - the donated arguments the outputs reuse, per device. `fit_batch_size`
finds the largest global batch under a budget with a handful of compiles (no trial run,
no out-of-memory): it fits a line through the memory of two batch sizes (a step's memory
grows linearly with the batch), then checks the predicted batch and the one above it.

`residual_bytes` counts what a train step's backward pass keeps from its forward (the
activations, and the weights it reads): the quantity `config.remat` trades for
recomputation. It is read from the program's structure (`jax.vjp` under
`jax.eval_shape`), so it is the same on every backend; XLA:CPU's compiled-memory figure
does not fall with remat (its scheduler runs the recomputation early), GPU's and TPU's
memory-aware schedulers' does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

GIB = 2**30


def format_bytes(size: float) -> str:
    """`3.9 MiB`, `1.25 GiB`."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def compiled_bytes(compiled: Any) -> int | None:
    """Per-device bytes a compiled program holds at its peak, from XLA's analysis (None
    where the backend gives none)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def one_pass_verdict(what: str, mode: str, size: tuple[int, int], used: int, budget: int,
                     where: str, instead: str) -> str:
    """The line saying whether one `mode` pass over the largest image (`size`, (height,
    width)) fits the budget; `instead`: how the images are segmented when it does not."""
    return (f"{what}: one {mode} pass over the largest image ({size[0]}x{size[1]}) needs "
            f"{format_bytes(used)} of the {format_bytes(budget)} budget ({where})"
            + ("." if used <= budget else f"; it is segmented in {instead}."))


def memory_budget(
    budget_gb: float, what: str = "batch_size='auto'",
    fix: str = "set --config.memory_budget_gb (the GiB one device may use), or give "
               "--config.batch_size",
    host_fallback: bool = False,
) -> tuple[int, str]:
    """(bytes, where the number comes from): `budget_gb` if > 0, else the memory of this
    process's first device as it reports it (`memory_stats()['bytes_limit']`, GPU and TPU).
    A CPU device reports none: with `host_fallback` its budget is half of the host's
    physical memory (a CPU device computes in the host's memory), else it is an error
    naming `what` needs the budget and the `fix`."""
    if budget_gb and budget_gb > 0:
        return int(budget_gb * GIB), f"memory_budget_gb={budget_gb:g}"
    device = jax.local_devices()[0]  # another process's device reports nothing here
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"the {device.device_kind}'s memory"
    if host_fallback and device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return host // 2, f"half of the host's {format_bytes(host)}"
    raise ValueError(
        f"{what} needs a memory budget, and the {device.platform} device does not report "
        f"its memory size; {fix}.")


def train_step_bytes(train_step: Any, abstract_state: Any, par: Any, global_batch: int,
                     input_shape: tuple[int, ...]) -> int:
    """Per-device bytes of `train_step` (a `make_train_step` result) compiled for a global
    batch of `global_batch` images of `input_shape` `(1, H, W, C)`; nothing runs."""
    _, height, width, channels = input_shape
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, height, width, channels), jnp.float32,
                                      sharding=par.batch_sharding),
        "label": jax.ShapeDtypeStruct((global_batch, height, width), jnp.int32,
                                      sharding=par.batch_sharding),
    }
    used = compiled_bytes(train_step.lower(abstract_state, batch).compile())
    if used is None:
        raise ValueError("batch_size='auto': this backend's compiler reports no memory "
                         "analysis; give --config.batch_size.")
    return used


def fit_batch_size(bytes_for: Callable[[int], int], budget: int, step: int,
                   limit: int = 1 << 16) -> tuple[int, str]:
    """The largest multiple of `step` whose `bytes_for(batch)` is at most `budget`, and a
    line saying why. Raises ValueError if even `step` does not fit."""
    cache: dict[int, int] = {}

    def used(batch: int) -> int:
        if batch not in cache:
            cache[batch] = bytes_for(batch)
        return cache[batch]

    if used(step) > budget:
        raise ValueError(
            f"batch_size='auto': even a batch of {step} (one image per device) needs "
            f"{format_bytes(used(step))} per device, over the {format_bytes(budget)} budget; "
            "use smaller images, spatial_partitions, or a bigger budget.")
    per_image = max(used(2 * step) - used(step), 1) / step
    batch = max(step, min(limit, int((budget - used(step)) / per_image / step) * step + step))
    while batch > step and used(batch) > budget:  # the line was optimistic: walk down
        batch -= step
    while batch + step <= limit and used(batch + step) <= budget:  # or pessimistic: up
        batch += step
    above = (f"{batch + step} would need {format_bytes(used(batch + step))}"
             if batch + step <= limit else f"the search stops at {limit}")
    return batch, (f"batch_size='auto' chose {batch}: its compiled train step needs "
                   f"{format_bytes(used(batch))} per device of the {format_bytes(budget)} "
                   f"budget; {above} ({len(cache)} compiles)")


def residual_bytes(model: Any, variables: Any, input_shape: tuple[int, ...]) -> int:
    """Bytes the backward pass of `model`'s training forward keeps from the forward, for a
    float32 image batch `[B, H, W, C]` of `input_shape`; nothing is computed.

    The residuals of `jax.vjp` with respect to the params (BatchNorm in training mode,
    dropout on), under `jax.eval_shape`: the activations each remat policy keeps or
    recomputes, plus the weights the backward pass reads (the same for every policy).
    `variables` may be arrays or their `jax.ShapeDtypeStruct`s (`jax.eval_shape(model.init,
    ...)`), so a model too large to initialise here can be measured.
    """
    from flaxseg.models import logits_of

    def forward(params, variables, images):
        outputs, _ = model.apply({**variables, "params": params}, images, train=True,
                                 rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
        return jnp.sum(logits_of(outputs))

    def vjp_function(variables, images):
        bound = functools.partial(forward, variables=variables, images=images)
        return jax.vjp(bound, variables["params"])[1]

    images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    kept = jax.eval_shape(vjp_function, variables, images)
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(kept)))


def forward_bytes(model: Any, variables: Any, input_shape: tuple[int, ...]) -> int:
    """Bytes of `model`'s inference forward (`train=False`) compiled for one device and a
    float32 batch of `input_shape` `[N, H, W, C]`; nothing runs.

    Compiled from the variables' shapes alone, for one device: the variables may be
    replicated over the devices of several processes, and one device's share is asked."""
    images = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), variables)
    apply = jax.jit(functools.partial(model.apply, train=False))
    used = compiled_bytes(apply.lower(shapes, images).compile())
    if used is None:
        raise ValueError("--tile_size=auto and predict's --mode=auto read the compiled "
                         "memory, and this backend's compiler reports none; give --tile_size "
                         "and --mode.")
    return used


def tile_candidates(geometry: Any, max_size: int) -> list[int]:
    """Square tile sizes up to `max_size` a model takes, ascending: the multiples of its
    stride for a same-size model, the sizes its geometry accepts otherwise (the VALID
    U-Net's, one every `2**depth` pixels)."""
    sizes = range(max(geometry.min_size, 1), max_size + 1)
    if geometry.output_size is None:
        return [s for s in sizes if s % geometry.stride == 0]
    return [s for s in sizes if geometry.accepts(s)]


def fit_tile_size(bytes_for: Callable[[int], int], candidates: list[int], budget: int
                  ) -> tuple[int, str]:
    """The largest of `candidates` (ascending) whose `bytes_for(size)` is at most `budget`
    (the largest itself first, then by bisection: a forward pass's memory grows with its
    tile), and a line saying why. Raises ValueError if none fits."""
    if not candidates:
        raise ValueError("--tile_size=auto: the model takes no tile size up to --max_tile.")
    cache: dict[int, int] = {}

    def fits(index: int) -> bool:
        size = candidates[index]
        if size not in cache:
            cache[size] = bytes_for(size)
        return cache[size] <= budget

    if not fits(0):
        raise ValueError(
            f"--tile_size=auto: even a {candidates[0]} px tile needs "
            f"{format_bytes(cache[candidates[0]])} per device, over the "
            f"{format_bytes(budget)} budget; lower --tile_batch or raise the budget.")
    low, high = 0, len(candidates) - 1  # fits(low); the answer is in [low, high]
    if fits(high):  # the usual case on a large budget: two compiles
        low = high
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    size = candidates[low]
    # Bisection only lowers `high` past a tile that failed, so the next one up is cached.
    above = (f"{size} px is the largest up to --max_tile" if low + 1 == len(candidates)
             else f"{candidates[low + 1]} px would need "
                  f"{format_bytes(cache[candidates[low + 1]])}")
    return size, (f"--tile_size=auto chose {size}x{size}: its compiled forward needs "
                  f"{format_bytes(cache[size])} per device of the {format_bytes(budget)} "
                  f"budget; {above} ({len(cache)} compiles)")
