"""Default configs for every dataset flaxseg knows, and for the training transforms.

`dataset_config(name, **overrides)` always has `name`, `source` ('synthetic' |
'folder' | 'tfds'), `num_classes`, `ignore_index`, `image_size` (H, W the loader
yields), `num_channels`, plus the source's own keys. An unknown name is taken to
be a tfds dataset prepared with `flaxseg.data.tfds.prepare_folder_dataset`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from flaxseg.data.base import DEFAULT_IGNORE_INDEX

ISBI_DIR_ENV = "FLAXSEG_ISBI_DIR"

SYNTHETIC_CLASS_NAMES = ("background", "disc", "rectangle", "triangle")

# Cityscapes labelIds (the gtFine *_labelIds.png values) -> the 19 trainIds; every
# other id (unlabeled, ego vehicle, parking, guard rail, ...) is void.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_VOID_IDS = tuple(i for i in range(34) if i not in CITYSCAPES_ID_TO_TRAIN_ID)
CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip


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
        path="",  # the dataset root: images/ + masks/, or train/ val/ test/ holding those
        # None: read from <path>/dataset.json (class_names, palette, value_map, void_values).
        num_classes=None,
        class_names=None,
        palette=None,  # one RGB triple per class: RGB masks are decoded by colour
        value_map=None,  # {raw mask value: class}; None: values are class indices
        void_values=(),  # raw mask values that become ignore_index
        ignore_index=DEFAULT_IGNORE_INDEX,
        image_size=(256, 256),
        num_channels=3,
        images_dir="images",
        masks_dir="masks",
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
        void_values=(),
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


def _cityscapes() -> dict[str, Any]:
    cfg = _tfds("cityscapes/semantic_segmentation")
    cfg.update(
        name="cityscapes",
        image_key="image_left",
        label_key="segmentation_label",
        splits={"train": "train", "val": "validation", "test": "test"},
        num_classes=len(CITYSCAPES_CLASS_NAMES),
        class_names=CITYSCAPES_CLASS_NAMES,
        value_map=CITYSCAPES_ID_TO_TRAIN_ID,
        void_values=CITYSCAPES_VOID_IDS,
        palette=CITYSCAPES_PALETTE,
        image_size=(512, 1024),
    )
    return cfg


_PRESETS = {
    "synthetic": _synthetic,
    "folder": _folder,
    "isbi2012": _isbi2012,
    "oxford_iiit_pet": _oxford_iiit_pet,
    "cityscapes": _cityscapes,
}


def available_datasets() -> tuple[str, ...]:
    """The dataset names with a built-in config (any prepared tfds name works too)."""
    return tuple(_PRESETS)


def dataset_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The default config for dataset `name`, with `overrides` applied.

    Args:
      name: 'synthetic', 'folder', 'isbi2012', 'oxford_iiit_pet', 'cityscapes', or the
        tfds name of a dataset prepared with `prepare_folder_dataset` (then pass `data_dir`).
      **overrides: keys to change; each must exist in the default config.

    Returns:
      A ConfigDict with at least `name`, `source`, `num_classes`, `ignore_index`,
      `image_size` (H, W) and `num_channels`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}.")
    defaults = _PRESETS[name]() if name in _PRESETS else _tfds(name)
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
    defaults["image_size"] = normalize_image_size(defaults["image_size"])
    return ml_collections.ConfigDict(defaults)


def normalize_image_size(image_size: Any) -> tuple[int, int]:
    """`64` or `(64, 96)` -> `(H, W)`; raises ValueError for anything else."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"image_size must be an int or an (H, W) pair, got {image_size!r}."
        ) from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {(h, w)}.")
    return (h, w)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augment_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults for the joint image/mask transforms (`flaxseg.data.transforms`).

    Keys:
      scale_range: (min, max) random rescale factor; (1.0, 1.0) turns scaling off.
      hflip, vflip, rot90: random horizontal / vertical flips, 90-degree rotations
        (vertical flips and rotations suit microscopy, not street scenes).
      brightness, contrast, saturation: maximum relative jitter (0 turns each off).
      pad_value: 'zero' or 'mean' (the normalisation mean) for image padding; masks
        are always padded with ignore_index.
      normalize: 'unit' (x / 255), 'imagenet' (ImageNet mean/std) or 'custom' (`mean`, `std`).
      mean, std: per-channel statistics in [0, 1] units, for normalize='custom'.
      eval_resize: how eval images reach image_size: 'pad' (pad with ignore_index,
        centre-crop if larger) or 'resize' (bilinear image, nearest mask).
      elastic: the U-Net paper's elastic deformation, applied first (`transforms.elastic_deform`).
      elastic_grid, elastic_sigma: its control points per side and their displacement
        standard deviation in pixels (the paper: 3 and 10).
      elastic_interpolation: 'bilinear' or 'bicubic' image resampling (masks: nearest).
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
    )
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown augment key(s) {unknown}; valid keys: {sorted(defaults)}.")
    defaults.update(overrides)
    return ml_collections.ConfigDict(defaults)
