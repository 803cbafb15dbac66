"""The dataset layouts users have, read as they come off the disk.

A layout says where each split's images and masks lie below the dataset's base folder,
how an image finds its mask, and what the dataset's own files say about its classes.
`find(root, name)` detects the layout of a folder (`name='auto'`, trying them in the
order of `LAYOUTS`) or checks the one asked for; the base folder may sit below `root`
(`root/VOCdevkit/VOC2012`, `root/ADEChallengeData2016`, ...).

    voc2012          VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png,
                     ImageSets/Segmentation/{train,val}.txt}
    voc_aug          the same + SegmentationClassAug/*.png, ImageSets/Segmentation/trainaug.txt
    sbd              benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}
    cityscapes       leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/
                     *_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)
    ade20k           ADEChallengeData2016/{images,annotations}/{training,validation}/
    camvid           {train,val,test}/*.png + {train,val,test}annot/*.png
    mmseg            img_dir/{train,val,test}/ + ann_dir/{train,val,test}/
    nnunet           imagesTr/<case>_0000.png (one file per channel) + labelsTr/<case>.png
                     + dataset.json
    images_by_split  images/{train,val,test}/ + masks/{train,val,test}/
    split_subfolders {train,val,test}/images/ + {train,val,test}/masks/
    pooled           images/ + masks/ (split by a seeded fraction)

Nothing here decodes an image; `flaxseg.data.folder` reads the files a layout lists.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from flaxseg.data import classes, metadata
from flaxseg.image_files import IMAGE_EXTENSIONS

SPLITS = ("train", "val", "test")
METADATA_FILE = "dataset.json"
# The label keys a dataset.json (or a layout) may give; the config's own values win.
LABEL_KEYS = (
    "num_classes", "class_names", "palette", "value_map", "void_values", "reduce_zero_label",
)  # fmt: skip
MAX_LISTED = 20

Config = ml_collections.ConfigDict


def listing(paths: Sequence[str]) -> str:
    """The first paths, comma-separated, and how many more there are."""
    shown = ", ".join(paths[:MAX_LISTED])
    more = f" ... and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return shown + more


@dataclasses.dataclass(frozen=True)
class Pair:
    """The image file(s) of one example and its mask file; `stem` is unique in a split.

    `images` holds one file, or one file per channel group (nnU-Net's `_0000`, `_0001`,
    ...), whose channels are stacked in order.
    """

    stem: str
    images: tuple[str, ...]
    mask: str

    @property
    def image(self) -> str:
        return self.images[0]


@dataclasses.dataclass
class Listing:
    """A split's pairs, the problems met listing them, and the folders/files looked in
    (with the file-name suffix each was searched for, where one was)."""

    pairs: list[Pair]
    problems: list[str]
    looked_in: list[str]
    suffixes: dict[str, str] = dataclasses.field(default_factory=dict)


def describe_folder(path: str, suffix: str = "") -> str:
    """What `path` holds, in words: '<path> holds 3 folder(s), no image files'."""
    if os.path.isfile(path):  # a split's list of ids
        with open(path) as f:
            return f"{path} lists {sum(1 for line in f if line.strip())} id(s)"
    if not os.path.isdir(path):
        return f"{path} does not exist"
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    folders = sum(os.path.isdir(os.path.join(path, e)) for e in entries)
    images = [e for e in entries if os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS]
    if not entries:
        return f"{path} is empty"
    parts = [f"{folders} folder(s)"] if folders else []
    if suffix and images:
        matching = sum(e.endswith(suffix) for e in images)
        parts.append(f"{len(images)} image file(s), {matching} ending in {suffix!r}")
    else:
        parts.append(f"{len(images)} image file(s)" if images else "no image files")
    others = len(entries) - folders - len(images)
    if others:
        parts.append(f"{others} other file(s)")
    return f"{path} holds " + ", ".join(parts)


def _files_by_key(directory: str, suffix: str, recursive: bool) -> tuple[dict[str, str], list]:
    """Image files of `directory` by key (the name less `suffix`, or less its extension),
    and problems (several files with one key)."""
    by_key: dict[str, list[str]] = {}
    walk = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
    for dirpath, dirnames, names in walk:
        dirnames.sort()
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS + (".mat",):
                continue
            if suffix:
                if not name.endswith(suffix):
                    continue
                stem = name[: -len(suffix)]
            by_key.setdefault(stem, []).append(os.path.join(dirpath, name))
    problems = [
        f"several files share the stem {stem!r}: {listing(paths)}; keep one per stem"
        for stem, paths in by_key.items()
        if len(paths) > 1
    ]
    return {stem: paths[0] for stem, paths in by_key.items()}, problems


def _suffix_cause(images: dict[str, str], masks: dict[str, str], no_mask: set[str],
                  no_image: set[str]) -> str:
    """For unpaired files: when every unpaired mask's key is an unpaired image's key plus one
    suffix (or the reverse), that naming convention as the likely cause and the option that
    pairs them (a clause to append), else ''."""
    for longer, shorter, files, option in ((no_image, no_mask, masks, "mask"),
                                           (no_mask, no_image, images, "image")):
        if not longer or not shorter:
            continue
        # The suffix one file suggests (its longest stem among the others), then checked
        # on every file: linear, for datasets of any size.
        first = min(longer)
        stem = max((s for s in shorter if first.startswith(s) and first != s), key=len,
                   default=None)
        suffix = None if stem is None else first[len(stem):]
        if suffix and all(k.endswith(suffix) and k[: -len(suffix)] in shorter for k in longer):
            ends = {os.path.splitext(files[k])[1] for k in longer}
            flag = suffix + (ends.pop() if len(ends) == 1 else "")
            return (f" (likely cause: the {option} names carry the suffix {flag!r}; pair them "
                    f"with --{option}-suffix {flag} / dataset.{option}_suffix={flag!r})")
    return ""


def pair_files(
    images_dir: str,
    masks_dir: str,
    image_suffix: str = "",
    mask_suffix: str = "",
    recursive: bool = False,
) -> Listing:
    """Matches the images of `images_dir` to the masks of `masks_dir`.

    Without suffixes an image and a mask pair when their names less the extension are
    equal; with suffixes, when their names less the suffixes are (Cityscapes'
    `<name>_leftImg8bit.png` / `<name>_gtFine_labelIds.png`).
    """
    missing = [f"missing folder {d}" for d in (images_dir, masks_dir) if not os.path.isdir(d)]
    if missing:
        return Listing([], missing, [images_dir, masks_dir])
    images, problems = _files_by_key(images_dir, image_suffix, recursive)
    masks, mask_problems = _files_by_key(masks_dir, mask_suffix, recursive)
    problems += mask_problems
    no_mask_keys, no_image_keys = set(images) - set(masks), set(masks) - set(images)
    no_mask = sorted(images[s] for s in no_mask_keys)
    no_image = sorted(masks[s] for s in no_image_keys)
    cause = _suffix_cause(images, masks, no_mask_keys, no_image_keys)
    if no_mask:
        problems.append(
            f"{len(no_mask)} image(s) without a mask in {masks_dir}: {listing(no_mask)}{cause}"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} mask(s) without an image in {images_dir}: {listing(no_image)}"
            f"{cause}")
    pairs = [Pair(s, (images[s],), masks[s]) for s in sorted(set(images) & set(masks))]
    return Listing(pairs, problems, [images_dir, masks_dir],
                   {images_dir: image_suffix, masks_dir: mask_suffix})


def fraction_split(pairs: list[Pair], config: Config, split: str) -> list[Pair]:
    """`split`'s share of one pool of pairs: seeded by `split_seed`, sized by the fractions."""
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
    return [pairs[i] for i in sorted(order[start:stop])]


def read_metadata(base: str) -> dict[str, Any]:
    """`base/dataset.json` (flaxseg's: the `LABEL_KEYS`), or {} when there is none."""
    path = os.path.join(base, METADATA_FILE)
    meta = _read_json(path)
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object with keys from {LABEL_KEYS}.")
    unknown = sorted(set(meta) - set(LABEL_KEYS))
    if unknown:
        raise ValueError(f"{path} may only hold the keys {LABEL_KEYS}; got extra {unknown}.")
    metadata.validate(meta, path)
    return meta


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Fix the JSON or remove the file.") from None


class Layout(abc.ABC):
    """A dataset layout: how to recognise it and list each split's pairs.

    Subclasses set `name`, `tree` (the tree, one line), `markers` (paths below the base
    folder that identify it; `{images_dir}` / `{masks_dir}` come from the config),
    `wrappers` (glob patterns of the folders below a given root where the base may be)
    and `classes` (the label keys of datasets with fixed classes), and implement
    `splits` and `list_split`.
    """

    name: str = ""
    tree: str = ""
    markers: tuple[str, ...] = ()
    wrappers: tuple[str, ...] = ()
    classes: Mapping[str, Any] = {}

    def matches(self, base: str, config: Config) -> bool:
        return all(os.path.exists(os.path.join(base, m.format(**config))) for m in self.markers)

    def missing(self, base: str, config: Config) -> list[str]:
        """The markers absent from `base`."""
        paths = [m.format(**config) for m in self.markers]
        return [p for p in paths if not os.path.exists(os.path.join(base, p))]

    def find_base(self, root: str, config: Config) -> list[str]:
        """The folders at or below `root` that are in this layout."""
        candidates = [root] + sorted(
            p for w in self.wrappers for p in glob.glob(os.path.join(glob.escape(root), w))
        )
        return [c for c in candidates if os.path.isdir(c) and self.matches(c, config)]

    def defaults(self, base: str, config: Config) -> dict[str, Any]:
        """Config keys the layout fills where the config leaves them unset."""
        return dict(self.classes)

    def metadata(self, base: str) -> dict[str, Any]:
        """What the dataset's own metadata file says (label keys, num_channels)."""
        return read_metadata(base)

    @abc.abstractmethod
    def splits(self, base: str, config: Config) -> tuple[str, ...]:
        """The flaxseg splits this dataset has."""

    @abc.abstractmethod
    def list_split(self, base: str, config: Config, split: str) -> Listing:
        """The pairs of `split` (one of `splits`), problems, and what was looked in."""


class SplitFolders(Layout):
    """Each split in its own image and mask folders (`images`/`masks`: templates with
    `{split}` (the split's folder name), `{images_dir}`, `{masks_dir}`)."""

    def __init__(self, name, tree, images, masks, markers, *, split_names=None, wrappers=(),
                 classes=None, recursive=False, suffixes=("", "")):
        self.name, self.tree, self.markers, self.wrappers = name, tree, markers, wrappers
        self.images, self.masks, self.recursive = images, masks, recursive
        self.split_names = split_names or {s: s for s in SPLITS}
        self.classes = classes or {}
        self.suffixes = suffixes

    def _dirs(self, base: str, config: Config, split: str) -> tuple[str, str]:
        keys = dict(config, split=self.split_names[split])
        return (os.path.join(base, self.images.format(**keys)),
                os.path.join(base, self.masks.format(**keys)))

    def defaults(self, base: str, config: Config) -> dict[str, Any]:
        image_suffix, mask_suffix = self.suffixes
        return {**self.classes, "image_suffix": image_suffix, "mask_suffix": mask_suffix}

    def splits(self, base: str, config: Config) -> tuple[str, ...]:
        return tuple(
            s for s in self.split_names if os.path.isdir(self._dirs(base, config, s)[0])
        )

    def list_split(self, base: str, config: Config, split: str) -> Listing:
        images, masks = self._dirs(base, config, split)
        return pair_files(images, masks, config.image_suffix, config.mask_suffix,
                          self.recursive)


class Cityscapes(SplitFolders):
    """Cityscapes' fine annotations: trainId masks when they were made, else labelIds."""

    TRAIN_IDS, LABEL_IDS = "_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"

    def defaults(self, base: str, config: Config) -> dict[str, Any]:
        out = super().defaults(base, config)
        suffix = config.mask_suffix or self._mask_suffix(base)
        out["mask_suffix"] = suffix
        if suffix == self.LABEL_IDS:  # labelIds -> the 19 trainIds, the others void
            out.update(value_map=classes.CITYSCAPES_ID_TO_TRAIN_ID,
                       void_values=classes.CITYSCAPES_VOID_IDS)
        return out

    def _mask_suffix(self, base: str) -> str:
        for _, _, names in os.walk(os.path.join(base, "gtFine")):
            if any(n.endswith(self.TRAIN_IDS) for n in names):
                return self.TRAIN_IDS
        return self.LABEL_IDS


class Pooled(SplitFolders):
    """One pool of pairs, split into train / val / test by seeded fractions."""

    def splits(self, base: str, config: Config) -> tuple[str, ...]:
        fractions = {"val": config.val_fraction, "test": config.test_fraction}
        return tuple(s for s in SPLITS if s == "train" or fractions[s] > 0)

    def list_split(self, base: str, config: Config, split: str) -> Listing:
        images, masks = self._dirs(base, config, split)
        found = pair_files(images, masks, config.image_suffix, config.mask_suffix)
        found.pairs = fraction_split(found.pairs, config, split)
        return found


class IdLists(Layout):
    """Splits given by list files of ids (PASCAL VOC, SBD): `lists[split]` is a tuple of
    candidate list files; `files[split]` the (image pattern, mask pattern) of an id."""

    def __init__(self, name, tree, markers, lists, files, *, wrappers=(), classes=None):
        self.name, self.tree, self.markers, self.wrappers = name, tree, markers, wrappers
        self.lists, self.files, self.classes = lists, files, classes or {}

    def _list_file(self, base: str, split: str) -> str | None:
        for candidate in self.lists.get(split, ()):
            if os.path.isfile(os.path.join(base, candidate)):
                return os.path.join(base, candidate)
        return None

    def matches(self, base: str, config: Config) -> bool:
        return super().matches(base, config) and self._list_file(base, "train") is not None

    def splits(self, base: str, config: Config) -> tuple[str, ...]:
        return tuple(s for s in self.lists if self._list_file(base, s))

    def list_split(self, base: str, config: Config, split: str) -> Listing:
        list_file = self._list_file(base, split)
        if list_file is None:
            wanted = [os.path.join(base, c) for c in self.lists.get(split, ())]
            return Listing([], [], wanted)
        with open(list_file) as f:
            # A line is an id, or (DeepLab's lists) "/JPEGImages/<id>.jpg /Segm.../<id>.png".
            ids = [os.path.splitext(os.path.basename(line.split()[0]))[0]
                   for line in f if line.strip()]
        image_pattern, mask_pattern = self.files[split]
        pairs, no_image, no_mask = [], [], []
        for stem in ids:
            image = os.path.join(base, image_pattern.format(id=stem))
            mask = os.path.join(base, mask_pattern.format(id=stem))
            if not os.path.isfile(image):
                no_image.append(image)
            elif not os.path.isfile(mask):
                no_mask.append(mask)
            else:
                pairs.append(Pair(stem, (image,), mask))
        problems = [
            f"{len(paths)} id(s) of {list_file} have no {what} file: {listing(paths)}"
            for what, paths in (("image", no_image), ("mask", no_mask)) if paths
        ]
        return Listing(pairs, problems, [list_file])


class NnUNet(Layout):
    """nnU-Net's raw 2D format: `imagesTr/<case>_<XXXX><ending>` (one file per channel),
    `labelsTr/<case><ending>`, and its `dataset.json` (`labels`, `channel_names`,
    `file_ending`). Train and val share `imagesTr` by seeded fractions; test is
    `imagesTs/` + `labelsTs/` when labels for it exist (nnU-Net's own test set is
    unlabelled)."""

    name = "nnunet"
    tree = "imagesTr/<case>_0000.png (_0001, ... per channel) + labelsTr/<case>.png + dataset.json"
    markers = ("imagesTr", "labelsTr", METADATA_FILE)
    wrappers = ("Dataset[0-9][0-9][0-9]_*",)  # nnUNet_raw/Dataset004_Cells

    def metadata(self, base: str) -> dict[str, Any]:
        path = os.path.join(base, METADATA_FILE)
        meta = _read_json(path) or {}
        labels, channels = meta.get("labels"), meta.get("channel_names")
        if not isinstance(labels, dict) or not isinstance(channels, dict) or not labels:
            raise ValueError(
                f"{path} is not an nnU-Net dataset.json: it needs 'labels' ({{name: value}}) "
                "and 'channel_names' ({index: name}).")
        regions = sorted(n for n, v in labels.items() if not isinstance(v, int))
        if regions:
            raise ValueError(f"{path}: region-based labels {regions} are not supported; "
                             "give each label one integer value.")
        named = sorted((v, n) for n, v in labels.items() if n != "ignore")
        if [v for v, _ in named] != list(range(len(named))):
            raise ValueError(f"{path}: label values must be 0, 1, 2, ... (nnU-Net's rule); "
                             f"got {dict(labels)}.")
        out = {
            "num_classes": len(named),
            "class_names": tuple(n for _, n in named),
            "num_channels": len(channels),
            # Labels are <case><file_ending>; images <case>_<XXXX><file_ending>.
            "mask_suffix": meta.get("file_ending", ".png"),
        }
        if "ignore" in labels:
            out["void_values"] = (labels["ignore"],)
        return out

    def splits(self, base: str, config: Config) -> tuple[str, ...]:
        test = os.path.isdir(os.path.join(base, "labelsTs"))
        return tuple(s for s in SPLITS
                     if s == "train" or (s == "val" and config.val_fraction > 0)
                     or (s == "test" and test))

    def list_split(self, base: str, config: Config, split: str) -> Listing:
        kind = "Ts" if split == "test" else "Tr"
        images_dir, labels_dir = (os.path.join(base, f"{d}{kind}") for d in ("images", "labels"))
        if not os.path.isdir(images_dir) or not os.path.isdir(labels_dir):
            return pair_files(images_dir, labels_dir)  # names the missing folder
        cases, problems = self._cases(images_dir, config.mask_suffix)
        labels, label_problems = _files_by_key(labels_dir, config.mask_suffix, False)
        problems += label_problems
        for what, names in ((f"image files but no label in {labels_dir}", set(cases) - set(labels)),
                            (f"a label but no image files in {images_dir}",
                             set(labels) - set(cases))):
            if names:
                problems.append(f"{len(names)} case(s) with {what}: {listing(sorted(names))}")
        pairs = [Pair(c, files, labels[c]) for c, files in sorted(cases.items()) if c in labels]
        if split != "test":
            pairs = fraction_split(pairs, config, split)
        return Listing(pairs, problems, [images_dir, labels_dir])

    @staticmethod
    def _cases(images_dir: str, ending: str) -> tuple[dict[str, tuple[str, ...]], list[str]]:
        """Case -> its channel files in order; problems for cases missing channels."""
        pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
        by_case: dict[str, dict[int, str]] = {}
        for name in sorted(os.listdir(images_dir)):
            match = pattern.match(name)
            if match:
                by_case.setdefault(match["case"], {})[int(match["channel"])] = os.path.join(
                    images_dir, name)
        # Every case has as many channel files as most cases do (one per channel_names
        # entry, or one RGB file for natural images).
        usual = collections.Counter(len(c) for c in by_case.values()).most_common(1)
        expected = list(range(usual[0][0])) if usual else []
        cases, incomplete = {}, []
        for case, channels in by_case.items():
            order = sorted(channels)
            if order != expected:
                incomplete.append(f"{case} (has {order})")
            else:
                cases[case] = tuple(channels[i] for i in order)
        problems = [f"{len(incomplete)} case(s) of {images_dir} miss channel files "
                    f"(_0000, _0001, ... in order): {listing(incomplete)}"] if incomplete else []
        return cases, problems


_VOC_FILES = ("JPEGImages/{id}.jpg", "SegmentationClass/{id}.png")
_VOC_LISTS = "ImageSets/Segmentation/"
_VOC_WRAPPERS = ("VOC20*", "VOCdevkit/VOC20*")
_VOC_CLASSES = {"num_classes": len(classes.VOC_CLASS_NAMES),
                "class_names": classes.VOC_CLASS_NAMES, "palette": classes.VOC_PALETTE}

# Tried in this order by `find(root, 'auto')`: the most specific first.
LAYOUTS: tuple[Layout, ...] = (
    NnUNet(),
    Cityscapes(
        "cityscapes",
        "leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png + "
        "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)",
        "leftImg8bit/{split}", "gtFine/{split}", ("leftImg8bit", "gtFine"),
        wrappers=("cityscapes",), recursive=True, suffixes=("_leftImg8bit.png", ""),
        classes={"num_classes": len(classes.CITYSCAPES_CLASS_NAMES),
                 "class_names": classes.CITYSCAPES_CLASS_NAMES,
                 "palette": classes.CITYSCAPES_PALETTE}),
    IdLists(
        "voc_aug",
        "VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug} + "
        "ImageSets/Segmentation/{trainaug,val}.txt",
        ("JPEGImages", "SegmentationClassAug"),
        {"train": (_VOC_LISTS + "trainaug.txt", _VOC_LISTS + "train_aug.txt"),
         "val": (_VOC_LISTS + "val.txt",)},
        {"train": ("JPEGImages/{id}.jpg", "SegmentationClassAug/{id}.png"), "val": _VOC_FILES},
        wrappers=_VOC_WRAPPERS, classes=_VOC_CLASSES),
    IdLists(
        "voc2012",
        "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
        "ImageSets/Segmentation/{train,val}.txt}",
        ("JPEGImages", "SegmentationClass"),
        {"train": (_VOC_LISTS + "train.txt",), "val": (_VOC_LISTS + "val.txt",)},
        {"train": _VOC_FILES, "val": _VOC_FILES},
        wrappers=_VOC_WRAPPERS, classes=_VOC_CLASSES),
    IdLists(
        "sbd",
        "benchmark_RELEASE/dataset/{img/*.jpg, cls/*.mat, train.txt, val.txt}",
        ("img", "cls"),
        {"train": ("train.txt",), "val": ("val.txt",)},
        {"train": ("img/{id}.jpg", "cls/{id}.mat"), "val": ("img/{id}.jpg", "cls/{id}.mat")},
        wrappers=("dataset", "benchmark_RELEASE/dataset"), classes=_VOC_CLASSES),
    SplitFolders(
        "ade20k",
        "ADEChallengeData2016/{images,annotations}/{training,validation}/",
        "images/{split}", "annotations/{split}", ("images/training", "annotations/training"),
        split_names={"train": "training", "val": "validation"},
        wrappers=("ADEChallengeData2016",),
        classes={"num_classes": len(classes.ADE20K_CLASS_NAMES),
                 "class_names": classes.ADE20K_CLASS_NAMES, "reduce_zero_label": True}),
    SplitFolders(
        "camvid",
        "{train,val,test}/*.png + {train,val,test}annot/*.png",
        "{split}", "{split}annot", ("train", "trainannot"), wrappers=("CamVid",),
        classes={"num_classes": len(classes.CAMVID_CLASS_NAMES),
                 "class_names": classes.CAMVID_CLASS_NAMES,
                 "palette": classes.CAMVID_PALETTE,
                 "void_values": (classes.CAMVID_VOID_VALUE,)}),
    SplitFolders(
        "mmseg",
        "img_dir/{train,val,test}/ + ann_dir/{train,val,test}/ (image_suffix, mask_suffix)",
        "img_dir/{split}", "ann_dir/{split}", ("img_dir", "ann_dir")),
    SplitFolders(
        "images_by_split",
        "images/{train,val,test}/ + masks/{train,val,test}/",
        "{images_dir}/{split}", "{masks_dir}/{split}", ("{images_dir}/train", "{masks_dir}")),
    SplitFolders(
        "split_subfolders",
        "{train,val,test}/images/ + {train,val,test}/masks/",
        "{split}/{images_dir}", "{split}/{masks_dir}", ("train/{images_dir}",)),
    Pooled(
        "pooled",
        "images/ + masks/, split by a seeded fraction (val_fraction, test_fraction)",
        "{images_dir}", "{masks_dir}", ("{images_dir}", "{masks_dir}")),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def layouts_help() -> str:
    """One line per layout: its name and its tree."""
    return "\n".join(f"  {layout.name:<17}{layout.tree}" for layout in LAYOUTS)


def get(name: str) -> Layout:
    """The layout called `name`; raises ValueError naming the layouts there are."""
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise ValueError(f"Unknown dataset layout {name!r}; layouts: 'auto', "
                     f"{', '.join(LAYOUT_NAMES)}.")


def find(root: str, config: Config) -> tuple[Layout, str]:
    """(the layout, its base folder) of the dataset at `root`: `config.layout` if it names
    one, else the first of `LAYOUTS` that matches `root` or a folder below it."""
    if config.layout != "auto":
        layout = get(config.layout)
        bases = layout.find_base(root, config)
        if not bases:
            raise ValueError(
                f"{root} is not in the {layout.name} layout ({layout.tree}): it lacks "
                f"{', '.join(layout.missing(root, config))}; {describe_folder(root)}. Set "
                "dataset.layout='auto' to detect the layout, or point dataset.path at the "
                "dataset's root.")
        return layout, _one(layout, bases)
    for layout in LAYOUTS:
        bases = layout.find_base(root, config)
        if bases:
            return layout, _one(layout, bases)
    raise ValueError(
        f"No dataset layout flaxseg reads was found in {root}: {describe_folder(root)}. "
        f"flaxseg reads these layouts (dataset.layout, default 'auto'):\n{layouts_help()}")


def _one(layout: Layout, bases: list[str]) -> str:
    if len(bases) > 1:
        raise ValueError(f"Several {layout.name} datasets were found: {listing(bases)}; point "
                         "dataset.path at one of them.")
    return bases[0]
