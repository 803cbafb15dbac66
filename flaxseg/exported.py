"""Running an artifact of `flaxseg.export`: needs jax, NumPy and Pillow, not flax.

    artifact = exported.load("model.jax")       # checks it against its sidecar
    labels = artifact(images)                    # uint8 [B, H, W, C] -> int32 [B, H, W]

    python -m flaxseg.predict --exported=model.jax --input=photos/ --output=out/

`load` reads the serialised `jax.export.Exported` and the JSON sidecar beside it
(`model.jax.json`, optional), and, for the tiled modes, the band program
(`model.jax.bands`), and turns a truncated or corrupt file into one clear error; calling
the artifact checks the images' dtype, rank, channels and size rule before JAX sees
them. `Artifact.segment` streams an image of any size through the band program
(`flaxseg.streaming`: bounded memory, progress), as in-process inference does. An
artifact exported with `--mode=auto` holds a one-pass procedure and its tiled twin as the
band program; `fit_to_images` picks the tiles when one pass over the largest input would
not fit the memory budget (`--memory_budget_gb`). Only
NumPy, Pillow and jax are imported here (and flaxseg's own `image_files`, `visualize`,
`streaming` and `tiling`, which need no more; tifffile for TIFF files), so this runs
where flaxseg's training stack is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import numpy as np

from flaxseg import streaming, tiling, visualize
from flaxseg.image_files import (
    Inputs,
    PredictionResult,
    channel_mismatch,
    list_images,
    load_image,
    output_stems,
    readable_sizes,
    write_prediction,
)
from flaxseg.normalization import Normalization
from flaxseg.train import memory

SIDECAR_SUFFIX = ".json"  # as flaxseg.export writes them
BANDS_SUFFIX = ".bands"


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A deserialised artifact and its sidecar (`{}` when there is none); `bands`: its
    band program, for the tiled modes (`flaxseg.export.export_bands`)."""

    exported: jax.export.Exported
    info: dict[str, Any]
    path: str = "the artifact"
    bands: jax.export.Exported | None = None

    @property
    def channels(self) -> int:
        return int(self.exported.in_avals[0].shape[3])

    def __call__(self, images: np.ndarray) -> Any:
        """uint8 `[B, H, W, C]` -> the artifact's outputs as NumPy (int32 labels
        `[B, H, W]` and/or float32 probabilities `[B, H, W, K]`)."""
        images = self.check(images)
        out = self.exported.call(images)
        return tuple(np.asarray(o) for o in out) if isinstance(out, tuple | list) \
            else np.asarray(out)

    def check(self, images: np.ndarray, size_rule: bool = True) -> np.ndarray:
        """`images` as the artifact takes them (its size rule too, with `size_rule`);
        ValueError saying what does not fit."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"{self.path} takes uint8 images (0..255, unnormalised: the "
                             f"normalisation is inside); got dtype {images.dtype}")
        if images.ndim != 4:
            raise ValueError(f"{self.path} takes an image batch [B, H, W, C]; got shape "
                             f"{images.shape} (add a batch axis: images[None])")
        if images.shape[3] != self.channels:
            raise ValueError(f"{self.path} takes images with {self.channels} channel(s); "
                             f"got {images.shape[3]} (shape {images.shape})")
        rule = self.info.get("input", {}).get("size_rule")
        if size_rule and rule and not _fits(rule, *images.shape[1:3]):
            raise ValueError(f"{self.path} cannot take {images.shape[1]}x{images.shape[2]} "
                             f"images: it takes {self.info['input']['size_rule_text']}")
        return images

    @property
    def streams(self) -> bool:
        """Whether the artifact's own procedure is the band program's (a tiled mode); not
        when its band program is the tiled fallback of a one-pass procedure."""
        return self.bands is not None and not self.info["bands"].get("fallback", False)

    @property
    def has_fallback(self) -> bool:
        """Whether the band program is the tiled twin of the artifact's one-pass procedure
        (`flaxseg.export.tiled_fallback`)."""
        return self.bands is not None and not self.streams

    def one_pass_bytes(self, height: int, width: int) -> int | None:
        """Bytes of one call of the artifact on one `height x width` image, from the
        compiled program's memory analysis (nothing runs); None where the backend gives
        none."""
        image = jax.ShapeDtypeStruct((1, height, width, self.channels), np.uint8)
        return memory.compiled_bytes(jax.jit(self.exported.call).lower(image).compile())

    def segment(self, image: Any, on_progress: Callable[[int, int], None] | None = None,
                tiled: bool | None = None) -> np.ndarray:
        """Labels `[h, w]` of one uint8 image `[H, W, C]` (any array that slices by rows,
        e.g. a memory map): streamed in bands through the band program (bounded memory,
        `on_progress(tiles done, tiles)`; every scale of a multi-scale TTA) when `tiled`
        (default: `streams`), else one call of the artifact."""
        tiled = self.streams if tiled is None else tiled
        if tiled and self.bands is None:
            raise ValueError(f"{self.path} has no band program to tile with; export it with "
                             "a tiled --mode, or with --mode=auto")
        if not tiled:
            out = self(np.asarray(image)[None])  # checked there
            out = out[0] if isinstance(out, tuple) else out
            return out[0] if out.ndim == 3 else np.argmax(out[0], axis=-1)
        self.check(image[None], size_rule=False)  # tiles take any size
        return self._stream(image, on_progress)

    def _stream(self, image: Any, on_progress: Callable[[int, int], None] | None
                ) -> np.ndarray:
        """`segment` through the band program: one scale, or every scale of the
        procedure's multi-scale TTA (`streaming.stream_tta`)."""
        entry = self.info["bands"]
        # An artifact exported before the entry named its procedure streams its own.
        procedure = entry.get("procedure", self.info["procedure"])
        tile, step = tuple(procedure["tile"]), tuple(procedure["step"])
        out_tile = tuple(procedure["out_tile"] or tile)
        mode, num_classes = procedure["mode"], self.info["num_classes"]

        def bands_for(height: int, width: int) -> streaming.Bands:
            layout = (tiling.overlap_tile_layout(height, width, tile, out_tile, step)
                      if mode == "overlap_tile" else
                      tiling.sliding_layout(height, width, tile, step))
            return streaming.make_bands(layout, tile, out_tile, procedure["tile_batch"])

        def zero_carry(bands: streaming.Bands) -> Any:
            return tiling.empty_canvas(mode != "overlap_tile", 1, bands.window_out,
                                       bands.layout.canvas[1], num_classes, np)

        def run(rows: np.ndarray, carry: Any, *scalars: int) -> tuple[Any, Any]:
            return self.bands.call(rows, carry, *(np.int32(s) for s in scalars))

        out = np.empty(image.shape[:2], np.uint8)
        scales = [Fraction(*pair) for pair in entry.get("scale_fractions", [[1, 1]])]
        if scales == [1]:  # the band program normalises its uint8 rows itself
            bands = bands_for(*image.shape[:2])
            return streaming.stream(run, bands, image, zero_carry(bands), out,
                                    lambda rows: rows, on_progress)
        normalization = self.info["normalization"]
        return streaming.stream_tta(
            run, bands_for, image, scales, zero_carry,
            Normalization(normalization["mean"], normalization["std"]), out, tile[0],
            on_progress)


def _fits(rule: dict[str, Any], height: int, width: int) -> bool:
    if not rule["symbolic"]:
        return (height, width) == (rule["height"], rule["width"])
    mh, mw = rule["multiple"]
    return height % mh == 0 and width % mw == 0 and min(height, width) >= 1


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _deserialize(path: str, expected: dict[str, Any]) -> jax.export.Exported:
    """The program in `path`, checked against the size and SHA-256 in `expected`."""
    data = _read(path)
    if len(data) != expected.get("bytes", len(data)):
        raise ValueError(f"{path} is truncated or overwritten: {len(data)} bytes, its "
                         f"sidecar says {expected['bytes']}; export it again")
    if hashlib.sha256(data).hexdigest() != expected.get("sha256", hashlib.sha256(data)
                                                        .hexdigest()):
        raise ValueError(f"{path} is corrupt: its SHA-256 differs from its sidecar's; "
                         "export it again")
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as error:  # the flatbuffer reader's IndexError, struct.error, ...
        raise ValueError(f"{path} is not a readable jax.export artifact (truncated or "
                         f"corrupt?): {type(error).__name__}: {error}") from None


def load(path: str | os.PathLike) -> Artifact:
    """The artifact at `path` with its sidecar `<path>.json` when present, and its band
    program `<path>.bands` when the sidecar names one. Raises ValueError for a file that
    is truncated or corrupt (its size and SHA-256 against the sidecar's, then the
    deserialiser's verdict), FileNotFoundError when one is missing."""
    path = os.fspath(path)
    info: dict[str, Any] = {}
    if os.path.exists(path + SIDECAR_SUFFIX):
        with open(path + SIDECAR_SUFFIX) as f:
            info = json.load(f)
    exported = _deserialize(path, info)
    bands = info.get("bands") and _deserialize(path + BANDS_SUFFIX, info["bands"])
    return Artifact(exported, info, path, bands or None)


def fit_to_images(artifact: Artifact, sizes: list[tuple[int, int]], budget_gb: float = 0.0
                  ) -> bool:
    """Whether to segment images of `sizes` ((height, width)) in the artifact's tiled
    fallback: when one call over the largest would need more than the memory budget
    (`budget_gb` if > 0, else the device's; a CPU's: half of the host's). Prints why.
    False for an artifact without a fallback, or images it cannot take whole."""
    if not artifact.has_fallback or not sizes:
        return False
    height, width = max(sizes, key=lambda size: size[0] * size[1])
    rule = artifact.info.get("input", {}).get("size_rule")
    if rule and not _fits(rule, height, width):
        return False  # segment_files names each file it cannot take
    budget, where = memory.memory_budget(
        budget_gb, what="predict --exported", fix="set --memory_budget_gb",
        host_fallback=True)
    used = artifact.one_pass_bytes(height, width)
    if used is None:
        return False
    tiles = artifact.info["bands"]["procedure"]
    print(memory.one_pass_verdict(
        "predict --exported", artifact.info["procedure"]["mode"], (height, width), used,
        budget, where, f"the artifact's {tiles['mode']} tiles of "
                       f"{tiles['tile'][0]}x{tiles['tile'][1]}, streamed"), flush=True)
    return used > budget


def segment_files(artifact: Artifact, inputs: Inputs, output_dir: str | os.PathLike,
                  alpha: float = 0.5, tiled: bool | None = None) -> list[PredictionResult]:
    """Segments image files one at a time (streamed in bands when `tiled`, default the
    artifact's own procedure: `Artifact.segment`) and writes masks/ and overlays/ as
    `flaxseg.inference.predict` does; a file that cannot be segmented gets a result
    naming the file and the problem, the others are still written."""
    files = list_images(inputs)
    palette = artifact.info.get("palette")
    results = []
    for path, stem in zip(files, output_stems(files), strict=True):
        try:
            image = load_image(path)
            mismatch = channel_mismatch(image, artifact.channels)
            if mismatch:
                raise ValueError(mismatch)
            mask = artifact.segment(image, streaming.Progress(os.path.basename(path)), tiled)
        except (OSError, ValueError) as error:
            results.append(PredictionResult(path, error=f"{path}: {error}"))
            continue
        colours = visualize.palette_or_generated(
            palette, artifact.info.get("num_classes", 256))[0]
        results.append(PredictionResult(
            path, *write_prediction(output_dir, stem, image, mask, colours, alpha)))
    return results


def main(argv: list[str]) -> int:
    """`python -m flaxseg.predict --exported=... --input=... --output=...`."""
    parser = argparse.ArgumentParser(
        prog="python -m flaxseg.predict --exported=MODEL",
        description="Segment image files with an artifact of python -m flaxseg.export.")
    parser.add_argument("--exported", required=True, help="The artifact (e.g. model.jax).")
    parser.add_argument("--input", required=True, help="An image file or a directory.")
    parser.add_argument("--output", required=True, help="Directory for masks/, overlays/.")
    parser.add_argument("--alpha", type=float, default=0.5, help="Overlay opacity.")
    parser.add_argument(
        "--memory_budget_gb", type=float, default=0.0,
        help="An artifact exported with --mode=auto segments the images in its tiles when "
             "one pass over the largest would need more (default: the device's memory; a "
             "CPU's: half of the host's).")
    args = parser.parse_args(argv)
    artifact = load(args.exported)
    if args.memory_budget_gb and not artifact.has_fallback:
        raise ValueError(f"--memory_budget_gb chooses between one pass and the tiles of an "
                         f"artifact exported with --mode=auto; {args.exported} has "
                         + ("only tiles" if artifact.streams else "no tiles")
                         + ". Drop the flag.")
    tiled = artifact.streams or fit_to_images(artifact, readable_sizes(args.input),
                                              args.memory_budget_gb)
    results = segment_files(artifact, args.input, args.output, alpha=args.alpha, tiled=tiled)
    failed = [r for r in results if not r.ok]
    mode = artifact.info.get("procedure", {}).get("mode")
    how = "streamed in tiles" if tiled else f"one {mode} pass each" if mode else "one call each"
    print(f"Segmented {len(results) - len(failed)} of {len(results)} images with "
          f"{args.exported} ({how}) into {args.output}")
    for result in failed:
        print(f"  failed: {result.error}", file=sys.stderr)
    return 1 if failed else 0
