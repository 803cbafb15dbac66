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

NumPy and jax only (no flax): `flaxseg.exported` streams an artifact's band program too.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

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


def stream(run_band: BandProgram, bands: Bands, image: Any, carry: Any,
           out: np.ndarray, prepare: Callable[[np.ndarray], np.ndarray],
           on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Runs `run_band` over every band of `image` `[H, W, C]` and writes the finished
    rows of labels into `out` uint8 `[H, W]` (any array that takes row slices, e.g. a
    memory map). `carry`: the band program's zero carry (`tiling.empty_canvas` of a window).
    Returns `out`."""
    layout = bands.layout
    height, width = image.shape[:2]
    crop_top, crop_left = layout.crop
    rows_count, _, rows_last = layout.rows
    origin = 0
    for band in range(bands.num_bands):
        start, end = bands.origin(band), bands.origin(band + 1)
        first_pass = band * bands.passes_per_band
        labels, carry = run_band(read_band(image, bands, start, prepare), carry, first_pass,
                                 bands.passes_per_band, start, start - origin, rows_count,
                                 rows_last)
        origin = start
        # Canvas rows [start, end) are final: no later tile reaches above `end`.
        top, bottom = max(start - crop_top, 0), min(end - crop_top, height)
        if bottom > top:
            window = np.asarray(labels)[0]  # the whole window: slicing on device compiles
            out[top:bottom] = window[top + crop_top - start : bottom + crop_top - start,
                                     crop_left : crop_left + width]
        if on_progress is not None:
            done = min((first_pass + bands.passes_per_band) * bands.tile_batch,
                       bands.num_tiles)
            on_progress(done, bands.num_tiles)
    return out
