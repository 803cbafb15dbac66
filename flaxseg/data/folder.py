"""Folder datasets in any layout of `flaxseg.data.layouts`, decoded on read.

`resolve_folder_config(config)` is the config a run trains with: the dataset's base
folder as an absolute path, the detected layout, and every class key filled from the
config, else the dataset's metadata file (`dataset.json`, nnU-Net's own), else the
layout (datasets with fixed classes); the channel count from the layout or the first
image. Resolving a resolved config changes nothing, and it is what runs save.

Masks are 8-bit class-index images (L, or P whose palette indices are the classes),
16-bit index images, RGB colour-coded with `palette`, or SBD's `cls/*.mat`
(`GTcls.Segmentation`, read with scipy). Raw values go through `reduce_zero_label` or
`value_map` (e.g. ISBI's {0: 0, 255: 1}); `void_values` become `ignore_index`.
A file that cannot be decoded raises `DataFileError` naming it. Images and masks are read
upright: their EXIF orientation is applied (`flaxseg.image_files.open_upright`).
"""

from __future__ import annotations

import collections
import os

import ml_collections
import numpy as np
from PIL import Image

from flaxseg.data import layouts
from flaxseg.data.base import (
    LabelMapper,
    SourceInfo,
    default_class_names,
    suggest_classes,
    suggestion_flags,
    void_proposal,
)
from flaxseg.data.config import dataset_config
from flaxseg.data.layouts import SPLITS, Listing, Pair, listing
from flaxseg.extras import require
from flaxseg.image_files import open_upright, upright_size

# PIL mode -> channels of the uint8 array flaxseg makes of it (P is expanded to RGB).
_IMAGE_MODES = {"1": 1, "L": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4}
# What PIL raises for a truncated or corrupt file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)
_SAMPLED_MASKS = 8


class DataFileError(ValueError):
    """A dataset file that cannot be decoded (truncated, corrupt); the message names it."""


def _decode_error(path: str, kind: str, error: Exception) -> DataFileError:
    return DataFileError(
        f"{path}: cannot decode this {kind} file ({type(error).__name__}: {error}); replace "
        "or remove it")


def image_channels(mode: str) -> int | None:
    """Channels flaxseg makes of a PIL image mode, or None if unsupported (16-bit, float)."""
    return _IMAGE_MODES.get(mode)


def load_image(path: str) -> np.ndarray:
    """Reads an 8-bit image as uint8 `[H, W, C]`, upright (palette images become RGB)."""
    try:
        with open_upright(path) as img:
            if img.mode not in _IMAGE_MODES:
                raise ValueError(
                    f"{path}: image mode {img.mode!r} is not 8-bit; convert it to 8-bit L or RGB."
                )
            if img.mode in ("P", "1"):
                img = img.convert("RGB" if img.mode == "P" else "L")
            array = np.asarray(img)
    except _DECODE_ERRORS as e:
        raise _decode_error(path, "image", e) from None
    return array[..., None] if array.ndim == 2 else array


def load_pair_image(pair: Pair) -> np.ndarray:
    """A pair's image, uint8 `[H, W, C]`: the channels of its files stacked in order."""
    arrays = [load_image(path) for path in pair.images]
    if len({a.shape[:2] for a in arrays}) > 1:
        raise ValueError(f"the channel files of {pair.stem} differ in size: "
                         f"{listing(list(pair.images))}")
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)


def load_mask(path: str) -> np.ndarray:
    """Reads a mask's raw values, upright: `[H, W]` for index masks, `[H, W, 3]` for RGB."""
    if path.endswith(".mat"):
        return _load_sbd_mask(path)
    try:
        with open_upright(path) as img:
            if img.mode in ("RGBA", "RGB"):
                return np.asarray(img.convert("RGB"))
            if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(img).astype(np.int32 if img.mode.startswith("I") else np.uint8)
    except _DECODE_ERRORS as e:
        raise _decode_error(path, "mask", e) from None
    raise ValueError(
        f"{path}: mask mode {img.mode!r} is not supported; save masks as 8-bit class-index "
        "PNGs (mode L or P) or RGB with a palette."
    )


def _load_sbd_mask(path: str) -> np.ndarray:
    """SBD's `cls/<id>.mat`: the class-index map `GTcls.Segmentation`, uint8 `[H, W]`."""
    sio = require("scipy.io", f"{path}: reading SBD's .mat masks", ValueError)
    loadmat, MatReadError = sio.loadmat, sio.matlab.MatReadError
    try:
        segmentation = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (KeyError, AttributeError):
        raise DataFileError(f"{path} holds no GTcls.Segmentation: it is not an SBD cls/*.mat "
                            "file") from None
    except (MatReadError, OSError, ValueError, TypeError) as e:
        raise _decode_error(path, "mask", e) from None
    return np.asarray(segmentation).astype(np.uint8)


class MaskDecoder:
    """Raw mask (index `[H, W]` or RGB `[H, W, 3]`) -> class indices `[H, W]`."""

    def __init__(self, num_classes: int, ignore_index: int, palette, value_map, void_values,
                 reduce_zero_label: bool = False):
        self.palette = palette
        # Void entries that are RGB triples apply to colour masks, integers to index masks.
        void_ints = [v for v in void_values if np.ndim(v) == 0]
        void_colours = [tuple(v) for v in void_values if np.ndim(v) == 1]
        self.index_mapper = LabelMapper(num_classes, ignore_index, value_map, void_ints,
                                        reduce_zero_label)
        colours = list(palette or []) + void_colours
        classes = list(range(len(palette or []))) + [ignore_index] * len(void_colours)
        codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
        order = np.argsort(codes)
        self._codes, self._classes = codes[order], np.array(classes, np.int32)[order]
        self.ignore_index = ignore_index

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> MaskDecoder:
        """The decoder of a resolved folder config."""
        return cls(config.num_classes, config.ignore_index, config.palette, config.value_map,
                   config.void_values or (), config.reduce_zero_label)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """Raises ValueError listing unknown values or colours (callers add the file name)."""
        if raw.ndim == 2:
            return self.index_mapper(raw)
        if not self.palette:
            raise ValueError(
                "mask is RGB but no palette is configured; give dataset.palette (one RGB "
                "triple per class) or save masks as 8-bit class-index PNGs"
            )
        raw = raw.astype(np.int64)
        codes = (raw[..., 0] << 16) | (raw[..., 1] << 8) | raw[..., 2]
        pos = np.clip(np.searchsorted(self._codes, codes), 0, len(self._codes) - 1)
        known = self._codes[pos] == codes
        if not known.all():
            bad = np.unique(codes[~known])[:10]
            colours = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in bad.tolist()]
            raise ValueError(f"mask colours {colours} are not in the palette")
        dtype = np.uint8 if max(len(self.palette) - 1, self.ignore_index) < 256 else np.int32
        return self._classes[pos].astype(dtype)


# -- a folder config as a run reads it --------------------------------------------------------


def resolve_folder_config(config: ml_collections.ConfigDict, *, require_classes: bool = True
                          ) -> ml_collections.ConfigDict:
    """The folder config a run trains with (see the module docstring).

    Raises ValueError for a missing folder, a folder in no layout flaxseg reads, and (with
    `require_classes`) for a dataset with no class information, naming the mask values a
    sample of masks holds and the keys to set.
    """
    root = os.path.abspath(os.path.expanduser(config.path)) if config.path else ""
    if not root or not os.path.isdir(root):
        hint = " (or set FLAXSEG_ISBI_DIR)" if config.name == "isbi2012" else ""
        raise ValueError(
            f"Dataset folder {config.path!r} does not exist; set dataset.path to the "
            f"dataset's root folder{hint}.")
    layout, base = layouts.find(root, config)
    values = config.to_dict()
    # The layout's defaults, overridden by the dataset's metadata, fill what the config
    # leaves unset.
    for key, value in {**layout.defaults(base, config), **layout.metadata(base)}.items():
        if values.get(key) in (None, ""):
            values[key] = value
    if values["num_classes"] is None:
        known = values["class_names"] or values["palette"]
        values["num_classes"] = len(known) if known else None
    if values["reduce_zero_label"] is None:
        values["reduce_zero_label"] = False
    values.update(path=base, layout=layout.name)
    resolved = dataset_config(values.pop("name"), **values)
    if resolved.num_channels is None:
        resolved.num_channels = _first_image_channels(resolved, layout)
    if require_classes and resolved.num_classes is None:
        raise ValueError(_no_classes_message(resolved, layout))
    return resolved


def _first_pairs(config: ml_collections.ConfigDict, layout: layouts.Layout) -> list[Pair]:
    """The pairs of the first split that has any (train, usually)."""
    for split in layout.splits(config.path, config):
        pairs = layout.list_split(config.path, config, split).pairs
        if pairs:
            return pairs
    return []


def _first_image_channels(config: ml_collections.ConfigDict, layout: layouts.Layout
                          ) -> int | None:
    """The channels of the first image that can be read (None: none can)."""
    for pair in _first_pairs(config, layout):
        try:
            channels = []
            for path in pair.images:
                with Image.open(path) as img:
                    channels.append(image_channels(img.mode) or 0)
            return sum(channels)
        except _DECODE_ERRORS:
            continue  # reported, naming the file, when the examples are read
    return None


def _no_classes_message(config: ml_collections.ConfigDict, layout: layouts.Layout) -> str:
    values: collections.Counter = collections.Counter()
    masks_with: collections.Counter = collections.Counter()  # masks holding each value
    colours: collections.Counter = collections.Counter()
    pairs = _first_pairs(config, layout)[:_SAMPLED_MASKS]
    for pair in pairs:
        raw = load_mask(pair.mask)
        if raw.ndim == 3:
            found, counts = np.unique(raw.reshape(-1, 3), axis=0, return_counts=True)
            colours.update({tuple(f): c for f, c in zip(found.tolist(), counts.tolist(),
                                                        strict=True)})
        else:
            found, counts = np.unique(raw, return_counts=True)
            values.update(dict(zip(found.tolist(), counts.tolist(), strict=True)))
            masks_with.update(found.tolist())
    where = f"{config.path} ({layout.name} layout)"
    metadata = os.path.join(config.path, layouts.METADATA_FILE)
    text = (f"No class information for {where}: the config sets no num_classes, class_names "
            f"or palette, and there is no {metadata}. ")
    if values:
        found = ", ".join(f"{v} ({c:,} px)" for v, c in sorted(values.items())[:20])
        suggestion = suggest_classes(values, int(config.ignore_index))
        text += (f"{len(pairs)} sampled masks hold the values {found}; e.g. "
                 f"{suggestion_flags(suggestion, 'train')}, and ")
        proposal = void_proposal(values, masks_with, len(pairs), int(config.ignore_index))
        if proposal:
            text += (f"(values that look like void rather than a class: {proposal[0]}; if "
                     f"{proposal[1]['void_values'][0]} is void: "
                     f"{suggestion_flags(proposal[1], 'train')}), and ")
    elif colours:
        found = ", ".join(str(c) for c, _ in colours.most_common(20))
        text += (f"{len(pairs)} sampled masks are RGB with the colours {found}; set "
                 "dataset.palette (one RGB triple per class, in class order), and ")
    return (text + f"class_names, or write them to {metadata} "
            f"({{\"num_classes\": ..., \"class_names\": [...]}}). `python -m flaxseg.data "
            f"check {config.path}` scans every mask.")


def list_split(config: ml_collections.ConfigDict, split: str) -> Listing:
    """The pairs of `split` of a resolved folder config, and the problems met listing them.

    Raises ValueError for a split the dataset does not have (VOC has no test split).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; folder datasets have {SPLITS}.")
    layout = layouts.get(config.layout)
    present = layout.splits(config.path, config)
    if split not in present:
        hint = (" (val_fraction / test_fraction carve val and test out of the pool)"
                if isinstance(layout, layouts.Pooled | layouts.NnUNet) else "")
        raise ValueError(f"{config.path} ({layout.name} layout) has no {split!r} split; it "
                         f"has {', '.join(present) or 'none'}{hint}.")
    return layout.list_split(config.path, config, split)


def empty_split_message(config: ml_collections.ConfigDict, split: str, found: Listing) -> str:
    """Why a split has no pairs: what each folder it looked in holds, and the layouts."""
    seen = "; ".join(layouts.describe_folder(p, found.suffixes.get(p, ""))
                     for p in found.looked_in)
    return (f"split {split!r} of {config.path} ({config.layout} layout) is empty: {seen}. "
            f"flaxseg reads these layouts (dataset.layout forces one):\n"
            f"{layouts.layouts_help()}")


# Formats whose compression changes pixel values: a mask in one cannot hold exact classes.
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg", ".webp")


def lossy_cause(mask_path: str) -> str:
    """For a mask whose values or colours are not the dataset's: the likely cause when the
    mask is in a lossy format (a clause to append), else ''."""
    if not mask_path.lower().endswith(LOSSY_MASK_EXTENSIONS):
        return ""
    return (f" (likely cause: {os.path.splitext(mask_path)[1]} is a lossy format, whose "
            "compression changes values at region edges, so it cannot hold exact class "
            "indices or colours; save masks as PNG)")


def size_cause(sizes: list[tuple[int, int]]) -> str:
    """For files whose (W, H) sizes disagree: the likely cause (a clause to append): one a
    quarter turn of another (an EXIF orientation lost or missing), or one a resized copy of
    another (the same aspect ratio); else ''."""
    if any((h, w) in sizes for w, h in sizes if w != h):
        return ("; one is the other turned a quarter: likely a photo saved turned without "
                "its EXIF orientation tag, or a mask drawn on the unturned photo")
    if len({round(w / h, 2) for w, h in sizes}) == 1:
        return ("; they have the same aspect ratio: likely one was resized (masks must be "
                "at the image's full resolution)")
    return ""


def channels_cause(channels: collections.Counter) -> str:
    """For images of one split whose channel counts (`{channels: images}`) disagree: that
    disagreement, the cause of the channel problems, else ''. The config's count is not the
    cause: it may come from the first image."""
    if len(channels) < 2:
        return ""
    counts = ", ".join(f"{n} with {c} channel(s)" for c, n in sorted(channels.items()))
    return (f"the split's images disagree among themselves ({counts}): convert them all to "
            "one mode (e.g. RGB)")


def header_problems(pair: Pair, num_channels: int,
                    tally: collections.Counter | None = None) -> list[str]:
    """Problems visible from the file headers alone: unreadable, size (as displayed, after
    the EXIF orientation), channels (counted in `tally` when given)."""
    sizes, channels, problems = {}, 0, []
    for path in pair.images + (() if pair.mask.endswith(".mat") else (pair.mask,)):
        try:
            with Image.open(path) as img:
                sizes[path] = upright_size(img)
                if path != pair.mask:
                    mode_channels = image_channels(img.mode)
                    if mode_channels is None:
                        problems.append(f"{path}: image mode {img.mode!r} is not 8-bit; "
                                        "convert it to 8-bit")
                    channels += mode_channels or 0
        except _DECODE_ERRORS as e:
            problems.append(f"unreadable file {path}: {e}")
    if problems:
        return problems
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{p} is {w}x{h}" for p, (w, h) in sizes.items())
        problems.append(f"size mismatch (WxH): {shown}{size_cause(list(sizes.values()))}")
    if tally is not None:
        tally[channels] += 1
    if channels != num_channels:
        problems.append(
            f"{pair.image} has {channels} channel(s) but the config says "
            f"num_channels={num_channels}; set dataset.num_channels={channels} or convert it"
        )
    return problems


def _raise_problems(what: str, problems: list[str], root: str) -> None:
    if problems:
        body = "\n  - ".join(problems[: layouts.MAX_LISTED])
        more = len(problems) - layouts.MAX_LISTED
        more_text = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(
            f"{what}:\n  - {body}{more_text}\nFix the files (`python -m flaxseg.data check "
            f"{root}` reports them all) or the dataset config."
        )


class FolderSource:
    """Random-access pairs of a folder dataset's split.

    Creating it resolves the config, lists the files and reads every header, so unpaired
    files, size or channel mismatches and unreadable headers fail here, naming the files.
    Mask values outside the mapping and files that cannot be decoded fail when the
    example is read (and in `check`), naming the file. With `config.cache`, decoded
    examples stay in memory (read-only arrays).
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        config = resolve_folder_config(config)
        found = list_split(config, split)
        problems = list(found.problems)
        if not found.pairs and not problems:
            problems.append(empty_split_message(config, split, found))
        channels: collections.Counter = collections.Counter()
        for pair in found.pairs:
            problems.extend(header_problems(pair, config.num_channels, channels))
        if len(channels) > 1:
            problems.append(f"split {split!r}: {channels_cause(channels)}")
        _raise_problems(f"Problems in the {split!r} split of {config.path}", problems,
                        config.path)
        self.config, self.split, self.pairs = config, split, found.pairs
        self.info = SourceInfo(
            num_classes=config.num_classes,
            class_names=config.class_names or default_class_names(config.num_classes),
            num_channels=config.num_channels,
            ignore_index=config.ignore_index,
            palette=config.palette,
        )
        self.decode_mask = MaskDecoder.from_config(config)
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if config.cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        example = self._load(self.pairs[index])
        if self._cache is not None:
            for array in example.values():
                array.setflags(write=False)  # shared by every later read
            self._cache[index] = example
        return example

    def _load(self, pair: Pair) -> dict[str, np.ndarray]:
        try:
            image, raw = load_pair_image(pair), load_mask(pair.mask)
        except DataFileError as e:
            raise DataFileError(f"{e}. `python -m flaxseg.data check {self.config.path}` "
                                "finds every such file.") from None
        try:
            label = self.decode_mask(raw)
        except ValueError as e:
            raise ValueError(
                f"{pair.mask}: {e}{lossy_cause(pair.mask)}; fix the mask or the dataset's "
                "value_map / palette / void_values / reduce_zero_label") from None
        if image.shape[-1] != self.info.num_channels or image.shape[:2] != label.shape:
            raise ValueError(
                f"{pair.image} ({image.shape}) and {pair.mask} ({label.shape}) do not match "
                f"the config (num_channels={self.info.num_channels}) or each other."
            )
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"FolderSource({len(self)} pairs, split={self.split!r})"
