"""Segmenting whole images of any size with a trained model.

`predict_logits` turns float images `[B, H, W, C]` into float32 logits
`[B, H, W, num_classes]` with one of four strategies:

- `'whole'`: one forward pass per image. The VALID U-Net returns the centre of its
  input (`[B, h, w, K]` with `h, w` from `flaxseg.models.unet_output_size`).
- `'pad'`: mirror-pad to a multiple of `multiple` (the net's total stride, e.g.
  `2**depth` for a U-Net), one pass, crop back: any size works with a SAME net.
- `'sliding'`: tiles of `tile_size` every `stride` pixels, in batches; where tiles
  overlap their logits are averaged. For images too large for one pass.
- `'overlap_tile'`: the U-Net paper's strategy for the VALID U-Net. The image is
  mirror-padded by the margin `(tile_size - out) / 2` that the valid convolutions
  eat, every input tile predicts an `out`-sized output tile, and the output tiles
  are stitched edge to edge. Tiles step by a multiple of the net's pooling stride
  `2**depth`, so every tile sees the pooling grid a single pass over the whole
  padded image would see: the stitched map equals that pass (no seams), and images
  of any size are segmented with a fixed tile size.

`flip=True` averages the logits of the image and of its horizontal mirror image
(mirrored back), in every mode.

`predict` runs a model over image files and writes class-index PNG masks and
colourised overlays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from flaxseg import visualize
from flaxseg.models import logits_of
from flaxseg.normalization import Normalization

MODES = ("whole", "pad", "sliding", "overlap_tile")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

Size = int | tuple[int, int]


def _pair(value: Size, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return logits_of(model.apply(variables, images, train=False)).astype(jnp.float32)


def _output_shape(
    model: nn.Module, variables: Any, height: int, width: int, channels: int
) -> tuple[int, int, int]:
    spec = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
    try:
        out = jax.eval_shape(functools.partial(_apply, model), variables, spec)
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


def _forward(
    model: nn.Module, variables: Any, images: np.ndarray, batch_size: int, flip: bool,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray:
    """Logits of `images` `[N, h, w, C]` in batches of `batch_size` (the last batch is
    padded, so one compiled shape serves all); with `flip`, averaged with the
    mirrored-back logits of the mirrored images. The batches are placed with `sharding`
    when given (e.g. split along H over several devices)."""
    place = jnp.asarray if sharding is None else (lambda x: jax.device_put(x, sharding))
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        count = len(batch)
        if count < batch_size:
            filler = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, filler])
        logits = _apply(model, variables, place(batch))
        if flip:
            mirrored = _apply(model, variables, place(np.ascontiguousarray(batch[:, :, ::-1])))
            logits = 0.5 * (logits + mirrored[:, :, ::-1])
        outputs.append(np.asarray(logits[:count]))
    return np.concatenate(outputs)


def _tiles(
    model: nn.Module,
    variables: Any,
    padded: np.ndarray,
    corners: list[tuple[int, int]],
    tile: tuple[int, int],
    batch_size: int,
    flip: bool,
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """`(image index, y, x, logits)` of every tile `padded[i, y:y+th, x:x+tw]`, cut
    and predicted `batch_size` at a time, so host memory holds one batch of tiles."""
    (th, tw), jobs = tile, [(i, y, x) for i in range(len(padded)) for y, x in corners]
    size = min(batch_size, len(jobs))
    for start in range(0, len(jobs), size):
        chunk = jobs[start : start + size]
        cut = np.stack([padded[i, y : y + th, x : x + tw] for i, y, x in chunk])
        for (i, y, x), logits in zip(
            chunk, _forward(model, variables, cut, size, flip), strict=True
        ):
            yield i, y, x, logits


def _mirror_pad(images: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    # Mirror without repeating the edge pixel ('reflect'), as in the U-Net paper's Fig. 2;
    # a 1-pixel axis has nothing to mirror, so it is repeated instead.
    mode = "reflect" if min(images.shape[1:3]) > 1 else "edge"
    return np.pad(images, ((0, 0), (top, bottom), (left, right), (0, 0)), mode=mode)


def _space_devices(sharding: jax.sharding.Sharding | None) -> int:
    """How many devices `sharding` splits an image's H over (1 without one)."""
    if sharding is None:
        return 1
    probe = math.lcm(*range(1, 17))  # divisible by any split of up to 16 devices
    return probe // sharding.shard_shape((1, probe, 1, 1))[1]


def _predict_pad(model, variables, images, multiple, batch_size, flip, sharding=None):
    _, height, width, channels = images.shape
    mh, mw = _pair(multiple, "multiple")
    mh = math.lcm(mh, _space_devices(sharding))  # every device gets whole rows
    pad_h, pad_w = -height % mh, -width % mw
    top, left = pad_h // 2, pad_w // 2
    padded = _mirror_pad(images, top, pad_h - top, left, pad_w - left)
    if output_size(model, variables, *padded.shape[1:]) != padded.shape[1:3]:
        raise ValueError(
            "mode='pad' needs a net whose output has its input's size; for the VALID "
            "U-Net use mode='overlap_tile'"
        )
    logits = _forward(model, variables, padded, min(batch_size, len(padded)), flip, sharding)
    return logits[:, top : top + height, left : left + width]


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every `stride` pixels, the last tile flush with the end."""
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _predict_sliding(model, variables, images, tile_size, stride, batch_size, flip):
    count, height, width, channels = images.shape
    th, tw = _pair(tile_size, "tile_size")
    sh, sw = _pair(stride if stride is not None else (max(th // 2, 1), max(tw // 2, 1)), "stride")
    if sh > th or sw > tw:
        raise ValueError(
            f"stride {(sh, sw)} must not exceed tile_size {(th, tw)}: pixels would be skipped"
        )
    oh, ow, num_classes = _output_shape(model, variables, th, tw, channels)
    if (oh, ow) != (th, tw):
        raise ValueError(
            "mode='sliding' needs a net whose output has its input's size; for the VALID "
            "U-Net use mode='overlap_tile'"
        )
    # An image smaller than a tile is mirror-padded up to it (and cropped back).
    pad_h, pad_w = max(th - height, 0), max(tw - width, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = _mirror_pad(images, top, pad_h - top, left, pad_w - left)
    ph, pw = padded.shape[1:3]
    corners = [(y, x) for y in _tile_starts(ph, th, sh) for x in _tile_starts(pw, tw, sw)]
    total = np.zeros((count, ph, pw, num_classes), np.float32)
    for i, y, x, logits in _tiles(model, variables, padded, corners, (th, tw), batch_size, flip):
        total[i, y : y + th, x : x + tw] += logits
    hits = np.zeros((ph, pw, 1), np.float32)
    for y, x in corners:
        hits[y : y + th, x : x + tw] += 1.0
    return (total / hits)[:, top : top + height, left : left + width]


def _predict_overlap_tile(model, variables, images, tile_size, align, batch_size, flip):
    count, height, width, channels = images.shape
    th, tw = _pair(tile_size, "tile_size")
    oh, ow, num_classes = _output_shape(model, variables, th, tw, channels)
    if (th - oh) % 2 or (tw - ow) % 2:
        raise ValueError(
            f"mode='overlap_tile' needs an output centred in its input; tile {th}x{tw} gives "
            f"{oh}x{ow}"
        )
    margin_h, margin_w = (th - oh) // 2, (tw - ow) // 2
    # Output tiles step by the largest multiple of the pooling stride that fits in them,
    # so each tile sees the pooling grid of a single pass over the padded image.
    ah, aw = _pair(align, "align")
    step_h, step_w = oh - oh % ah, ow - ow % aw
    if step_h == 0 or step_w == 0:
        raise ValueError(
            f"tile {th}x{tw} gives an output of {oh}x{ow}, smaller than the pooling stride "
            f"{ah}x{aw}; use a larger tile_size"
        )
    # Tiles on the stride grid until the output covers the image; the last ones may
    # reach into the mirrored border, and are cropped away.
    rows = [i * step_h for i in range(math.ceil(max(height - oh, 0) / step_h) + 1)]
    cols = [i * step_w for i in range(math.ceil(max(width - ow, 0) / step_w) + 1)]
    covered_h, covered_w = rows[-1] + oh, cols[-1] + ow
    padded = _mirror_pad(
        images,
        margin_h,
        margin_h + covered_h - height,
        margin_w,
        margin_w + covered_w - width,
    )
    corners = [(y, x) for y in rows for x in cols]
    canvas = np.zeros((count, covered_h, covered_w, num_classes), np.float32)
    for i, y, x, logits in _tiles(model, variables, padded, corners, (th, tw), batch_size, flip):
        canvas[i, y : y + oh, x : x + ow] = logits
    return canvas[:, :height, :width]


def _model_stride(model: nn.Module) -> int:
    """The net's total downsampling factor: 2**depth for a U-Net or encoder-decoder."""
    depth = getattr(model, "depth", None)
    if isinstance(depth, int):
        return 2**depth
    raise ValueError(
        f"cannot tell the total stride of {type(model).__name__}; pass multiple= (mode 'pad') "
        "or align= (mode 'overlap_tile') explicitly"
    )


def default_mode(model: nn.Module) -> str:
    """The mode that segments any image size in full: `'overlap_tile'` for the VALID
    U-Net, `'pad'` for nets with a `depth` (U-Net, encoder-decoder), else `'whole'`."""
    if getattr(model, "padding", None) == "VALID":
        return "overlap_tile"
    return "pad" if isinstance(getattr(model, "depth", None), int) else "whole"


def normalizer(
    mean: Sequence[float] | np.ndarray = (0.0,), std: Sequence[float] | np.ndarray = (1.0,)
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 `[H, W, C]` -> float32 `(image / 255 - mean) / std`, per channel (`mean` and
    `std` in [0, 1] units, 1 or C values): the training data's normalisation."""
    return Normalization(tuple(np.ravel(mean)), tuple(np.ravel(std)))


def predict_logits(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    *,
    mode: str = "whole",
    flip: bool = False,
    multiple: Size | None = None,
    tile_size: Size | None = None,
    stride: Size | None = None,
    align: Size | None = None,
    batch_size: int = 4,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray:
    """Logits for a batch of images: float `[B, H, W, C]` (or one `[H, W, C]`) ->
    float32 NumPy `[B, H, W, K]` (no batch axis for a single image).

    Args:
      model, variables: a flaxseg model and its variables (`params`, `batch_stats`).
      images: preprocessed like the training data (float32, e.g. in [0, 1]).
      mode: `'whole'`, `'pad'`, `'sliding'` or `'overlap_tile'` (see the module
        docstring). `'whole'` on the VALID U-Net gives the centre `[B, h, w, K]`.
      flip: also predict the horizontally mirrored images and average.
      multiple: `'pad'` pads H and W up to a multiple of this; default `2**model.depth`.
      tile_size: input tile `(h, w)` for `'sliding'` and `'overlap_tile'` (required);
        for the VALID U-Net it must be a valid input size.
      stride: `'sliding'` tile step; default half a tile (50% overlap).
      align: `'overlap_tile'` pooling stride the tile steps must be multiples of;
        default `2**model.depth`.
      batch_size: tiles (or images) per forward pass.
      sharding: modes 'whole' and 'pad': how to place each batch `[b, H, W, C]`, e.g.
        `NamedSharding(mesh, P(None, 'space'))` to split a large image's rows over the
        devices of a mesh and predict it in one pass (`variables` replicated on the same
        devices). 'pad' pads H to a multiple of the devices too.
    """
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
    images = images.astype(np.float32)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if mode in ("pad", "sliding") and getattr(model, "padding", None) == "VALID":
        raise ValueError(
            f"mode={mode!r} needs a net whose output has its input's size; for the VALID "
            "U-Net use mode='overlap_tile'"
        )
    if sharding is not None and mode not in ("whole", "pad"):
        raise ValueError(f"sharding splits whole images over devices (modes 'whole' and "
                         f"'pad'); mode {mode!r} predicts tiles")
    if mode == "whole":
        output_size(model, variables, *images.shape[1:])  # a clear error for a bad size
        logits = _forward(model, variables, images, min(batch_size, len(images)), flip,
                          sharding)
    elif mode == "pad":
        multiple = _model_stride(model) if multiple is None else multiple
        logits = _predict_pad(model, variables, images, multiple, batch_size, flip, sharding)
    elif mode in ("sliding", "overlap_tile"):
        if tile_size is None:
            raise ValueError(f"mode={mode!r} needs tile_size=(height, width)")
        if mode == "sliding":
            logits = _predict_sliding(model, variables, images, tile_size, stride, batch_size, flip)
        else:
            align = _model_stride(model) if align is None else align
            logits = _predict_overlap_tile(
                model, variables, images, tile_size, align, batch_size, flip
            )
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    return logits[0] if single else logits


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """What `predict` did with one input file: the PNGs it wrote, or why it failed."""

    input_path: str
    mask_path: str | None = None
    overlay_path: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The image files named by `inputs`: one file, a directory (its files with an
    image extension, sorted, not recursive) or a list of files."""
    if isinstance(inputs, str | os.PathLike):
        path = os.fspath(inputs)
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            files = [os.path.join(path, n) for n in names]
            if not files:
                raise ValueError(
                    f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in directory {path!r}"
                )
            return files
        if not os.path.exists(path):
            raise ValueError(f"input {path!r} is neither an image file nor a directory")
        return [path]
    files = [os.fspath(p) for p in inputs]
    if not files:
        raise ValueError("inputs is an empty list; give image files or a directory")
    return files


def load_image(path: str) -> np.ndarray:
    """An image file as uint8 `[H, W, C]`: C = 1 for greyscale, 3 for RGB, 4 with alpha.
    Palette images become RGB; 16-bit greyscale is rejected (no silent rescaling)."""
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode == "1":
            image = image.convert("L")
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(
                f"image mode {image.mode!r} is not supported; save it as 8-bit grey or RGB"
            )
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def predict(
    model: nn.Module,
    variables: Any,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
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
    uint8) and `<output_dir>/overlays/<name>.png` (colours over the image).

    Args:
      inputs: an image file, a directory of images, or a list of files.
      mode, predict_kwargs: passed to `predict_logits` (`flip`, `tile_size`, ...).
        With the VALID U-Net in mode `'whole'` the mask covers the image's centre.
      palette: uint8 `[num_classes, 3]`; default `visualize.default_palette`.
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
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(
            f"several inputs share the names {duplicates}, so their outputs would collide; "
            "predict them into separate output directories"
        )
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count; got {shard}")
    files, stems = files[index::count], stems[index::count]
    preprocess = preprocess or normalizer()
    masks_dir = os.path.join(os.fspath(output_dir), "masks")
    overlays_dir = os.path.join(os.fspath(output_dir), "overlays")
    results = []
    for path, stem in zip(files, stems, strict=True):
        try:
            image = load_image(path)
            if num_channels is not None and image.shape[-1] != num_channels:
                raise ValueError(
                    f"it has {image.shape[-1]} channel(s) but the model takes {num_channels}; "
                    f"convert it (e.g. PIL's .convert('{'L' if num_channels == 1 else 'RGB'}'))"
                )
            logits = predict_logits(
                model, variables, preprocess(image), mode=mode, **predict_kwargs
            )
        except (OSError, ValueError) as error:  # unreadable file, or an input the model rejects
            results.append(PredictionResult(path, error=f"{path}: {error}"))
            continue
        num_classes = logits.shape[-1]
        if num_classes > 256:
            raise ValueError(f"{num_classes} classes do not fit a uint8 PNG mask")
        mask = np.argmax(logits, axis=-1).astype(np.uint8)
        colours = visualize.default_palette(num_classes) if palette is None else palette
        height, width = mask.shape
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        shown = image[top : top + height, left : left + width]
        if shown.shape[-1] in (2, 4):  # drop alpha for display
            shown = shown[..., :-1]
        mask_path = os.path.join(masks_dir, f"{stem}.png")
        overlay_path = os.path.join(overlays_dir, f"{stem}.png")
        visualize.save_png(mask_path, mask)
        visualize.save_png(overlay_path, visualize.overlay(shown, mask, colours, alpha=alpha))
        results.append(PredictionResult(path, mask_path, overlay_path))
    return results
