"""Segmenting whole images of any size with a trained model.

The inference procedure is one pure JAX function of the images (`logits_function`), so
the same trace runs here under `jax.jit` and leaves the process as one `jax.export`
artifact (`flaxseg.export`); `predict_logits` is its host-side front: float images
`[B, H, W, C]` -> float32 logits `[B, H, W, num_classes]`, in batches. The modes:

- `'whole'`: one forward pass per image. The VALID U-Net returns the centre of its
  input (`[B, h, w, K]`, its geometry's `output_size`).
- `'pad'`: mirror-pad to a multiple of `multiple` (default: the model's geometry
  `stride`, e.g. `2**depth` for a U-Net), one pass, crop back: any size works.
- `'sliding'`: tiles of `tile_size` every `stride` pixels (default: overlapping by
  `overlap`, half a tile); where tiles overlap their logits are averaged.
- `'gaussian'`: nnU-Net's sliding window: as `'sliding'`, each tile's logits weighted
  by a Gaussian centred on the tile (sigma = tile / 8), so a pixel's prediction leans on
  the tiles that see it in their centre rather than at their border.
- `'overlap_tile'`: the U-Net paper's strategy for the VALID U-Net. The image is
  mirror-padded by the margin `(tile_size - out) / 2` that the valid convolutions
  eat, every input tile predicts an `out`-sized output tile, and the output tiles
  are stitched edge to edge. Tiles step by a multiple of the net's pooling stride
  (its geometry's `stride`), so every tile sees the pooling grid a single pass over
  the whole padded image would see: the stitched map equals that pass (no seams).

Test-time augmentation, in every mode: `flip=True` averages each forward pass with the
pass over the horizontally mirrored input (mirrored back); `scales=(0.5, 1.0, 1.5)`
(MMSegmentation's multi-scale TTA) runs the mode on the image resized by each scale
(bilinear, half-pixel centres), resizes the logits back and averages them.

How an image is padded or tiled comes from the model's declared geometry
(`flaxseg.models.geometry`), never from its field names.

`predict` runs a model over image files and writes class-index PNG masks and
colourised overlays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import streaming, tiling, visualize
from flaxseg.image_files import (
    Inputs,
    PredictionResult,
    channel_mismatch,
    list_images,
    load_image,
    output_stems,
    write_prediction,
)
from flaxseg.models import logits_of, model_geometry
from flaxseg.normalization import Normalization

MODES = ("whole", "pad", "sliding", "gaussian", "overlap_tile")
TILED_MODES = ("sliding", "gaussian", "overlap_tile")
#: Multi-scale TTA's scales become fractions with denominators up to this.
SCALE_DENOMINATOR = 64

Size = int | tuple[int, int]
Logits = Callable[[jax.Array], jax.Array]  # float32 [B, H, W, C] -> float32 [B, h, w, K]


def _pair(value: Size, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _logits(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return logits_of(model.apply(variables, images, train=False)).astype(jnp.float32)


def _output_shape(
    model: nn.Module, variables: Any, height: int, width: int, channels: int
) -> tuple[int, int, int]:
    """`(h, w, K)` of the logits for `[1, height, width, channels]`; cached by the
    variables' shapes (abstract evaluation traces the model: ~tens of ms a call)."""
    leaves, treedef = jax.tree.flatten(variables)
    shapes = tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves)
    return _abstract_output_shape(model, treedef, shapes, height, width, channels)


@functools.lru_cache(maxsize=256)
def _abstract_output_shape(model: nn.Module, treedef: Any, shapes: tuple, height: int,
                           width: int, channels: int) -> tuple[int, int, int]:
    variables = jax.tree.unflatten(treedef, shapes)
    spec = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
    try:
        out = jax.eval_shape(functools.partial(_logits, model), variables, spec)
    except Exception as error:  # the model's own error, re-raised with the input named
        raise ValueError(
            f"the model cannot take an input of {height}x{width} with {channels} channel(s): "
            f"{error}"
        ) from error
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def output_size(
    model: nn.Module, variables: Any, height: int, width: int, channels: int
) -> tuple[int, int]:
    """The logits' `(h, w)` for an input `[1, height, width, channels]`, found by
    abstract evaluation (nothing is computed). Raises ValueError when the model
    cannot take that input (wrong channel count, a size a VALID net rejects)."""
    return _output_shape(model, variables, height, width, channels)[:2]


def num_classes(model: nn.Module, variables: Any, channels: int) -> int:
    """K of the model's logits (abstract evaluation at its smallest input size)."""
    geometry = model_geometry(model)
    size = geometry.smallest_input(geometry.stride)
    return _output_shape(model, variables, size, size, channels)[2]


def default_mode(model: nn.Module, tiled: bool = False) -> str:
    """The mode that segments any image size in full, from the model's geometry:
    `'overlap_tile'` for a net whose output is smaller than its input (the VALID U-Net),
    `'pad'` for a net with a stride above 1, else `'whole'`. `tiled` (a tile size was
    given): a tiled mode, `'overlap_tile'` or `'gaussian'` (nnU-Net's), which streams."""
    geometry = model_geometry(model)
    if geometry.output_size is not None:
        return "overlap_tile"
    if tiled:
        return "gaussian"
    return "pad" if geometry.stride > 1 else "whole"


def normalizer(
    mean: Sequence[float] | np.ndarray = (0.0,), std: Sequence[float] | np.ndarray = (1.0,)
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 `[H, W, C]` -> float32 `(image / 255 - mean) / std`, per channel (`mean` and
    `std` in [0, 1] units, 1 or C values): the training data's normalisation."""
    return Normalization(tuple(np.ravel(mean)), tuple(np.ravel(std)))


# -- the procedure, resolved (host side) ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The inference procedure with every option resolved to numbers. Hashable: a static
    argument of `jax.jit`, and the same plan traces in-process and for export.

    mode: one of `MODES`.
    flip: average every forward pass with the pass over the mirrored input.
    scales: multi-scale TTA, exact fractions (`(1,)`: the image as it is).
    multiple: `'pad'` pads H, W to multiples of this; `'whole'` rounds scaled sizes to it.
    tile: the input tile `(h, w)` of the tiled modes.
    step: the tile step `(h, w)` of the tiled modes.
    out_tile: `'overlap_tile'`: the output tile the net predicts for `tile`.
    tile_batch: tile positions per forward pass (each pass predicts `tile_batch * B` tiles).
    """

    mode: str
    flip: bool = False
    scales: tuple[Fraction, ...] = (Fraction(1),)
    multiple: tuple[int, int] = (1, 1)
    tile: tuple[int, int] | None = None
    step: tuple[int, int] | None = None
    out_tile: tuple[int, int] | None = None
    tile_batch: int = 4


def parse_scales(scales: float | Sequence[float] | None) -> tuple[Fraction, ...]:
    """Positive scales as fractions (denominator <= `SCALE_DENOMINATOR`), order and
    duplicates kept; None: `(1,)`."""
    if scales is None:
        scales = (1,)
    values = [scales] if isinstance(scales, int | float | Fraction) else list(scales)
    if not values:
        raise ValueError("scales is empty; give at least one scale, e.g. (1.0,)")
    out = []
    for value in values:
        try:
            scale = Fraction(float(value)).limit_denominator(SCALE_DENOMINATOR)
        except (TypeError, ValueError):
            raise ValueError(f"scales must be positive numbers, got {value!r}") from None
        if scale <= 0:
            raise ValueError(f"scales must be positive numbers, got {value!r}")
        out.append(scale)
    return tuple(out)


def _sliding_step(tile: tuple[int, int], stride: Size | None, overlap: float
                  ) -> tuple[int, int]:
    if stride is not None:
        step = _pair(stride, "stride")
    elif not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1) (a fraction of the tile), got {overlap}")
    else:
        step = tuple(max(1, round(t * (1.0 - overlap))) for t in tile)
    if step[0] > tile[0] or step[1] > tile[1]:
        raise ValueError(
            f"stride {step} must not exceed tile_size {tile}: pixels would be skipped")
    return step


def _overlap_tile_plan(plan: Plan, model: nn.Module, variables: Any, channels: int,
                       align: Size | None) -> Plan:
    (th, tw), (oh, ow, _) = plan.tile, _output_shape(model, variables, *plan.tile, channels)
    if (th - oh) % 2 or (tw - ow) % 2:
        raise ValueError(
            f"mode='overlap_tile' needs an output centred in its input; tile {th}x{tw} gives "
            f"{oh}x{ow}")
    # Output tiles step by the largest multiple of the pooling stride that fits in them,
    # so each tile sees the pooling grid of a single pass over the padded image.
    ah, aw = (model_geometry(model).stride,) * 2 if align is None else _pair(align, "align")
    step = (oh - oh % ah, ow - ow % aw)
    if min(step) == 0:
        raise ValueError(
            f"tile {th}x{tw} gives an output of {oh}x{ow}, smaller than the pooling stride "
            f"{ah}x{aw}; use a larger tile_size")
    return dataclasses.replace(plan, step=step, out_tile=(oh, ow))


def _same_size_only(mode: str) -> ValueError:
    return ValueError(
        f"mode={mode!r} needs a net whose output has its input's size; for the VALID "
        "U-Net use mode='overlap_tile'")


def make_plan(
    model: nn.Module, variables: Any, channels: int, *, mode: str = "whole",
    flip: bool = False, scales: float | Sequence[float] | None = None,
    multiple: Size | None = None, tile_size: Size | None = None, stride: Size | None = None,
    overlap: float = 0.5, align: Size | None = None, tile_batch: int = 4,
) -> Plan:
    """Checks the options against the model (its geometry; a tile's output by abstract
    evaluation) and resolves their defaults: see `predict_logits` for their meaning.
    Raises ValueError, naming the option, for a combination that cannot work."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if not isinstance(tile_batch, int) or tile_batch < 1:
        raise ValueError(f"tile_batch must be a positive int, got {tile_batch!r}")
    geometry = model_geometry(model)
    same_size = geometry.output_size is None
    plan = Plan(mode, bool(flip), parse_scales(scales), tile_batch=tile_batch)
    if mode in ("pad", "sliding", "gaussian") and not same_size:
        raise _same_size_only(mode)
    if not same_size and plan.scales != (1,) and mode == "whole":
        raise ValueError("multi-scale TTA resizes the logits back to the image: it needs "
                         "a mode that predicts the whole image ('overlap_tile' for the "
                         "VALID U-Net)")
    if mode in ("whole", "pad"):
        use = multiple if mode == "pad" and multiple is not None else geometry.stride
        return dataclasses.replace(plan, multiple=_pair(use, "multiple"))
    if tile_size is None:
        raise ValueError(f"mode={mode!r} needs tile_size=(height, width)")
    plan = dataclasses.replace(plan, tile=_pair(tile_size, "tile_size"))
    if mode == "overlap_tile":
        return _overlap_tile_plan(plan, model, variables, channels, align)
    plan = dataclasses.replace(plan, step=_sliding_step(plan.tile, stride, overlap))
    if _output_shape(model, variables, *plan.tile, channels)[:2] != plan.tile:
        raise _same_size_only(mode)
    return plan


# -- the procedure, traced (any image size, symbolic ones included) ----------------------------


def _network(model: nn.Module, variables: Any, flip: bool) -> Logits:
    """The forward pass, averaged with the mirrored-back pass over the mirrored input
    when `flip`."""
    net = functools.partial(_logits, model, variables)
    if not flip:
        return net
    return lambda x: 0.5 * (net(x) + net(x[:, :, ::-1])[:, :, ::-1])


def _num_classes(net: Logits, x: jax.Array, tile: tuple[int, int]) -> int:
    """K of the net's logits on tiles of `x` (abstract evaluation, nothing runs)."""
    spec = jax.ShapeDtypeStruct((x.shape[0], *tile, x.shape[3]), x.dtype)
    return int(jax.eval_shape(net, spec).shape[-1])


def _pad_amounts(height: tiling.Dim, width: tiling.Dim, multiple: tuple[int, int]
                 ) -> tuple[tiling.Dim, tiling.Dim, tiling.Dim, tiling.Dim]:
    """(top, bottom, left, right) that pad `height x width` to multiples of `multiple`,
    split evenly (the odd pixel at the bottom / right)."""
    pad_h = tiling.ceil_div(height, multiple[0]) * multiple[0] - height
    pad_w = tiling.ceil_div(width, multiple[1]) * multiple[1] - width
    return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2


def _predict_pad(net: Logits, x: jax.Array, multiple: tuple[int, int]) -> jax.Array:
    _, height, width, _ = x.shape
    top, bottom, left, right = _pad_amounts(height, width, multiple)
    padded = tiling.mirror_pad(x, top, bottom, left, right)
    return tiling.crop(net(padded), top, left, height, width)


def _tile_layout(plan: Plan, height: tiling.Dim, width: tiling.Dim) -> tiling.TileLayout:
    if plan.mode == "overlap_tile":
        return tiling.overlap_tile_layout(height, width, plan.tile, plan.out_tile, plan.step)
    return tiling.sliding_layout(height, width, plan.tile, plan.step)


def _stitching(plan: Plan) -> tuple[Callable[..., Any], Callable[[Any], jax.Array]]:
    """The tiled mode's `over_tiles` update, and what turns its carry into logits:
    weighted sums divided by the summed weights ('sliding', 'gaussian'), or output tiles
    placed ('overlap_tile')."""
    if plan.mode == "overlap_tile":
        return (lambda carry, *tile: (tiling.place(carry[0], *tile),)), lambda c: c[0]
    weights = (tiling.gaussian_weights(plan.tile) if plan.mode == "gaussian"
               else np.ones((*plan.tile, 1), np.float32))
    update = functools.partial(tiling.add_weighted, weights=jnp.asarray(weights))
    return update, lambda carry: carry[0] / carry[1]


def _predict_tiled(net: Logits, x: jax.Array, plan: Plan) -> jax.Array:
    batch, height, width, _ = x.shape
    layout = _tile_layout(plan, height, width)
    padded = tiling.mirror_pad(x, *layout.pad)
    update, finish = _stitching(plan)
    carry = tiling.over_tiles(
        padded, net, layout.rows, layout.cols, plan.tile, plan.tile_batch, update,
        tiling.empty_canvas(plan.mode != "overlap_tile", batch, *layout.canvas,
                            _num_classes(net, x, plan.tile)))
    return tiling.crop(finish(carry), *layout.crop, height, width)


def _one_scale(net: Logits, x: jax.Array, plan: Plan) -> jax.Array:
    if plan.mode == "whole":
        return net(x)
    if plan.mode == "pad":
        return _predict_pad(net, x, plan.multiple)
    return _predict_tiled(net, x, plan)


def _multi_scale(net: Logits, x: jax.Array, plan: Plan) -> jax.Array:
    """The mode at every scale of `plan`, logits resized back to the image and averaged.
    'whole' rounds the scaled sizes to its `multiple` (the net's stride)."""
    if plan.scales == (1,):
        return _one_scale(net, x, plan)
    _, height, width, _ = x.shape
    mh, mw = plan.multiple if plan.mode == "whole" else (1, 1)
    total = None
    for scale in plan.scales:
        if scale == 1:
            logits = _one_scale(net, x, plan)
        else:
            small = tiling.resize_bilinear(
                x, tiling.scaled_size(height, scale, mh), tiling.scaled_size(width, scale, mw))
            logits = tiling.resize_bilinear(_one_scale(net, small, plan), height, width)
        total = logits if total is None else total + logits
    return total / len(plan.scales)


def logits_function(model: nn.Module, plan: Plan) -> Callable[[Any, jax.Array], jax.Array]:
    """The procedure of `plan` as one pure JAX function: `(variables, images float32
    [B, H, W, C]) -> logits float32 [B, H', W', K]` (H', W' = H, W except 'whole' on a
    VALID net). Traceable with symbolic B, H, W (`jax.export`) where the mode allows."""

    def logits(variables: Any, images: jax.Array) -> jax.Array:
        return _multi_scale(_network(model, variables, plan.flip), images, plan)

    return logits


def _shift_rows(x: jax.Array, shift: Any, axis: int) -> jax.Array:
    """`x` moved up by `shift` rows along `axis` (0 <= shift <= its length), zeros below."""
    both = jnp.concatenate([x, jnp.zeros_like(x)], axis)
    return jax.lax.dynamic_slice_in_dim(both, shift, x.shape[axis], axis)


def band_function(model: nn.Module, plan: Plan,
                  tile_sharding: jax.sharding.Sharding | None = None,
                  logits: bool = False) -> Callable[..., Any]:
    """The band program of a tiled plan (`flaxseg.streaming`), one pure JAX function:
    `(variables, rows float32 [1, h_in, w_in, C], carry, first_pass, num_passes, origin,
    shift, rows_count, rows_last) -> (labels uint8 [1, h_out, w_out], carry)`; with
    `logits`, the window's logits float32 `[1, h_out, w_out, K]` instead of its labels
    (one scale of the streamed multi-scale TTA).

    `rows` are the padded input rows from `origin`; `carry` (`tiling.empty_canvas` of a
    window `[1, h_out, w_out, K]`) holds the previous band's window, which moves up by
    `shift` rows before this band's passes add their tiles. `rows_count, rows_last`: the
    tile rows of the whole image (`TileLayout.rows`). Each pass of `tile_batch` tiles is
    placed with `tile_sharding` (e.g. over the mesh's 'data' axis). Traceable with a
    symbolic window width and height (`jax.export`)."""
    if plan.mode not in TILED_MODES or plan.scales != (1,):
        raise ValueError(f"streaming takes a tiled mode {TILED_MODES} without multi-scale "
                         f"TTA; got mode={plan.mode!r}, scales={plan.scales}")
    update, finish = _stitching(plan)
    (_, ow), (sh, sw) = plan.out_tile or plan.tile, plan.step

    def band(variables: Any, rows: jax.Array, carry: Any, first_pass: Any, num_passes: Any,
             origin: Any, shift: Any, rows_count: Any, rows_last: Any) -> tuple[Any, Any]:
        forward = _network(model, variables, plan.flip)

        def net(tiles: jax.Array) -> jax.Array:
            if tile_sharding is not None:  # the pass's tiles split over the devices
                tiles = jax.lax.with_sharding_constraint(tiles, tile_sharding)
            return forward(tiles)

        width = carry[0].shape[2]
        cols = (tiling.tile_grid(rows.shape[2], plan.tile[1], sw) if plan.mode != "overlap_tile"
                else ((width - ow) // sw + 1, sw, width - ow))
        window = (_shift_rows(carry[0], shift, 1), *(_shift_rows(c, shift, 0) for c in carry[1:]))
        window = tiling.over_tiles(rows, net, (rows_count, sh, rows_last), cols, plan.tile,
                                   plan.tile_batch, update, window,
                                   passes=(first_pass, num_passes), origin=origin)
        scores = finish(window)
        return (scores if logits else jnp.argmax(scores, axis=-1).astype(jnp.uint8)), window

    return band


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(6,))
def _run_band(model: nn.Module, plan: Plan, tile_sharding: jax.sharding.Sharding | None,
              logits: bool, variables: Any, rows: jax.Array, carry: Any, *scalars: Any
              ) -> tuple[Any, Any]:
    return band_function(model, plan, tile_sharding, logits)(variables, rows, carry, *scalars)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run(model: nn.Module, plan: Plan, variables: Any, images: jax.Array) -> jax.Array:
    return logits_function(model, plan)(variables, images)


# -- in-process inference ---------------------------------------------------------------------


def _as_float_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """float32 `[B, H, W, C]` and whether a single `[H, W, C]` image was given."""
    images = np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"images must have shape [B, H, W, C] or [H, W, C], got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be float (preprocessed like the training data), got {images.dtype}"
        )
    return images.astype(np.float32), single


def _splits(sharding: jax.sharding.Sharding | None, axis: int) -> int:
    """How many ways `sharding` splits `axis` of an NHWC array (1 without one)."""
    if sharding is None:
        return 1
    probe = math.lcm(*range(1, 17))  # divisible by any split of up to 16 devices
    shape = [1, 1, 1, 1]
    shape[axis] = probe
    return probe // sharding.shard_shape(tuple(shape))[axis]


def _split_pad(model: nn.Module, variables: Any, plan: Plan, images: np.ndarray,
               batch_size: int, sharding: jax.sharding.Sharding) -> np.ndarray:
    """Mode 'pad' with each image's rows split over devices: padded here to whole rows
    per device (a sharded array must divide evenly), predicted whole, cropped back."""
    if plan.scales != (1,):
        raise ValueError("sharding predicts each image in one pass at its own size; "
                         "multi-scale TTA (scales=) is not supported with it")
    _, height, width, _ = images.shape
    multiple = (math.lcm(plan.multiple[0], _splits(sharding, 1)), plan.multiple[1])
    top, bottom, left, right = _pad_amounts(height, width, multiple)
    padded = np.asarray(tiling.mirror_pad(jnp.asarray(images), top, bottom, left, right))
    whole = dataclasses.replace(plan, mode="whole")
    check_size(model, variables, whole, padded.shape[1:])
    logits = _batches(model, variables, whole, padded, batch_size, sharding)
    return logits[:, top : top + height, left : left + width]


def check_size(model: nn.Module, variables: Any, plan: Plan, shape: tuple[int, ...]) -> None:
    """Raises a clear ValueError for an image `(H, W, C)` the whole-image modes ('whole',
    'pad') of `plan` cannot take (the tiled modes take any size)."""
    height, width, channels = shape
    if plan.mode == "whole":
        output_size(model, variables, height, width, channels)
    elif plan.mode == "pad":
        top, bottom, left, right = _pad_amounts(height, width, plan.multiple)
        padded = (top + height + bottom, left + width + right)
        if output_size(model, variables, *padded, channels) != padded:
            raise _same_size_only("pad")


def _batches(model: nn.Module, variables: Any, plan: Plan, images: np.ndarray,
             batch_size: int, sharding: jax.sharding.Sharding | None) -> np.ndarray:
    """The plan over `images` in batches of `batch_size` (the last one padded, so one
    compiled shape serves all), each placed with `sharding` when given."""
    place = jnp.asarray if sharding is None else (lambda x: jax.device_put(x, sharding))
    size = min(batch_size, len(images))
    outputs = []
    for start in range(0, len(images), size):
        batch = images[start : start + size]
        count = len(batch)
        if count < size:
            batch = np.concatenate([batch, np.zeros((size - count, *batch.shape[1:]),
                                                    batch.dtype)])
        outputs.append(np.asarray(_run(model, plan, variables, place(batch)))[:count])
    return np.concatenate(outputs)


def predict_logits(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    *,
    mode: str = "whole",
    flip: bool = False,
    scales: float | Sequence[float] | None = None,
    multiple: Size | None = None,
    tile_size: Size | None = None,
    stride: Size | None = None,
    overlap: float = 0.5,
    align: Size | None = None,
    tile_batch: int = 4,
    batch_size: int = 4,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray:
    """Logits for a batch of images: float `[B, H, W, C]` (or one `[H, W, C]`) ->
    float32 NumPy `[B, H, W, K]` (no batch axis for a single image).

    Args:
      model, variables: a flaxseg model (or any Linen module with the model contract,
        its geometry declared by a `geometry()` method) and its variables.
      images: preprocessed like the training data (float32, e.g. in [0, 1]).
      mode: one of `MODES` (see the module docstring). `'whole'` on the VALID U-Net
        gives the centre `[B, h, w, K]`.
      flip: also predict the horizontally mirrored input of every pass and average.
      scales: multi-scale TTA, e.g. `(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)`; None: `(1,)`.
      multiple: `'pad'` pads H and W up to a multiple of this; default: the geometry's
        `stride`.
      tile_size: input tile `(h, w)` of the tiled modes (required); for the VALID U-Net
        it must be a size the net takes.
      stride: `'sliding'` / `'gaussian'` tile step; default from `overlap`.
      overlap: the fraction of a tile its neighbour overlaps (default half: nnU-Net's).
      align: `'overlap_tile'`: the pooling stride tile steps are multiples of; default:
        the geometry's `stride`.
      tile_batch: tile positions per forward pass (`tile_batch * batch` tiles).
      batch_size: images per call of the compiled procedure.
      sharding: modes 'whole' and 'pad': how to place each batch `[b, H, W, C]`, e.g.
        `NamedSharding(mesh, P(None, 'space'))` to split a large image's rows over the
        devices of a mesh and predict it in one pass (`variables` replicated on the same
        devices). 'pad' pads H to a multiple of the devices too.
    """
    images, single = _as_float_batch(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if sharding is not None and mode not in ("whole", "pad"):
        raise ValueError(f"sharding splits whole images over devices (modes 'whole' and "
                         f"'pad'); mode {mode!r} predicts tiles")
    plan = make_plan(model, variables, images.shape[-1], mode=mode, flip=flip, scales=scales,
                     multiple=multiple, tile_size=tile_size, stride=stride, overlap=overlap,
                     align=align, tile_batch=tile_batch)
    if mode == "pad" and sharding is not None:
        logits = _split_pad(model, variables, plan, images, batch_size, sharding)
    else:
        check_size(model, variables, plan, images.shape[1:])
        logits = _batches(model, variables, plan, images, batch_size, sharding)
    return logits[0] if single else logits


def stream_bands(plan: Plan, height: int, width: int) -> streaming.Bands:
    """How an image of `height x width` streams through the tiled `plan`."""
    layout = _tile_layout(plan, height, width)
    return streaming.make_bands(layout, plan.tile, plan.out_tile or plan.tile,
                                plan.tile_batch)


def predict_labels(
    model: nn.Module,
    variables: Any,
    image: Any,
    *,
    mode: str,
    tile_size: Size,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    flip: bool = False,
    scales: float | Sequence[float] | None = None,
    stride: Size | None = None,
    overlap: float = 0.5,
    align: Size | None = None,
    tile_batch: int = 4,
    tile_sharding: jax.sharding.Sharding | None = None,
    out: np.ndarray | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class labels of one image of any size in a tiled mode, streamed in bands of tile
    rows (`flaxseg.streaming`): host memory holds one band of the input and of the
    float32 logits (per scale), and the labels; never the image's whole logits.

    Args:
      image: uint8 (or raw) `[H, W, C]`, any array that slices by rows: a NumPy array, a
        `np.memmap`, a memory-mapped TIFF (`image_files.open_large`).
      mode, tile_size, flip, scales, stride, overlap, align, tile_batch: as
        `predict_logits` (mode one of `TILED_MODES`). With multi-scale TTA every scale
        streams its own bands over the image resized to it (`streaming.ResizedImage`),
        and its logits are resized back and averaged one chunk of rows at a time
        (`streaming.stream_scales`).
      preprocess: a band of rows uint8 `[h, W, C]` -> float32, as in training; default
        `normalizer()` (divides by 255).
      tile_sharding: places each pass of `tile_batch` tiles, e.g. `NamedSharding(mesh,
        P('data'))` to spread the tiles over the mesh's devices (`tile_batch` a multiple
        of them; `variables` replicated on the same mesh).
      out: uint8 `[H, W]` to write the labels into (e.g. a `np.memmap`); default a new
        array.
      on_progress: called with (tiles done, tiles in all, over every scale) after each
        band (`streaming.Progress` prints tiles/s and ETA).

    Returns `out`: the labels, bitwise `argmax(predict_logits(...))` for the same options
    and devices.
    """
    if mode not in TILED_MODES:
        raise ValueError(f"predict_labels streams the tiled modes {TILED_MODES}; got mode="
                         f"{mode!r} (use predict_logits for whole-image modes)")
    height, width, channels = image.shape
    plan = make_plan(model, variables, channels, mode=mode, flip=flip, scales=scales,
                     tile_size=tile_size, stride=stride, overlap=overlap, align=align,
                     tile_batch=tile_batch)
    num_classes = _output_shape(model, variables, *plan.tile, channels)[2]
    if num_classes > 256:
        raise ValueError(f"{num_classes} classes do not fit the streamed uint8 labels; use "
                         "predict_logits (in memory) for a model of more than 256 classes")
    place = _placement(tile_sharding, tile_batch)
    one_scale = dataclasses.replace(plan, scales=(Fraction(1),))
    preprocess = preprocess or normalizer()
    out = np.empty((height, width), np.uint8) if out is None else out

    def bands_for(rows: int, cols: int) -> streaming.Bands:
        return stream_bands(one_scale, rows, cols)

    def zero_carry(bands: streaming.Bands) -> Any:
        return place(tiling.empty_canvas(plan.mode != "overlap_tile", 1, bands.window_out,
                                         bands.layout.canvas[1], num_classes, np))

    def run(logits: bool) -> streaming.BandProgram:
        return lambda rows, carry, *scalars: _run_band(
            model, one_scale, tile_sharding, logits, variables, place(rows), carry, *scalars)

    if plan.scales == (1,):
        bands = bands_for(height, width)
        return streaming.stream(run(False), bands, image, zero_carry(bands), out, preprocess,
                                on_progress)
    return streaming.stream_tta(run(True), bands_for, image, plan.scales, zero_carry,
                                preprocess, out, plan.tile[0], on_progress)


def _placement(tile_sharding: jax.sharding.Sharding | None, tile_batch: int
               ) -> Callable[[Any], Any]:
    """Puts a band's arrays where its program runs: the default device, or replicated
    over `tile_sharding`'s mesh (whose 'data' axis must divide `tile_batch`)."""
    if tile_sharding is None:
        return functools.partial(jax.tree.map, jnp.asarray)
    splits = _splits(tile_sharding, 0)
    if tile_batch % splits:
        raise ValueError(f"tile_batch={tile_batch} cannot be split over {splits} devices; "
                         f"use a multiple of {splits} (e.g. "
                         f"{splits * -(-tile_batch // splits)})")
    replicated = jax.sharding.NamedSharding(tile_sharding.mesh, jax.sharding.PartitionSpec())
    return functools.partial(jax.device_put, device=replicated)


def streams(mode: str, scales: float | Sequence[float] | None = None) -> bool:
    """Whether `predict` streams this mode in bands (the tiled modes, multi-scale TTA
    included) rather than holding the image's logits. `scales` no longer matter (they
    did before multi-scale TTA streamed); passing them warns."""
    if scales is not None:
        warnings.warn("inference.streams(mode, scales): the scales no longer matter, "
                      "multi-scale TTA streams too; call streams(mode).", DeprecationWarning,
                      stacklevel=2)
    return mode in TILED_MODES


def _labels(model: nn.Module, variables: Any, image: Any, mode: str,
            preprocess: Callable[[np.ndarray], np.ndarray], name: str,
            options: dict[str, Any]) -> np.ndarray:
    """uint8 labels `[h, w]` of one uint8 image `[H, W, C]`: streamed where `streams`
    says so (with progress on stderr), else from `predict_logits`."""
    if streams(mode):
        kept = {k: v for k, v in options.items() if k != "batch_size"}
        return predict_labels(model, variables, image, mode=mode, preprocess=preprocess,
                              on_progress=streaming.Progress(name), **kept)
    logits = predict_logits(model, variables, preprocess(np.asarray(image)), mode=mode,
                            **options)
    if logits.shape[-1] > 256:
        raise ValueError(f"{logits.shape[-1]} classes do not fit a uint8 PNG mask")
    return np.argmax(logits, axis=-1).astype(np.uint8)


def predict(
    model: nn.Module,
    variables: Any,
    inputs: Inputs,
    output_dir: str | os.PathLike,
    *,
    mode: str = "whole",
    palette: np.ndarray | None = None,
    num_channels: int | None = None,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    alpha: float = 0.5,
    shard: tuple[int, int] = (0, 1),
    **predict_kwargs: Any,
) -> list[PredictionResult]:
    """Segments image files and writes `<output_dir>/masks/<name>.png` (class indices,
    uint8) and `<output_dir>/overlays/<name>.png` (colours over the image); a mask past
    PNG's practical size is a tiled TIFF (`image_files.write_prediction`).

    Args:
      inputs: an image file, a directory of images, or a list of files.
      mode, predict_kwargs: passed to `predict_logits` (`flip`, `tile_size`, ...), or,
        for the tiled modes (`streams`), to `predict_labels` (which also takes
        `tile_sharding`): streamed in bands with bounded memory and progress on stderr,
        multi-scale TTA too. With the VALID U-Net in mode `'whole'` the mask covers the
        image's centre.
      palette: uint8 `[num_classes, 3]`; default `visualize.generated_palette` (no
        dataset's colours).
      num_channels: the channel count the model was trained on; a file with another
        count fails with a clear message. None: any count the model takes.
      preprocess: uint8 `[H, W, C]` -> float32 `[H, W, C]`, as in training;
        default `normalizer()` (divides by 255).
      shard: `(index, count)`: segment only every `count`-th file from the `index`-th
        (one process's share of the files; the names are checked over all of them).

    A file that cannot be read, has the wrong channel count or a size the model
    cannot take gets a `PredictionResult` whose `error` names the file and the
    problem; the other files are still processed. Returns one result per file.
    """
    files = list_images(inputs)
    stems = output_stems(files)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard}")
    preprocess = preprocess or normalizer()
    results = []
    for path, stem in zip(files[index::count], stems[index::count], strict=True):
        try:
            image = load_image(path)
            mismatch = num_channels and channel_mismatch(image, num_channels)
            if mismatch:
                raise ValueError(mismatch)
            mask = _labels(model, variables, image, mode, preprocess,
                           os.path.basename(path), predict_kwargs)
        except (OSError, ValueError) as error:  # unreadable file, or an input the model rejects
            results.append(PredictionResult(path, error=f"{path}: {error}"))
            continue
        classes = num_classes(model, variables, image.shape[-1])
        colours = visualize.palette_or_generated(palette, classes)[0]
        paths = write_prediction(output_dir, stem, image, mask, colours, alpha)
        results.append(PredictionResult(path, *paths))
    return results
