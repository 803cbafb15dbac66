"""Datasets that work offline: synthetic scenes, folders of images and masks, tfds.

    from flaxseg import data
    cfg = data.dataset_config('synthetic')            # or 'isbi2012', 'folder', ...
    source = data.create_source(cfg, 'train')         # source[i] -> {'image', 'label'}
    batches = data.pipeline.create_train_iterator(
        source, batch_size=8, seed=0, augment=data.augment_config(), image_size=cfg.image_size)

A source is random-access: `len(source)`, `source[i] -> {'image': uint8 [H, W, C],
'label': uint8 | int32 [H, W]}` and `source.info` (a `SourceInfo`). `python -m
flaxseg.data check PATH_OR_TFDS_NAME` validates a dataset before training.
"""

from __future__ import annotations

import ml_collections

from flaxseg.data import pipeline, transforms
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
    "transforms",
]

_SOURCES = ("synthetic", "folder", "tfds")


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
