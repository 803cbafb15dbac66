"""The array operations of the inference procedure, written once for any image size.

`flaxseg.inference` builds its modes from these; `flaxseg.export` lowers the result with
H and W symbolic (`jax.export`'s shape polymorphism), so every size arithmetic here is
`+ - * //` and `dim_max` on sizes that may be symbolic, and padding, cropping and
resizing are gathers with computed indices (or, for the models' resizes, contractions
with matrices built from them): one traced program serves every image size.
Arrays are NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Dim = Any  # an int, or a symbolic size under jax.export
Grid = tuple[Dim, int, Dim]  # one axis of tile corners: (count, step, last start)

#: nnU-Net's sigma for its Gaussian tile weights: an eighth of the tile.
GAUSSIAN_SIGMA_SCALE = 1 / 8


def dim_max(a: Dim, b: Dim) -> Dim:
    """`max(a, b)` for sizes that may be symbolic."""
    if jax.export.is_symbolic_dim(a):
        return a.max(b)
    if jax.export.is_symbolic_dim(b):
        return b.max(a)
    return max(a, b)


def ceil_div(a: Dim, b: int) -> Dim:
    return (a + b - 1) // b


def scaled_size(size: Dim, scale: Fraction, multiple: int = 1) -> Dim:
    """`size * scale` rounded (half up) to a multiple of `multiple`, at least `multiple`:
    integer arithmetic, so it holds for symbolic sizes too (multi-scale TTA's sizes)."""
    p, q = scale.numerator, scale.denominator
    return dim_max((2 * size * p + q * multiple) // (2 * q * multiple) * multiple, multiple)


def reflect_indices(size: Dim, offset: Dim, length: Dim, xp: Any = jnp) -> Any:
    """Indices into an axis of `length` for positions `-offset .. size - offset - 1`,
    mirrored at the ends without repeating the edge (NumPy's 'reflect', repeated as
    often as the padding needs); a 1-pixel axis repeats its pixel. `xp=np` computes them
    on the host (the streamed bands gather their rows with them)."""
    period = xp.maximum(2 * (length - 1), 1)
    index = xp.mod(xp.arange(size) - offset, period)
    return xp.where(index >= length, period - index, index)


def mirror_pad(x: jax.Array, top: Dim, bottom: Dim, left: Dim, right: Dim) -> jax.Array:
    """`[B, H, W, C]` -> `[B, top + H + bottom, left + W + right, C]`, mirrored as the
    U-Net paper pads (Fig. 2)."""
    _, height, width, _ = x.shape
    if not all(isinstance(p, int) and p == 0 for p in (top, bottom)):
        x = jnp.take(x, reflect_indices(top + height + bottom, top, height), axis=1)
    if not all(isinstance(p, int) and p == 0 for p in (left, right)):
        x = jnp.take(x, reflect_indices(left + width + right, left, width), axis=2)
    return x


def crop(x: jax.Array, top: Dim, left: Dim, height: Dim, width: Dim) -> jax.Array:
    """`x[:, top : top + height, left : left + width]` for sizes that may be symbolic."""
    return jax.lax.dynamic_slice(
        x, (0, top, left, 0), (x.shape[0], height, width, x.shape[3]))


def _linear_taps(length: Dim, size: Dim, xp: Any = jnp) -> tuple[Any, Any, Any]:
    """`(low, high, fraction)`, each `[size]`: output pixel o of a half-pixel linear
    resize from `length` to `size` is `(1 - fraction) * in[low] + fraction * in[high]`.
    `xp=np`: on the host (the streamed multi-scale TTA reads which rows a block needs)."""
    # Output pixel o samples the input at (o + 1/2) * length / size - 1/2, clamped to the
    # edges: numerator and denominator in integers, so the position is exact and the
    # fraction one correctly rounded division, whatever the compiler fuses.
    numerator = xp.maximum((2 * xp.arange(size) + 1) * length - size, 0)
    denominator = 2 * size
    low = xp.minimum(numerator // denominator, length - 1)
    high = xp.minimum(low + 1, length - 1)
    fraction = (numerator - low * denominator).astype(xp.float32) / xp.asarray(
        denominator, xp.float32)
    return low, high, fraction


def source_rows(length: int, size: int, start: int, count: int) -> tuple[int, int]:
    """The input rows `[first, last)` that rows `[start, start + count)` of a resize from
    `length` to `size` rows read (host integers)."""
    low, high, _ = _linear_taps(length, size, np)
    return int(low[start]), int(high[start + count - 1]) + 1


def resize_rows(block: jax.Array, first: Any, length: int, start: Any, count: int,
                size: int, width: int) -> jax.Array:
    """Rows `[start, start + count)` of `resize_bilinear(x, size, width)` for an `x` of
    `length` rows, from `block` `[B, n, W, C]`: x's rows `first, first + 1, ...` (at least
    those `source_rows` names). The same taps and lerps in the same order, so the rows
    are bitwise `resize_bilinear`'s; a streamed image is resized one block at a time."""
    low, high, fraction = (jax.lax.dynamic_slice_in_dim(t, start, count)
                           for t in _linear_taps(length, size))
    a, b = jnp.take(block, low - first, axis=1), jnp.take(block, high - first, axis=1)
    return _resize_axis(a + (b - a) * fraction.reshape(1, -1, 1, 1), 2, width)


def _resize_axis(x: jax.Array, axis: int, size: Dim) -> jax.Array:
    """Linear interpolation along `axis` to `size`: two gathers and a lerp."""
    low, high, fraction = _linear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = -1
    a, b = jnp.take(x, low, axis=axis), jnp.take(x, high, axis=axis)
    return a + (b - a) * fraction.reshape(shape)


def _resize_axis_dense(x: jax.Array, axis: int, size: Dim) -> jax.Array:
    """Linear interpolation along `axis` to `size`: one contraction with the `[size,
    length]` interpolation matrix, as `jax.image.resize` computes it."""
    length = x.shape[axis]
    low, high, fraction = _linear_taps(length, size)
    source = jnp.arange(length)
    matrix = ((1 - fraction)[:, None] * (source == low[:, None])
              + fraction[:, None] * (source == high[:, None])).astype(x.dtype)
    y = jnp.tensordot(matrix, jnp.moveaxis(x, axis, 0), axes=1,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, 0, axis)


def resize_bilinear(x: jax.Array, height: Dim, width: Dim, *, dense: bool = False
                    ) -> jax.Array:
    """`[B, H, W, C]` -> `[B, height, width, C]`, bilinear with half-pixel centres and
    no antialiasing (PyTorch's `interpolate(mode='bilinear', align_corners=False)`,
    OpenCV's `INTER_LINEAR`). Sizes may be symbolic.

    `dense=False` gathers the two neighbours: O(output) memory and work, for images (the
    multi-scale TTA of whole scenes). `dense=True` contracts with interpolation matrices
    (O(height x H) each), for the models' feature maps: their gradient is another
    contraction where the gathers' would be a scatter (2x slower on XLA:CPU), and the
    values are `jax.image.resize`'s bit for bit at the models' sizes (measured).
    """
    resize_axis = _resize_axis_dense if dense else _resize_axis
    return resize_axis(resize_axis(x, 1, height), 2, width)


def gaussian_weights(tile: tuple[int, int],
                     sigma_scale: float = GAUSSIAN_SIGMA_SCALE) -> np.ndarray:
    """nnU-Net's tile weights: float32 `[th, tw, 1]`, a Gaussian centred on the tile with
    sigma `sigma_scale` x the tile per axis, 1 at the peak, positive everywhere (the
    corners of a tile are about 1e-7), so every pixel a tile covers gets weight.

    Centred at the tile's true centre `(t - 1) / 2` (nnU-Net: pixel `t // 2`), so the
    weights are symmetric and a mirrored tile is weighted like the tile.
    """
    axes = [np.exp(-0.5 * ((np.arange(t) - (t - 1) / 2) / (t * sigma_scale)) ** 2)
            for t in tile]
    weights = np.outer(*axes)
    return (weights / weights.max()).astype(np.float32)[..., None]


def tile_grid(length: Dim, tile: int, step: int) -> Grid:
    """Tile corners along an axis of `length >= tile`: every `step` pixels, the last tile
    flush with the end."""
    return ceil_div(length - tile, step) + 1, step, length - tile


def corner(index: Any, grid: Grid) -> Any:
    """The start of tile `index` along an axis (traced or host ints)."""
    _, step, last = grid
    return jnp.minimum(index * step, last) if isinstance(index, jax.Array) \
        else min(index * step, last)


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image go (sizes may be symbolic).

    pad: `(top, bottom, left, right)`: the mirror padding of the input.
    rows, cols: the tile corners in the padded input; an input tile at `(y, x)` gives
      the canvas its output tile at `(y, x)`.
    canvas: `(h, w)` of the stitched logits.
    crop: `(top, left)` of the image in the canvas.
    """

    pad: tuple[Dim, Dim, Dim, Dim]
    rows: Grid
    cols: Grid
    canvas: tuple[Dim, Dim]
    crop: tuple[Dim, Dim]


def sliding_layout(height: Dim, width: Dim, tile: tuple[int, int], step: tuple[int, int]
                   ) -> TileLayout:
    """Tiles every `step` pixels, the last flush with the end; an image smaller than a
    tile is mirror-padded up to it (centred) and cropped back."""
    (th, tw), (sh, sw) = tile, step
    pad_h, pad_w = dim_max(height, th) - height, dim_max(width, tw) - width
    top, left = pad_h // 2, pad_w // 2
    ph, pw = height + pad_h, width + pad_w
    return TileLayout((top, pad_h - top, left, pad_w - left), tile_grid(ph, th, sh),
                      tile_grid(pw, tw, sw), (ph, pw), (top, left))


def overlap_tile_layout(height: Dim, width: Dim, tile: tuple[int, int],
                        out_tile: tuple[int, int], step: tuple[int, int]) -> TileLayout:
    """The U-Net paper's overlap-tile: output tiles on the stride grid until they cover
    the image (the last ones may reach into the mirrored border, cropped away), each
    input tile its output tile plus the margin the valid convolutions eat."""
    (th, tw), (oh, ow), (sh, sw) = tile, out_tile, step
    rows = ceil_div(dim_max(height - oh, 0), sh) + 1
    cols = ceil_div(dim_max(width - ow, 0), sw) + 1
    covered_h, covered_w = (rows - 1) * sh + oh, (cols - 1) * sw + ow
    margin_h, margin_w = (th - oh) // 2, (tw - ow) // 2
    pad = (margin_h, margin_h + covered_h - height, margin_w, margin_w + covered_w - width)
    return TileLayout(pad, (rows, sh, (rows - 1) * sh), (cols, sw, (cols - 1) * sw),
                      (covered_h, covered_w), (0, 0))


def over_tiles(
    padded: jax.Array,
    predict: Callable[[jax.Array], jax.Array],
    rows: Grid,
    cols: Grid,
    tile: tuple[int, int],
    tile_batch: int,
    update: Callable[[Any, Dim, Dim, jax.Array, jax.Array], Any],
    init: Any,
    passes: tuple[Any, Any] | None = None,
    origin: Any = 0,
) -> Any:
    """Folds `update(carry, y, x, logits, valid)` over every tile of `padded` `[B, H, W, C]`.

    Each pass cuts the tiles at `tile_batch` grid positions from every image (`[tile_batch
    * B, th, tw, C]`) and predicts them in one call of `predict`; `logits` are one
    position's `[B, oh, ow, K]`, its corner `(y, x)`. The last pass repeats the last tile
    where the count runs out, with `valid` False (a traced bool).

    A band of the image (`flaxseg.streaming`): `passes=(first, count)` runs only those
    passes (the same tiles in the same passes as over the whole image, so every tile's
    logits are the same bits), `padded` holds the padded rows from `origin` on, and the
    corners are relative to it.
    """
    batch, channels = padded.shape[0], padded.shape[3]
    count = rows[0] * cols[0]

    def one_pass(index, carry):
        tiles = index * tile_batch + jnp.arange(tile_batch)
        valid = tiles < count
        tiles = jnp.minimum(tiles, count - 1)
        ys = corner(tiles // cols[0], rows) - origin
        xs = corner(tiles % cols[0], cols)
        cut = jnp.concatenate([
            jax.lax.dynamic_slice(padded, (0, ys[j], xs[j], 0), (batch, *tile, channels))
            for j in range(tile_batch)])
        logits = predict(cut)
        for j in range(tile_batch):
            carry = update(carry, ys[j], xs[j], logits[j * batch : (j + 1) * batch], valid[j])
        return carry

    total = ceil_div(count, tile_batch)
    if passes is None:
        return jax.lax.fori_loop(0, total, one_pass, init)
    first, num = passes
    return jax.lax.fori_loop(first, jnp.minimum(first + num, total), one_pass, init)


def add_weighted(carry: tuple[jax.Array, jax.Array], y: Dim, x: Dim, logits: jax.Array,
                 valid: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`over_tiles` update: adds `weights * logits` to the sum `[B, H, W, K]` and the
    weights to their sum `[H, W, 1]` at the tile's place."""
    total, norm = carry
    weights = weights * valid
    size = logits.shape[1:3]
    here = crop(total, y, x, *size)
    total = jax.lax.dynamic_update_slice(total, here + weights * logits, (0, y, x, 0))
    here = jax.lax.dynamic_slice(norm, (y, x, 0), (*size, 1))
    return total, jax.lax.dynamic_update_slice(norm, here + weights, (y, x, 0))


def empty_canvas(weighted: bool, batch: Dim, height: Dim, width: Dim, num_classes: int,
                 xp: Any = jnp) -> tuple[Any, ...]:
    """The zero carry of a canvas `[batch, height, width, K]`: `(sums, summed weights
    [height, width, 1])` for `add_weighted` (`weighted`), `(canvas,)` for `place`."""
    total = xp.zeros((batch, height, width, num_classes), xp.float32)
    return (total, xp.zeros((height, width, 1), xp.float32)) if weighted else (total,)


def place(canvas: jax.Array, y: Dim, x: Dim, logits: jax.Array, valid: jax.Array
          ) -> jax.Array:
    """`over_tiles` update: writes the tile's logits into the canvas `[B, H, W, K]` (a
    repeated tile writes what is already there, so `valid` is not needed)."""
    del valid
    return jax.lax.dynamic_update_slice(canvas, logits, (0, y, x, 0))
