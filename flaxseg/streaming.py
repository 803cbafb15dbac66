"""Tiled inference of an image of any size in bands, with bounded host memory.

The tiled modes ('sliding', 'gaussian', 'overlap_tile') predict tiles in passes of
`tile_batch` tiles, in row-major order, and stitch their logits on a canvas
(`flaxseg.tiling.over_tiles`). Streamed, the canvas never exists whole: the passes are
split into bands of about one row of tiles; a band's program (`band`, jitted in-process
by `flaxseg.inference`, or lowered into an artifact by `flaxseg.export`) takes the padded
input rows its tiles read and a window of canvas rows, carried from the band before,
adds its tiles, and returns the window and its labels. The rows above the next band's
first tile are then final: their labels are written, the rest of the window is carried.

Every tile is predicted in the same pass, beside the same tiles, as over the whole image,
and every canvas pixel adds the same tile logits in the same order, so the labels are
bitwise those of the in-memory path. Host memory holds one band of the input (read with
`reflect_indices` from an array that may be memory-mapped), one window of float32 sums
(a few tile heights x the image width x K) and the output labels.

Multi-scale TTA: every scale streams the image resized to it (`ResizedImage`, block by
block) through a band program that returns logits; `stream_scales` resizes each scale's
finished rows back, a chunk of rows at a time, and averages them (`RowBuffer` keeps the
rows a later chunk reads). The resizes and the mean are the in-memory ones, operation for
operation, so these labels are bitwise the in-memory ones too.

NumPy and jax only (no flax): `flaxseg.exported` streams an artifact's band program too.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import tiling

#: A band program: (input rows [1, h_in, w_in, C], carry, first_pass, num_passes, origin,
#: shift, rows_count, rows_last) -> (labels uint8 [1, h_out, w_out], carry).
BandProgram = Callable[..., tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Bands:
    """How one image streams through a tiled mode (host integers).

    layout: the mode's tile layout for the image (`flaxseg.tiling`).
    tile, out_tile: input and output tile `(h, w)` (equal except 'overlap_tile').
    tile_batch: tiles per forward pass.
    passes_per_band: forward passes per band program call.
    window_rows: the tile rows a band's window spans at most.
    """

    layout: tiling.TileLayout
    tile: tuple[int, int]
    out_tile: tuple[int, int]
    tile_batch: int
    passes_per_band: int
    window_rows: int

    @property
    def num_tiles(self) -> int:
        return self.layout.rows[0] * self.layout.cols[0]

    @property
    def num_passes(self) -> int:
        return -(-self.num_tiles // self.tile_batch)

    @property
    def num_bands(self) -> int:
        return -(-self.num_passes // self.passes_per_band)

    @property
    def window_in(self) -> int:
        """Input rows a band reads: its window of tile rows."""
        return self.tile[0] + (self.window_rows - 1) * self.layout.rows[1]

    @property
    def window_out(self) -> int:
        """Canvas rows a band's window holds."""
        return self.out_tile[0] + (self.window_rows - 1) * self.layout.rows[1]

    def origin(self, band: int) -> int:
        """The canvas (and padded input) row where `band`'s window starts: the corner of
        its first tile's row; the canvas height after the last band."""
        if band >= self.num_bands:
            return self.layout.canvas[0]
        first_tile = band * self.passes_per_band * self.tile_batch
        return tiling.corner(first_tile // self.layout.cols[0], self.layout.rows)


def make_bands(layout: tiling.TileLayout, tile: tuple[int, int], out_tile: tuple[int, int],
               tile_batch: int) -> Bands:
    """Bands of about one row of tiles: `cols // tile_batch` passes (at least one), so a
    band's tiles span at most `ceil(passes * tile_batch / cols) + 1` rows of tiles."""
    cols = layout.cols[0]
    passes = max(1, cols // tile_batch)
    window_rows = min(math.ceil(passes * tile_batch / cols) + 1, layout.rows[0])
    return Bands(layout, tuple(tile), tuple(out_tile), tile_batch, passes, window_rows)


class Progress:
    """Prints `tiles done/total, tiles/s, ETA` to `stream` for predictions that take
    longer than `after` seconds, at most every `every` seconds, and a last line."""

    def __init__(self, what: str, stream: TextIO | None = None, after: float = 2.0,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.what, self.stream, self.after, self.every = what, stream, after, every
        self.clock = clock
        self.start = clock()
        self.last_shown: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        elapsed = now - self.start
        finished = done == total
        if elapsed < self.after or not (finished or self.last_shown is None
                                        or now - self.last_shown >= self.every):
            return
        self.last_shown = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {format_duration((total - done) / rate)}" if rate and not finished \
            else f", {format_duration(elapsed)}"
        print(f"  {self.what}: tiles {done}/{total} ({100 * done // total}%), "
              f"{rate:.1f} tiles/s{eta}", file=self.stream or sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """`3725.2` -> `'1:02:05'`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_band(image: Any, bands: Bands, origin: int,
              prepare: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The padded input rows `[origin, origin + window_in)` of a `[H, W, C]` image (any
    array that slices, e.g. a memory map), mirrored as `tiling.mirror_pad` pads, through
    `prepare` (the normalisation): `[1, window_in, padded W, C]`. Rows past the padded
    image are mirrored further; no tile reads them."""
    height, width = image.shape[:2]
    top, bottom, left, right = bands.layout.pad
    rows = tiling.reflect_indices(bands.window_in, top - origin, height, np)
    cols = tiling.reflect_indices(left + width + right, left, width, np)
    first, last = int(rows.min()), int(rows.max()) + 1
    block = np.asarray(image[first:last])  # one contiguous read, then the mirror gather
    return prepare(block[rows - first][:, cols])[None]


def finished_rows(run_band: BandProgram, bands: Bands, image: Any, carry: Any,
                  prepare: Callable[[np.ndarray], np.ndarray],
                  on_progress: Callable[[int, int], None] | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """Runs `run_band` over every band of `image` `[H, W, C]` and yields `(top, rows)`
    after each band: the image rows from `top` that are now final, as the band program
    outputs them (labels `[n, W]`, or logits `[n, W, K]`), in order and each once.
    `carry`: the band program's zero carry (`tiling.empty_canvas` of a window)."""
    layout = bands.layout
    height, width = image.shape[:2]
    crop_top, crop_left = layout.crop
    rows_count, _, rows_last = layout.rows
    origin = 0
    for band in range(bands.num_bands):
        start, end = bands.origin(band), bands.origin(band + 1)
        first_pass = band * bands.passes_per_band
        output, carry = run_band(read_band(image, bands, start, prepare), carry, first_pass,
                                 bands.passes_per_band, start, start - origin, rows_count,
                                 rows_last)
        origin = start
        if on_progress is not None:
            done = min((first_pass + bands.passes_per_band) * bands.tile_batch,
                       bands.num_tiles)
            on_progress(done, bands.num_tiles)
        # Canvas rows [start, end) are final: no later tile reaches above `end`.
        top, bottom = max(start - crop_top, 0), min(end - crop_top, height)
        if bottom > top:
            window = np.asarray(output)[0]  # the whole window: slicing on device compiles
            # A copy of the final rows, so that a consumer that keeps them (`RowBuffer`)
            # does not keep the whole window alive.
            yield top, window[top + crop_top - start : bottom + crop_top - start,
                              crop_left : crop_left + width].copy()


def stream(run_band: BandProgram, bands: Bands, image: Any, carry: Any,
           out: np.ndarray, prepare: Callable[[np.ndarray], np.ndarray],
           on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Runs `run_band` (labels out) over every band of `image` `[H, W, C]` and writes the
    finished rows of labels into `out` uint8 `[H, W]` (any array that takes row slices,
    e.g. a memory map). `carry`: the band program's zero carry (`tiling.empty_canvas` of
    a window). Returns `out`."""
    for top, labels in finished_rows(run_band, bands, image, carry, prepare, on_progress):
        out[top : top + len(labels)] = labels
    return out


class CombinedProgress:
    """One `(done, total)` progress over several streams of `totals` tiles (the scales of
    a multi-scale TTA): `of(i)` is stream i's callback (None when `on_progress` is)."""

    def __init__(self, totals: list[int], on_progress: Callable[[int, int], None] | None):
        self.totals, self.on_progress = totals, on_progress
        self.done = [0] * len(totals)

    def of(self, index: int) -> Callable[[int, int], None] | None:
        if self.on_progress is None:
            return None

        def report(done: int, _: int) -> None:
            self.done[index] = done
            self.on_progress(sum(self.done), sum(self.totals))

        return report


class RowBuffer:
    """The rows of an in-order stream of `(top, rows)` (`finished_rows`), kept from the
    first row still wanted: `take(start, stop)` pulls the stream up to `stop` and returns
    rows `[start, stop)`; later calls may not ask for rows below `start`."""

    def __init__(self, rows: Iterator[tuple[int, np.ndarray]]):
        self._source = rows
        self._top = 0
        self._rows: np.ndarray | None = None

    @property
    def top(self) -> int:
        """The first row held."""
        return self._top

    def take(self, start: int, stop: int) -> np.ndarray:
        if self._rows is not None and start > self._top:  # rows no later call reads
            self._rows, self._top = self._rows[start - self._top:], start
        while self._rows is None or self._top + len(self._rows) < stop:
            top, rows = next(self._source)
            if self._rows is None:
                self._rows, self._top = rows, top
            else:  # the stream's rows are contiguous
                self._rows = np.concatenate([self._rows, rows])
        return self._rows[start - self._top : stop - self._top]


class ResizedImage:
    """`image` `[H, W, C]` normalised by `prepare` and resized (bilinear, half-pixel) to
    `[height, width, C]` float32, computed block by block as rows are sliced
    (`tiling.resize_rows`: bitwise `tiling.resize_bilinear` of the whole image): the
    input of one scale of the streamed multi-scale TTA."""

    def __init__(self, image: Any, height: int, width: int,
                 prepare: Callable[[np.ndarray], np.ndarray]):
        self.image, self.prepare = image, prepare
        self.shape = (height, width, image.shape[2])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        height, width = self.shape[:2]
        first, last = tiling.source_rows(self.image.shape[0], height, start, stop - start)
        block = self.prepare(np.asarray(self.image[first:last]))[None]
        return np.asarray(_resize_rows(block, first, self.image.shape[0], start,
                                       stop - start, height, width))[0]


_resize_rows = jax.jit(tiling.resize_rows, static_argnums=(2, 4, 5, 6))


@jax.jit
def _mean_labels(*logits: jax.Array) -> jax.Array:
    """The scales' logits summed in order, divided by their count, and the argmax: as
    `flaxseg.inference` averages multi-scale TTA over the whole image."""
    total = logits[0]
    for more in logits[1:]:
        total = total + more
    return jnp.argmax(total / len(logits), axis=-1).astype(jnp.uint8)


def stream_tta(run_band: BandProgram, bands_for: Callable[[int, int], Bands], image: Any,
               scales: Sequence[Fraction], zero_carry: Callable[[Bands], Any],
               prepare: Callable[[np.ndarray], np.ndarray], out: np.ndarray, chunk: int,
               on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Multi-scale TTA of `image` `[H, W, C]`, streamed, into `out` uint8 `[H, W]`.

    Every scale streams the image resized to it (`tiling.scaled_size`; the image itself at
    scale 1) through `run_band`, a band program that returns the window's logits, with
    the bands `bands_for(height, width)` and the carry `zero_carry(bands)`; the inputs
    go through `prepare` before the resize, as in memory. `stream_scales` averages them,
    `chunk` rows at a time. `on_progress`: tiles done and in all, over every scale."""
    height, width = image.shape[:2]
    sizes = [(tiling.scaled_size(height, s), tiling.scaled_size(width, s)) for s in scales]
    layouts = [bands_for(*size) for size in sizes]
    progress = CombinedProgress([bands.num_tiles for bands in layouts], on_progress)
    sources = []
    for index, (scale, size, bands) in enumerate(zip(scales, sizes, layouts, strict=True)):
        source, source_prepare = ((image, prepare) if scale == 1 else
                                  (ResizedImage(image, *size, prepare), _as_is))
        rows = RowBuffer(finished_rows(run_band, bands, source, zero_carry(bands),
                                       source_prepare, progress.of(index)))
        sources.append((rows, None if scale == 1 else size[0]))
    return stream_scales(sources, out, chunk)


def _as_is(rows: np.ndarray) -> np.ndarray:
    return rows


def stream_scales(scales: Sequence[tuple[RowBuffer, int | None]], out: np.ndarray,
                  chunk: int) -> np.ndarray:
    """Multi-scale TTA's labels, `chunk` rows at a time, into `out` uint8 `[H, W]`.

    `scales`, in the plan's order: each scale's logits rows `[n, w, K]` as a `RowBuffer`,
    and its height (None: the image's own, taken as they are), resized back to `H x W`
    one block of rows at a time. Host memory holds the buffered rows of each scale and
    one chunk of logits per scale."""
    height, width = out.shape
    for start in range(0, height, chunk):
        count = min(chunk, height - start)
        logits = []
        for rows, scaled_height in scales:
            if scaled_height is None:
                logits.append(rows.take(start, start + count)[None])
                continue
            first, last = tiling.source_rows(scaled_height, height, start, count)
            logits.append(_resize_rows(rows.take(first, last)[None], first, scaled_height,
                                       start, count, height, width))
        out[start : start + count] = np.asarray(_mean_labels(*logits))[0]
    return out
