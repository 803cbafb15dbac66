"""Folders of images and masks on disk, matched by file stem.

Layouts (`images_dir` / `masks_dir` default to 'images' / 'masks'):

    root/images/a.png  root/masks/a.png        one pool, split by a seeded fraction
    root/train/images/ root/train/masks/ ...   explicit train/ val/ test/ subfolders

Masks are 8-bit class-index images (L, or P whose palette indices are the
classes), 16-bit index images, or RGB colour-coded with `palette`. Raw values go
through `value_map` (e.g. ISBI's {0: 0, 255: 1}); `void_values` become
`ignore_index`. Class names, palette, value map and void values come from the
config or, where the config leaves them None, from `root/dataset.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from flaxseg.data.base import LabelMapper, SourceInfo, default_class_names, parse_value_map

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")
METADATA_FILE = "dataset.json"
_METADATA_KEYS = ("num_classes", "class_names", "palette", "value_map", "void_values")
# PIL mode -> channels of the uint8 array flaxseg makes of it (P is expanded to RGB).
_IMAGE_MODES = {"1": 1, "L": 1, "LA": 2, "P": 3, "RGB": 3, "RGBA": 4}
_MAX_LISTED = 20


def listing(paths: Sequence[str]) -> str:
    """The first paths, comma-separated, and how many more there are."""
    shown = ", ".join(paths[:_MAX_LISTED])
    more = f" ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return shown + more


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image file and its mask file, sharing `stem`."""

    stem: str
    image: str
    mask: str


def _files_by_stem(directory: str) -> tuple[dict[str, str], list[str]]:
    """Image files of `directory` by stem, and problems (duplicate stems)."""
    by_stem: dict[str, list[str]] = {}
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        by_stem.setdefault(stem, []).append(os.path.join(directory, name))
    problems = [
        f"several files share the stem {stem!r}: {listing(paths)}; keep one per stem"
        for stem, paths in by_stem.items()
        if len(paths) > 1
    ]
    return {stem: paths[0] for stem, paths in by_stem.items()}, problems


def pair_files(images_dir: str, masks_dir: str) -> tuple[list[Pair], list[str]]:
    """Matches images to masks by stem. Returns the pairs and the problems found."""
    problems = []
    for directory in (images_dir, masks_dir):
        if not os.path.isdir(directory):
            problems.append(f"missing folder {directory}")
    if problems:
        return [], problems
    images, image_problems = _files_by_stem(images_dir)
    masks, mask_problems = _files_by_stem(masks_dir)
    problems = image_problems + mask_problems
    no_mask = sorted(images[s] for s in set(images) - set(masks))
    no_image = sorted(masks[s] for s in set(masks) - set(images))
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) without a mask in {masks_dir}: {listing(no_mask)}"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) without an image in {images_dir}: {listing(no_image)}"
        )
    pairs = [Pair(s, images[s], masks[s]) for s in sorted(set(images) & set(masks))]
    return pairs, problems


def split_layout(root: str, images_dir: str = "images") -> str:
    """'subfolders' if `root` has train/ val/ test/ folders holding images, else 'pooled'."""
    for split in SPLITS:
        if os.path.isdir(os.path.join(root, split, images_dir)):
            return "subfolders"
    return "pooled"


def split_pairs(config: ml_collections.ConfigDict, split: str) -> tuple[list[Pair], list[str]]:
    """The pairs of `split` and the problems found while listing them."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; folder datasets have {SPLITS}.")
    root = config.path
    if split_layout(root, config.images_dir) == "subfolders":
        base = os.path.join(root, split)
        if not os.path.isdir(base):
            present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
            return [], [
                f"no {split}/ folder in {root} (present: {present}); add it, or use "
                "one of the present splits"
            ]
        return pair_files(
            os.path.join(base, config.images_dir), os.path.join(base, config.masks_dir)
        )
    pairs, problems = pair_files(
        os.path.join(root, config.images_dir), os.path.join(root, config.masks_dir)
    )
    if not 0 <= config.val_fraction + config.test_fraction < 1:
        raise ValueError(
            f"val_fraction + test_fraction must be in [0, 1), got {config.val_fraction} + "
            f"{config.test_fraction}."
        )
    order = np.random.default_rng(config.split_seed).permutation(len(pairs))
    num_val = round(len(pairs) * config.val_fraction)
    num_test = round(len(pairs) * config.test_fraction)
    bounds = {
        "val": (0, num_val),
        "test": (num_val, num_val + num_test),
        "train": (num_val + num_test, len(pairs)),
    }
    start, stop = bounds[split]
    return [pairs[i] for i in sorted(order[start:stop])], problems


def read_metadata(root: str) -> dict[str, Any]:
    """`root/dataset.json` (class names, palette, value map, void values), or {}."""
    path = os.path.join(root, METADATA_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Fix the JSON or remove the file.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object with keys from {_METADATA_KEYS}.")
    unknown = sorted(set(meta) - set(_METADATA_KEYS))
    if unknown:
        raise ValueError(f"{path} may only hold the keys {_METADATA_KEYS}; got extra {unknown}.")
    return meta


def resolve_labels(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> dict[str, Any]:
    """Class names, palette, value map, void values: the config's, else dataset.json's."""

    def pick(key):
        value = config.get(key)
        return meta.get(key) if value is None or value == () else value

    class_names, palette = pick("class_names"), pick("palette")
    num_classes = pick("num_classes")
    if num_classes is None:
        num_classes = len(class_names) if class_names else len(palette) if palette else None
    if num_classes is None:
        raise ValueError(
            f"Unknown number of classes for {config.path}: set dataset.num_classes (and "
            f"class_names), or write them to {os.path.join(config.path, METADATA_FILE)}."
        )
    return {
        "num_classes": int(num_classes),
        "class_names": tuple(class_names) if class_names else default_class_names(num_classes),
        "palette": tuple(tuple(int(v) for v in c) for c in palette) if palette else None,
        "value_map": parse_value_map(pick("value_map")),
        "void_values": tuple(pick("void_values") or ()),
    }


def image_channels(mode: str) -> int | None:
    """Channels flaxseg makes of a PIL image mode, or None if unsupported (16-bit, float)."""
    return _IMAGE_MODES.get(mode)


def load_image(path: str) -> np.ndarray:
    """Reads an 8-bit image as uint8 `[H, W, C]` (palette images become RGB)."""
    with Image.open(path) as img:
        if img.mode not in _IMAGE_MODES:
            raise ValueError(
                f"{path}: image mode {img.mode!r} is not 8-bit; convert it to 8-bit L or RGB."
            )
        if img.mode in ("P", "1"):
            img = img.convert("RGB" if img.mode == "P" else "L")
        array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def load_mask(path: str) -> np.ndarray:
    """Reads a mask's raw values: `[H, W]` for index masks, `[H, W, 3]` for RGB masks."""
    with Image.open(path) as img:
        if img.mode in ("RGBA", "RGB"):
            return np.asarray(img.convert("RGB"))
        if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            return np.asarray(img).astype(np.int32 if img.mode.startswith("I") else np.uint8)
        raise ValueError(
            f"{path}: mask mode {img.mode!r} is not supported; save masks as 8-bit class-index "
            "PNGs (mode L or P) or RGB with a palette."
        )


class MaskDecoder:
    """Raw mask (index `[H, W]` or RGB `[H, W, 3]`) -> class indices `[H, W]`."""

    def __init__(self, num_classes: int, ignore_index: int, palette, value_map, void_values):
        self.palette = palette
        # Void entries that are RGB triples apply to colour masks, integers to index masks.
        void_ints = [v for v in void_values if np.ndim(v) == 0]
        void_colours = [tuple(v) for v in void_values if np.ndim(v) == 1]
        self.index_mapper = LabelMapper(num_classes, ignore_index, value_map, void_ints)
        colours = list(palette or []) + void_colours
        classes = list(range(len(palette or []))) + [ignore_index] * len(void_colours)
        codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
        order = np.argsort(codes)
        self._codes, self._classes = codes[order], np.array(classes, np.int32)[order]
        self.ignore_index = ignore_index

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


def header_problems(pair: Pair, num_channels: int) -> list[str]:
    """Problems visible from the file headers alone: unreadable, size, channels."""
    try:
        with Image.open(pair.image) as img:
            image_size, mode = img.size, img.mode
        with Image.open(pair.mask) as msk:
            mask_size = msk.size
    except (OSError, UnidentifiedImageError) as e:
        return [f"unreadable file in pair {pair.image} / {pair.mask}: {e}"]
    problems = []
    if image_size != mask_size:
        problems.append(
            f"size mismatch: {pair.image} is {image_size[0]}x{image_size[1]} (WxH) but "
            f"{pair.mask} is {mask_size[0]}x{mask_size[1]}"
        )
    channels = image_channels(mode)
    if channels is None:
        problems.append(f"{pair.image}: image mode {mode!r} is not 8-bit; convert it to 8-bit")
    elif channels != num_channels:
        problems.append(
            f"{pair.image} has {channels} channel(s) (mode {mode}) but the config says "
            f"num_channels={num_channels}; set dataset.num_channels={channels} or convert it"
        )
    return problems


def _raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        body = "\n  - ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{what}:\n  - {body}{more}\nFix the files (run `python -m flaxseg.data check "
            "PATH` for a full report) or the dataset config."
        )


class FolderSource:
    """Random-access pairs of a folder dataset's split.

    Creating it lists the files and reads every header, so unpaired files, size or
    channel mismatches and unreadable headers fail here, naming the files. Mask
    values outside the mapping fail when the example is read (and in `check`).
    With `config.cache`, decoded examples stay in memory (read-only arrays).
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        root = config.path
        if not root or not os.path.isdir(root):
            hint = " (or set FLAXSEG_ISBI_DIR)" if config.name == "isbi2012" else ""
            raise ValueError(
                f"Dataset folder {root!r} does not exist; set dataset.path to a folder with "
                f"images/ and masks/ (or train/ val/ test/ holding those){hint}."
            )
        labels = resolve_labels(config, read_metadata(root))
        self.info = SourceInfo(
            num_classes=labels["num_classes"],
            class_names=labels["class_names"],
            num_channels=config.num_channels,
            ignore_index=config.ignore_index,
            palette=labels["palette"],
        )
        self.decode_mask = MaskDecoder(
            labels["num_classes"],
            config.ignore_index,
            labels["palette"],
            labels["value_map"],
            labels["void_values"],
        )
        self.pairs, problems = split_pairs(config, split)
        if not self.pairs and not problems:
            problems.append(
                f"split {split!r} of {root} is empty; add files or change "
                "val_fraction / test_fraction"
            )
        for pair in self.pairs:
            problems.extend(header_problems(pair, config.num_channels))
        _raise_problems(f"Problems in the {split!r} split of {root}", problems)
        self.split = split
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
        image = load_image(pair.image)
        try:
            label = self.decode_mask(load_mask(pair.mask))
        except ValueError as e:
            raise ValueError(
                f"{pair.mask}: {e}; fix the mask or the dataset's value_map / palette / void_values"
            ) from None
        if image.shape[-1] != self.info.num_channels or image.shape[:2] != label.shape:
            raise ValueError(
                f"{pair.image} ({image.shape}) and {pair.mask} ({label.shape}) do not match "
                f"the config (num_channels={self.info.num_channels}) or each other."
            )
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"FolderSource({len(self)} pairs, split={self.split!r})"
