"""Datasets that work offline: synthetic scenes, folders of images and masks, tfds.

    from flaxseg import data
    cfg = data.dataset_config('synthetic')            # or 'isbi2012', 'folder', ...
    source = data.create_source(cfg, 'train')         # source[i] -> {'image', 'label'}
    batches = data.pipeline.create_train_iterator(
        source, batch_size=8, seed=0, augment=data.augment_config(), image_size=cfg.image_size)

A source is random-access: `len(source)`, `source[i] -> {'image': uint8 [H, W, C],
'label': uint8 | int32 [H, W]}` and `source.info` (a `SourceInfo`). `python -m
flaxseg.data check PATH_OR_TFDS_NAME` validates a dataset before training; folders in
the layouts of `flaxseg.data.layouts` (VOC, Cityscapes, ADE20K, CamVid, MMSegmentation,
nnU-Net, ...) are detected.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from flaxseg.api import load_lazily
from flaxseg.data.base import Source, SourceInfo
from flaxseg.data.config import augment_config, available_datasets, dataset_config

__all__ = [
    "Source",
    "SourceInfo",
    "augment_config",
    "available_datasets",
    "create_source",
    "dataset_config",
    "pipeline",
    "resolve_dataset_config",
    "transforms",
]

_SOURCES = ("synthetic", "folder", "tfds")


def __getattr__(name: str) -> Any:
    # Loaded on first use: a config file imports this package (dataset_config) without
    # JAX or grain.
    return load_lazily(globals(), name, {n: f"{__name__}.{n}" for n in ("pipeline",
                                                                      "transforms")})


def create_source(dataset_config: ml_collections.ConfigDict, split: str) -> Source:
    """The random-access source for `split` ('train', 'val' or 'test') of a dataset config.

    Dispatches on `dataset_config.source`; see `dataset_config()` for the keys. Cheap
    problems (missing folders, unpaired files, mismatched sizes or channels, a tfds
    dataset that is not prepared) raise here, before training starts.
    """
    kind = dataset_config.get("source")
    if kind == "synthetic":
        from flaxseg.data.synthetic import SyntheticSource

        return SyntheticSource(dataset_config, split)
    if kind == "folder":
        from flaxseg.data.folder import FolderSource

        return FolderSource(dataset_config, split)
    if kind == "tfds":
        from flaxseg.data.tfds import TfdsSource

        return TfdsSource(dataset_config, split)
    raise ValueError(
        f"dataset config has source={kind!r}; expected one of {_SOURCES}. Build the config "
        "with flaxseg.data.dataset_config(name, ...)."
    )


def resolve_dataset_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dataset config a run trains with, and saves with its checkpoints.

    Everything the data can tell is filled in, so the saved config reads the same data the
    same way without looking at the dataset's metadata again: a folder's layout, base
    folder (absolute) and classes (`flaxseg.data.folder.resolve_folder_config`), a tfds
    dataset's classes from its prepared metadata. Every value is in its one form
    (`dataset_config`), so the config read back from JSON resolves to itself. Raises
    ValueError when the classes cannot be known (before anything is compiled).
    """
    values = config.to_dict()
    resolved = dataset_config(values.pop("name"), **values)
    if resolved.source == "folder":
        from flaxseg.data.folder import resolve_folder_config

        return resolve_folder_config(resolved)
    if resolved.source == "tfds":
        if resolved.data_dir:
            resolved.data_dir = os.path.abspath(os.path.expanduser(resolved.data_dir))
        if resolved.num_classes is None:
            info = create_source(resolved, "train").info
            resolved.num_classes, resolved.class_names = info.num_classes, info.class_names
            resolved.palette = info.palette
    return resolved
