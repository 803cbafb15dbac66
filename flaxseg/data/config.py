"""Default configs for every dataset flaxseg knows, and for the training transforms.

`dataset_config(name, **overrides)` always has `name`, `source` ('synthetic' |
'folder' | 'tfds'), `num_classes`, `ignore_index`, `image_size` (H, W the loader
yields), `num_channels`, plus the source's own keys. An unknown name is taken to
be a tfds dataset prepared with `flaxseg.data.tfds.prepare_folder_dataset`.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from flaxseg.data import classes, layouts
from flaxseg.data.base import DEFAULT_IGNORE_INDEX, MAX_CLASSES, parse_value_map

ISBI_DIR_ENV = "FLAXSEG_ISBI_DIR"

SYNTHETIC_CLASS_NAMES = ("background", "disc", "rectangle", "triangle")

# Keys that may be unset (None: filled from the dataset's files, its layout or the
# prepared metadata) with the type a value takes: ml_collections placeholders of these
# types keep the keys overridable from the command line (`--config.dataset.num_classes=12`;
# a plain None field cannot be overridden).
_OPTIONAL_TYPES = {
    "num_classes": int,
    "class_names": tuple,
    "palette": tuple,
    "value_map": object,
    "void_values": tuple,
    "reduce_zero_label": bool,
    "num_channels": int,
}


def _synthetic() -> dict[str, Any]:
    return dict(
        name="synthetic",
        source="synthetic",
        num_classes=len(SYNTHETIC_CLASS_NAMES),
        class_names=SYNTHETIC_CLASS_NAMES,
        ignore_index=DEFAULT_IGNORE_INDEX,
        image_size=(64, 64),
        num_channels=3,
        seed=0,  # scenes come from (seed, split, index); each split has its own seeds
        num_train=2048,
        num_val=256,
        num_test=256,
        min_shapes=2,
        max_shapes=5,
        noise_std=0.04,  # pixel noise standard deviation, in [0, 1] units
    )


def _folder() -> dict[str, Any]:
    return dict(
        name="folder",
        source="folder",
        path="",  # the dataset's root folder, in any layout of flaxseg.data.layouts
        layout="auto",  # 'auto': detected; or a name from flaxseg.data.layouts.LAYOUT_NAMES
        # None: from <path>/dataset.json, else the layout (fixed-class datasets); the
        # resolved values are what a run saves with its checkpoints.
        num_classes=None,
        class_names=None,
        palette=None,  # one RGB triple per class: RGB masks are decoded by colour
        value_map=None,  # {raw mask value: class}; None: values are class indices
        void_values=None,  # raw mask values that become ignore_index
        reduce_zero_label=None,  # True: 0 -> void, v -> v - 1 (ADE20K); None: False
        ignore_index=DEFAULT_IGNORE_INDEX,
        image_size=(256, 256),
        num_channels=None,  # None: the layout's (nnU-Net), else the first image's
        images_dir="images",  # the pooled, split_subfolders and images_by_split layouts
        masks_dir="masks",
        # "": the layout's; mmseg's img_suffix / seg_map_suffix, e.g. '.jpg' and '.png'
        image_suffix="",
        mask_suffix="",
        # Without train/ val/ test/ subfolders the split is a seeded fraction.
        val_fraction=0.1,
        test_fraction=0.0,
        split_seed=0,
        cache=False,  # keep decoded examples in memory (small datasets: no repeated decoding)
        # Binary membrane maps: the membrane class; evaluate then adds the ISBI 2012 errors.
        membrane_class=None,
    )


def _isbi2012() -> dict[str, Any]:
    cfg = _folder()
    cfg.update(
        name="isbi2012",
        path=os.environ.get(ISBI_DIR_ENV, ""),
        num_classes=2,
        # The masks store 0 for membrane (about 22% of pixels) and 255 for cell interior.
        class_names=("membrane", "interior"),
        value_map={0: 0, 255: 1},
        palette=((0, 0, 0), (255, 255, 255)),
        image_size=(512, 512),
        num_channels=1,
        layout="pooled",
        val_fraction=0.2,  # 24 train / 6 val of the 30 labelled slices
        cache=True,  # 30 slices of 256 KiB
        membrane_class=0,
    )
    return cfg


def _tfds(tfds_name: str) -> dict[str, Any]:
    return dict(
        name=tfds_name,
        source="tfds",
        tfds_name=tfds_name,
        data_dir="",  # "": $TFDS_DATA_DIR or ~/tensorflow_datasets
        image_key="image",
        label_key="label",
        # flaxseg split -> tfds split spec (any tfds slice, e.g. 'train[:90%]').
        splits={"train": "train", "val": "val", "test": "test"},
        num_classes=None,  # None: from the prepared dataset's metadata
        class_names=None,
        palette=None,
        value_map=None,
        void_values=None,
        reduce_zero_label=False,
        ignore_index=DEFAULT_IGNORE_INDEX,
        image_size=(256, 256),
        num_channels=3,
    )


def _oxford_iiit_pet() -> dict[str, Any]:
    cfg = _tfds("oxford_iiit_pet")
    cfg.update(
        label_key="segmentation_mask",
        splits={"train": "train", "val": "test", "test": "test"},
        num_classes=3,
        # The trimap stores 1 = pet, 2 = background, 3 = border.
        class_names=("pet", "background", "border"),
        value_map={1: 0, 2: 1, 3: 2},
        palette=((255, 128, 0), (0, 0, 0), (255, 255, 255)),
        image_size=(128, 128),
    )
    return cfg


def _cityscapes_tfds() -> dict[str, Any]:
    cfg = _tfds("cityscapes/semantic_segmentation")
    cfg.update(
        name="cityscapes_tfds",
        image_key="image_left",
        label_key="segmentation_label",
        splits={"train": "train", "val": "validation", "test": "test"},
        num_classes=len(classes.CITYSCAPES_CLASS_NAMES),
        class_names=classes.CITYSCAPES_CLASS_NAMES,
        value_map=classes.CITYSCAPES_ID_TO_TRAIN_ID,
        void_values=classes.CITYSCAPES_VOID_IDS,
        palette=classes.CITYSCAPES_PALETTE,
        image_size=(512, 1024),
    )
    return cfg


# The fixed-class layouts' presets: a folder dataset in that layout, with its classes.
_LAYOUT_IMAGE_SIZES = {
    "voc2012": (512, 512),  # VOC images are at most 500x500
    "voc_aug": (512, 512),
    "sbd": (512, 512),
    "cityscapes": (512, 1024),
    "ade20k": (512, 512),
    "camvid": (360, 480),  # the SegNet tutorial's frames
}


def _layout_preset(name: str) -> dict[str, Any]:
    cfg = _folder()
    cfg.update(name=name, layout=name, image_size=_LAYOUT_IMAGE_SIZES[name],
               **layouts.get(name).classes)
    return cfg


_PRESETS = {
    "synthetic": _synthetic,
    "folder": _folder,
    "isbi2012": _isbi2012,
    **{name: functools.partial(_layout_preset, name) for name in _LAYOUT_IMAGE_SIZES},
    "oxford_iiit_pet": _oxford_iiit_pet,
    "cityscapes_tfds": _cityscapes_tfds,
}


def available_datasets() -> tuple[str, ...]:
    """The dataset names with a built-in config (any prepared tfds name works too)."""
    return tuple(_PRESETS)


def dataset_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The default config for dataset `name`, with `overrides` applied.

    Values are brought to one form whatever they came as (a JSON list, a tuple, a
    command-line scalar): sequences become tuples, `value_map` a dict of ints,
    `image_size` an (H, W) pair, an unset key a typed None. So a config saved as JSON and
    read back (`dataset_config(**saved)`) is the config that was saved.

    Args:
      name: a name of `available_datasets()` (e.g. 'synthetic', 'folder', 'isbi2012',
        'camvid', 'voc2012', 'oxford_iiit_pet'), or the tfds name of a dataset prepared
        with `prepare_folder_dataset` (then pass `data_dir`).
      **overrides: keys to change; each must exist in the default config.

    Returns:
      A ConfigDict with at least `name`, `source`, `num_classes`, `ignore_index`,
      `image_size` (H, W) and `num_channels`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}.")
    defaults = _PRESETS[name]() if name in _PRESETS else _tfds(name)
    source = overrides.get("source", defaults["source"])
    if source != defaults["source"]:
        raise ValueError(
            f"config.dataset names {name!r} (a {defaults['source']} dataset) but holds the "
            f"keys of a {source} dataset: a dataset is switched as a whole, not by its "
            f"name. {switch_dataset_hint()}")
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} for dataset {name!r}; valid keys: {sorted(defaults)}."
        )
    if name not in _PRESETS:
        # A dataset prepared by flaxseg carries its classes and channels in its metadata.
        from flaxseg.data.tfds import read_prepared_info

        prepared = read_prepared_info(name, overrides.get("data_dir", ""))
        defaults.update(prepared or {})
    defaults.update(overrides)
    return ml_collections.ConfigDict(_canonical(defaults))


def _canonical(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every value in its one form (see `dataset_config`)."""
    out = dict(cfg)
    out["image_size"] = normalize_image_size(cfg["image_size"])
    num_classes = cfg.get("num_classes")
    if num_classes is not None and not (
            isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
            and 1 <= num_classes <= MAX_CLASSES):
        # Before anything sized by it (label tables, confusion matrices) is allocated.
        raise ValueError(f"dataset.num_classes must be an integer from 1 to {MAX_CLASSES} "
                         f"(the most classes flaxseg trains), got {num_classes!r}.")
    for key in ("class_names", "palette", "void_values"):
        value = cfg.get(key)
        if value is not None:
            # A command line gives one void value as a scalar; JSON gives lists.
            items = (value,) if isinstance(value, int | str) else value
            out[key] = tuple(
                tuple(int(v) for v in item) if isinstance(item, list | tuple) else item
                for item in items
            )
    if cfg.get("value_map") is not None:
        out["value_map"] = parse_value_map(cfg["value_map"])
    if cfg.get("splits") is not None:
        out["splits"] = {str(k): str(v) for k, v in dict(cfg["splits"]).items()}
    for key, kind in _OPTIONAL_TYPES.items():
        if key in out and out[key] is None:
            out[key] = placeholder(kind)
    return out


def switch_dataset_hint(path: str | None = None) -> str:
    """How to train a config on another dataset than the one it names."""
    return (
        "To train on a folder of images and masks (any layout flaxseg reads), run "
        "`python -m flaxseg.train --config=flaxseg/configs/folder.py "
        f"--config.dataset.path={path or 'PATH'}`, or write in your config file "
        f"`config.dataset = dataset_config('folder', path={path or 'PATH'!r})` (from "
        "flaxseg.data.config; a preset such as 'camvid' or 'voc2012' works the same way)."
    )


def normalize_image_size(image_size: Any) -> tuple[int, int]:
    """`64`, `(64,)` or `(64, 96)` -> `(H, W)`; raises ValueError for anything else.

    (A command-line `--config.dataset.image_size=500` arrives as the 1-tuple `(500,)`.)
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    elif isinstance(image_size, list | tuple) and len(image_size) == 1:
        image_size = (image_size[0], image_size[0])
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"image_size must be an int or an (H, W) pair, got {image_size!r}."
        ) from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {(h, w)}.")
    return (h, w)


def augment_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults for the joint image/mask transforms (`flaxseg.data.transforms`).

    Keys:
      scale_range: (min, max) random rescale factor; (1.0, 1.0) turns scaling off.
      hflip, vflip, rot90: random horizontal / vertical flips, 90-degree rotations
        (vertical flips and rotations suit microscopy, not street scenes).
      brightness, contrast, saturation: maximum relative jitter (0 turns each off).
      pad_value: 'zero' or 'mean' (the normalisation mean) for image padding; masks
        are always padded with ignore_index.
      normalize: 'unit' (x / 255), 'imagenet' (ImageNet mean/std) or 'custom' (`mean`, `std`);
        a training config may say 'pretrained', which `flaxseg.train.config` turns into the
        mean/std that `model.backbone_weights` expect.
      mean, std: per-channel statistics in [0, 1] units, for normalize='custom'.
      eval_resize: how eval images reach image_size: 'pad' (pad with ignore_index,
        centre-crop if larger) or 'resize' (bilinear image, nearest mask).
      elastic: the U-Net paper's elastic deformation, applied first (`transforms.elastic_deform`).
      elastic_grid, elastic_sigma: its control points per side and their displacement
        standard deviation in pixels (the paper: 3 and 10).
      elastic_interpolation: 'bilinear' or 'bicubic' image resampling (masks: nearest).
      canvas_size: (H, W) of the uint8 canvas a training example is sent to the devices
        on (`transforms.canvas_size`); None: the size of the first training example.
        Larger images are shrunk to fit on the host.
    """
    defaults = dict(
        scale_range=(0.5, 2.0),
        hflip=True,
        vflip=False,
        rot90=False,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        pad_value="zero",
        normalize="unit",
        mean=(0.5,),
        std=(0.5,),
        eval_resize="pad",
        elastic=False,
        elastic_grid=3,
        elastic_sigma=10.0,
        elastic_interpolation="bilinear",
        canvas_size=placeholder(object),
    )
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown augment key(s) {unknown}; valid keys: {sorted(defaults)}.")
    defaults.update(overrides)
    return ml_collections.ConfigDict(defaults)
