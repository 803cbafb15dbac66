"""Image files in, mask and overlay PNGs (or tiled TIFFs) out: the file side of prediction.

NumPy, Pillow and (for TIFF files, imported when one is read or written) tifffile only
(no JAX, no Flax), so both `flaxseg.inference.predict` (a model
in this process) and `flaxseg.exported` (an exported artifact, where flaxseg's training
stack may not be installed) read and write files the same way.

`open_upright` is the one place an image or mask file is opened for its pixels: it applies
the EXIF orientation tag (phones and cameras save the sensor's rows and a tag saying how to
turn them; annotation tools label the photo as displayed, so a mask drawn on it is only in
register with the turned image). Datasets (`flaxseg.data.folder`) read through it too.

Large images: a TIFF or BigTIFF is read with tifffile, memory-mapped where the file allows
(uncompressed, contiguous: satellite scenes and slides often are), so rows are read as
the streamed bands ask for them; any channel count (e.g. 4-band RGB + near-infrared).
Masks and overlays past Pillow's size limit (`Image.MAX_IMAGE_PIXELS`, about 89
megapixels: Pillow refuses to open a PNG twice that size) are written as tiled,
zlib-compressed TIFFs, `<name>.tif`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from flaxseg import visualize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")
#: Rows per block when an overlay is drawn (bounds its float32 temporaries).
OVERLAY_ROWS = 256
#: The tile of a written TIFF (multiples of 16, as the TIFF standard asks).
TIFF_TILE = (256, 256)

Inputs = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """What prediction did with one input file: the PNGs it wrote, or why it failed."""

    input_path: str
    mask_path: str | None = None
    overlay_path: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def list_images(inputs: Inputs) -> list[str]:
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


def output_stems(files: Sequence[str]) -> list[str]:
    """The output name of each file (its name without extension); ValueError when two
    files would write the same outputs."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(
            f"several inputs share the names {duplicates}, so their outputs would collide; "
            "predict them into separate output directories"
        )
    return stems


# EXIF orientations that swap width and height (a quarter turn, possibly mirrored).
_QUARTER_TURNS = (5, 6, 7, 8)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 (as stored) when it has none.

    Reads headers only: a PNG's eXIf chunk is in `info` at open when it precedes the
    pixels (where writers put it), and asking PNG for more would decode the whole file.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in range(1, 9) else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as displayed, i.e. after its EXIF orientation."""
    width, height = image.size
    return (height, width) if orientation(image) in _QUARTER_TURNS else (width, height)


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as displayed, from its headers (nothing decoded);
    OSError / ValueError for a file that is not a readable image."""
    if path.lower().endswith(TIFF_EXTENSIONS):
        with _tifffile().TiffFile(path) as tif:
            series = tif.series[0]
            shape = dict(zip(series.axes, series.shape, strict=True))
        return shape["Y"], shape["X"]
    with Image.open(path) as image:
        width, height = upright_size(image)
    return height, width


def readable_sizes(inputs: Inputs) -> list[tuple[int, int]]:
    """(height, width) of each readable file of `inputs` (`list_images`), from its headers;
    a file that cannot be read is skipped (segmenting it reports it by name)."""
    sizes = []
    for path in list_images(inputs):
        try:
            sizes.append(image_size(path))
        except (OSError, ValueError, KeyError):
            continue
    return sizes


def is_rotated(path: str) -> bool:
    """Whether the file carries an EXIF orientation other than 'as stored' (headers only)."""
    with Image.open(path) as image:
        return orientation(image) != 1


@contextlib.contextmanager
def open_upright(path: str) -> Iterator[Image.Image]:
    """The image file opened and turned as its EXIF orientation says (decodes it)."""
    with Image.open(path) as image:
        if orientation(image) != 1:
            ImageOps.exif_transpose(image, in_place=True)
        yield image


def load_image(path: str) -> np.ndarray:
    """An image file as uint8 `[H, W, C]`, upright (EXIF orientation applied): C = 1 for
    greyscale, 3 for RGB, 4 with alpha. Palette images become RGB; 16-bit greyscale is
    rejected (no silent rescaling). A TIFF is read with tifffile, memory-mapped where
    the file allows (`load_tiff`)."""
    if path.lower().endswith(TIFF_EXTENSIONS):
        return load_tiff(path)
    try:
        with open_upright(path) as image:
            return _pixels(image)
    except Image.DecompressionBombError:
        raise ValueError(f"it has more pixels than Pillow opens ({Image.MAX_IMAGE_PIXELS}); "
                         "save it as a TIFF, which flaxseg reads memory-mapped") from None


def _pixels(image: Image.Image) -> np.ndarray:
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


def _tifffile() -> Any:
    # A declared dependency, imported only for TIFF files: an artifact's runtime that
    # reads PNGs needs jax, NumPy and Pillow alone.
    try:
        import tifffile
    except ImportError:
        raise ImportError("TIFF images need tifffile: pip install tifffile") from None
    return tifffile


def load_tiff(path: str) -> np.ndarray:
    """A TIFF / BigTIFF's first image as uint8 `[H, W, C]` (any C: greyscale, RGB,
    multi-band), a read-only memory map where the file is uncompressed and contiguous
    (nothing is read until rows are sliced), else decoded. ValueError for other dtypes
    (no silent rescaling) and layouts."""
    tifffile = _tifffile()
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, dtype = series.axes, series.dtype
    if dtype != np.uint8:
        raise ValueError(f"it is a {dtype} TIFF; flaxseg takes 8-bit images (no silent "
                         "rescaling): convert it to uint8 as your training data was")
    try:
        array = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or tiled: not memory-mappable, decoded whole
        array = tifffile.imread(path)
    if axes == "YX":
        return array[..., None]
    if axes in ("YXS", "YXC"):
        return array
    if axes in ("SYX", "CYX"):
        return np.moveaxis(array, 0, -1)
    raise ValueError(f"its axes are {axes!r}; flaxseg reads 2-D images (YX, YXS or SYX): "
                     "save one image per file")


def channel_mismatch(image: np.ndarray, num_channels: int) -> str | None:
    """Why a uint8 `[H, W, C]` image does not fit a model of `num_channels`, or None."""
    if image.shape[-1] == num_channels:
        return None
    return (f"it has {image.shape[-1]} channel(s) but the model takes {num_channels}; "
            f"convert it (e.g. PIL's .convert('{'L' if num_channels == 1 else 'RGB'}'))")


def is_large(height: int, width: int) -> bool:
    """Past Pillow's size limit: written as tiled TIFF rather than PNG."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and height * width > limit


def save_tiff(path: str, data: np.ndarray | Iterator[np.ndarray],
              shape: tuple[int, ...] | None = None) -> None:
    """Writes uint8 `[H, W]` or `[H, W, 3]` as a tiled, zlib-compressed (Big)TIFF: an
    array, or an iterator of its `TIFF_TILE` tiles in row-major order (edge tiles may be
    cut short) with their `shape`, so the image need not exist whole."""
    tifffile = _tifffile()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shape = np.shape(data) if shape is None else shape
    tifffile.imwrite(path, data, shape=shape, dtype=np.uint8, tile=TIFF_TILE,
                     compression="zlib", bigtiff=True,
                     photometric="rgb" if len(shape) == 3 else "minisblack")


def overlay_blocks(image: np.ndarray, mask: np.ndarray, palette: np.ndarray,
                   alpha: float = 0.5, rows: int = OVERLAY_ROWS) -> Iterator[np.ndarray]:
    """`visualize.overlay` of a uint8 `[H, W, C]` image (any C: the first three channels
    are shown, or the first for C < 3) and a centred mask `[h, w]`, as uint8 blocks
    `[rows, w, 3]` from the top: no float32 copy of the whole image."""
    height, width = mask.shape
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    channels = 3 if image.shape[-1] >= 3 else 1
    for row in range(0, height, rows):
        shown = np.asarray(image[top + row : top + min(row + rows, height),
                                 left : left + width, :channels])
        yield visualize.overlay(shown, mask[row : row + rows], palette, alpha=alpha)


def _tiles(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """`TIFF_TILE` tiles, row-major, of blocks of `TIFF_TILE[0]` rows."""
    for block in blocks:
        for left in range(0, block.shape[1], TIFF_TILE[1]):
            yield block[:, left : left + TIFF_TILE[1]]


def write_prediction(output_dir: str | os.PathLike, stem: str, image: np.ndarray,
                     mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5
                     ) -> tuple[str, str]:
    """Writes `<output_dir>/masks/<stem>.png` (the uint8 class indices `mask` `[h, w]`)
    and `<output_dir>/overlays/<stem>.png` (the colours over `image` uint8 `[H, W, C]`,
    centre-cropped to the mask); tiled `.tif` for a mask past `is_large`, the overlay
    drawn tile row by tile row. Returns the two paths."""
    if mask.dtype != np.uint8:
        if mask.size and mask.max() > 255:
            raise ValueError(f"class {mask.max()} does not fit a uint8 PNG mask")
        mask = mask.astype(np.uint8)
    large = is_large(*mask.shape)
    suffix = ".tif" if large else ".png"
    mask_path = os.path.join(os.fspath(output_dir), "masks", f"{stem}{suffix}")
    overlay_path = os.path.join(os.fspath(output_dir), "overlays", f"{stem}{suffix}")
    if large:
        save_tiff(mask_path, mask)
        blocks = overlay_blocks(image, mask, palette, alpha, rows=TIFF_TILE[0])
        save_tiff(overlay_path, _tiles(blocks), (*mask.shape, 3))
    else:
        visualize.save_png(mask_path, mask)
        overlay = np.concatenate(list(overlay_blocks(image, mask, palette, alpha)))
        visualize.save_png(overlay_path, overlay)
    return mask_path, overlay_path
