"""tensorflow-datasets without TensorFlow: array_record builds read by `tfds.data_source`.

`prepare_folder_dataset` turns a folder dataset into a tfds dataset (array_record,
PNG-encoded, labels already mapped to class indices, class names in the metadata).
`TfdsSource` reads it, or a registered tfds dataset such as `oxford_iiit_pet` or
`cityscapes/semantic_segmentation`, as a random-access flaxseg source. Nothing is
ever downloaded: a dataset that is not prepared fails at once with instructions.

tfds 4.9.10 pitfalls avoided here: Image features are given PIL images (an
`np.ndarray` needs TensorFlow), the format is array_record (parquet silently
drops rows; tfrecord needs TensorFlow to read).
"""

from __future__ import annotations

import os
import re
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from flaxseg.data import layouts
from flaxseg.data.base import LabelMapper, SourceInfo, default_class_names, parse_value_map
from flaxseg.data.config import available_datasets
from flaxseg.data.folder import FolderSource, list_split, resolve_folder_config

FILE_FORMAT = "array_record"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _tfds():
    # Imported on use: tensorflow_datasets takes about a second to import.
    import tensorflow_datasets

    return tensorflow_datasets


def default_data_dir() -> str:
    """Where tfds looks when `data_dir` is empty: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def preparation_hint(tfds_name: str, data_dir: str) -> str:
    """How to prepare `tfds_name` offline so that `tfds.data_source` can read it."""
    base = tfds_name.split("/")[0]
    build = f"tfds build {tfds_name} --data_dir={data_dir} --file_format={FILE_FORMAT}"
    needs_tf = "(building registered tfds datasets needs TensorFlow: pip install 'flaxseg[tf]')"
    if base == "cityscapes":
        return (
            "Cityscapes needs manual archives: download leftImg8bit_trainvaltest.zip and "
            "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com into "
            f"{os.path.join(data_dir, 'downloads', 'manual')}/, then run `{build}` {needs_tf}."
        )
    if base == "oxford_iiit_pet":
        return (
            f"On a machine with network access run `{build}` {needs_tf} and copy "
            f"{os.path.join(data_dir, 'oxford_iiit_pet')} here (archives placed in "
            f"{os.path.join(data_dir, 'downloads', 'manual')}/ are used instead of downloads)."
        )
    return (
        "Prepare it from a folder of images and masks with `python -m flaxseg.data prepare "
        f"FOLDER --name {tfds_name} --data-dir {data_dir}`, or for a registered tfds dataset "
        f"run `{build}` {needs_tf}. (flaxseg's built-in dataset names: "
        f"{', '.join(available_datasets())}.)"
    )


def prepare_folder_dataset(
    folder_config: ml_collections.ConfigDict, *, name: str, data_dir: str, version: str = "1.0.0"
) -> str:
    """Builds tfds dataset `name` (array_record) from a folder dataset; no TensorFlow needed.

    Every split of the folder, in any layout (train/val/test, non-empty ones), is written with
    features `image` (uint8 [H, W, C] PNG), `label` (uint8 [H, W, 1] PNG of class
    indices, void = ignore_index) and `file_name`; class names, palette and
    ignore_index go to the dataset metadata. Read it back with
    `dataset_config(name, data_dir=data_dir)`.

    Returns:
      The builder directory (`data_dir/name/version`).
    """
    tfds = _tfds()
    if not _NAME_RE.match(name):
        raise ValueError(f"tfds name {name!r} must be snake_case (a-z, 0-9, _), e.g. 'my_cells'.")
    folder_config = resolve_folder_config(folder_config)
    # The splits the layout has, less empty ones (a pool too small for its val fraction).
    sources = {
        split: FolderSource(folder_config, split)
        for split in layouts.get(folder_config.layout).splits(folder_config.path, folder_config)
        if split == "train" or list_split(folder_config, split).pairs
    }
    info = sources["train"].info
    if max(info.num_classes - 1, info.ignore_index) > 255:
        raise ValueError(
            "tfds preparation stores labels as 8-bit PNGs: need < 256 classes "
            "and ignore_index <= 255."
        )

    class FolderSegmentation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Prepared by flaxseg from " + folder_config.path}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Segmentation pairs from {folder_config.path} (flaxseg).",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, info.num_channels)),
                        "label": tfds.features.Image(shape=(None, None, 1)),
                        "file_name": tfds.features.Text(),
                    }
                ),
                metadata=tfds.core.MetadataDict(
                    num_classes=info.num_classes,
                    class_names=list(info.class_names),
                    ignore_index=info.ignore_index,
                    palette=[list(c) for c in info.palette] if info.palette else None,
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(source) for split, source in sources.items()}

        def _generate_examples(self, source: FolderSource):
            for i, pair in enumerate(source.pairs):
                example = source[i]
                image = example["image"]
                yield (
                    pair.stem,
                    {
                        # PIL images: an ndarray would need TensorFlow to encode.
                        "image": Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                        "label": Image.fromarray(example["label"].astype(np.uint8)),
                        "file_name": os.path.basename(pair.image),
                    },
                )

    FolderSegmentation.name = name
    builder = FolderSegmentation(data_dir=os.path.expanduser(data_dir), file_format=FILE_FORMAT)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return str(builder.data_dir)


class DatasetNotPreparedError(ValueError):
    """The tfds dataset is not in `data_dir`; the message says how to prepare it."""


class MissingSplitError(ValueError):
    """The prepared tfds dataset has no such split; the message lists the ones it has."""


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def read_prepared_info(tfds_name: str, data_dir: str) -> dict[str, Any] | None:
    """`num_classes`, `class_names`, `num_channels` of a prepared dataset, or None if absent.

    Reads only the dataset's metadata files (no records).
    """
    tfds = _tfds()
    try:
        builder = tfds.builder(
            tfds_name, data_dir=os.path.expanduser(data_dir or default_data_dir())
        )
        if not builder.is_prepared():
            return None
    except Exception:  # not found / unreadable: TfdsSource reports it with instructions
        return None
    meta = _metadata(builder.info)
    out = {"num_channels": builder.info.features["image"].shape[-1]}
    for key in ("num_classes", "class_names", "palette"):
        if meta.get(key) is not None:
            out[key] = meta[key]
    return out


def _metadata(builder_info) -> dict[str, Any]:
    meta = builder_info.metadata
    return dict(meta) if meta else {}


class TfdsSource:
    """A prepared tfds dataset's split, read with `tfds.data_source` (no TensorFlow).

    Labels go through the config's `value_map` / `void_values` (e.g. the Pets
    trimap 1..3 -> 0..2; Cityscapes labelIds -> trainIds); without a value map the
    stored values are taken as class indices (`ignore_index` stays void).
    """

    def __init__(self, config: ml_collections.ConfigDict, split: str):
        tfds = _tfds()
        data_dir = os.path.expanduser(config.data_dir or default_data_dir())
        splits = config.get("splits") or {}
        tfds_split = splits.get(split, split)
        try:
            builder = tfds.builder(config.tfds_name, data_dir=data_dir)
            prepared = builder.is_prepared()
        except Exception as e:  # tfds raises many types here (not found, bad metadata)
            raise DatasetNotPreparedError(
                f"tfds dataset {config.tfds_name!r} cannot be read from {data_dir}: "
                f"{type(e).__name__}: {_first_line(e)}\n"
                f"{preparation_hint(config.tfds_name, data_dir)}"
            ) from None
        if not prepared:
            raise DatasetNotPreparedError(
                f"tfds dataset {config.tfds_name!r} is not prepared in {data_dir}.\n"
                f"{preparation_hint(config.tfds_name, data_dir)}"
            )
        available = sorted(builder.info.splits.keys())
        base_split = re.split(r"[\[+]", str(tfds_split))[0]
        if available and base_split not in available:
            raise MissingSplitError(
                f"tfds dataset {config.tfds_name!r} has no split {base_split!r} (for flaxseg "
                f"split {split!r}); it has {available}. Map it in dataset.splits, e.g. "
                f"{{'{split}': '{available[0]}[:10%]'}}."
            )
        try:
            self._data = builder.as_data_source(split=tfds_split)
        except Exception as e:  # e.g. a tfrecord build, which needs TensorFlow to read
            raise ValueError(
                f"tfds dataset {config.tfds_name!r} (split {tfds_split!r}) in {data_dir} cannot "
                f"be read: {type(e).__name__}: {_first_line(e)}. flaxseg reads array_record "
                f"builds; rebuild with --file_format={FILE_FORMAT}."
            ) from None
        features = builder.info.features
        for key in (config.image_key, config.label_key):
            if key not in features:
                raise ValueError(
                    f"tfds dataset {config.tfds_name!r} has no feature {key!r}; its features are "
                    f"{sorted(features)}. Set dataset.image_key / dataset.label_key."
                )
        meta = _metadata(builder.info)
        num_classes = config.num_classes or meta.get("num_classes")
        if not num_classes:
            raise ValueError(
                f"Unknown number of classes for tfds dataset {config.tfds_name!r}; set "
                "dataset.num_classes (and class_names)."
            )
        names = config.class_names or meta.get("class_names") or default_class_names(num_classes)
        palette = config.palette or meta.get("palette")
        stored_channels = features[config.image_key].shape[-1]
        if stored_channels not in (None, config.num_channels):
            raise ValueError(
                f"tfds dataset {config.tfds_name!r} stores {stored_channels}-channel images but "
                f"the config says num_channels={config.num_channels}; set "
                f"dataset.num_channels={stored_channels}."
            )
        self.info = SourceInfo(
            num_classes=int(num_classes),
            class_names=tuple(names),
            num_channels=config.num_channels,
            ignore_index=config.ignore_index,
            palette=tuple(tuple(int(v) for v in c) for c in palette) if palette else None,
        )
        self._map = LabelMapper(
            int(num_classes),
            config.ignore_index,
            parse_value_map(config.value_map),
            tuple(config.void_values or ()),
            bool(config.reduce_zero_label),
        )
        self._image_key, self._label_key = config.image_key, config.label_key
        self._name = f"{config.tfds_name}[{tfds_split}]"
        if len(self._data) == 0:
            raise ValueError(f"tfds split {self._name} is empty; choose another split.")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._data[int(index)]
        image = np.asarray(record[self._image_key])
        raw = np.asarray(record[self._label_key])
        if raw.ndim == 3:
            raw = raw[..., 0]
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] != self.info.num_channels:
            raise ValueError(
                f"{self._name} record {index} has {image.shape[-1]} channel(s); the config says "
                f"num_channels={self.info.num_channels}."
            )
        try:
            label = self._map(raw)
        except ValueError as e:
            raise ValueError(
                f"{self._name} record {index}: {e}; fix dataset.value_map / void_values."
            ) from None
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}, len={len(self)})"
