"""Sources end to end (synthetic, folder, tfds array_record), dataset check, and their errors."""

import json
import os
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from flaxseg.data import augment as augment_lib
from flaxseg.data import augment_config, create_source, dataset_config
from flaxseg.data.__main__ import main as cli_main
from flaxseg.data.base import LabelMapper, parse_value_map
from flaxseg.data.check import check_dataset, format_report
from flaxseg.data.pipeline import create_eval_iterator, create_train_iterator

# ---------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_and_splits_differ():
    config = dataset_config("synthetic", image_size=(24, 40))
    train, val = create_source(config, "train"), create_source(config, "val")
    a, b = train[3], create_source(config, "train")[3]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].shape == (24, 40, 3) and a["image"].dtype == np.uint8
    assert a["label"].shape == (24, 40) and a["label"].dtype == np.uint8
    assert not np.array_equal(train[0]["image"], val[0]["image"])
    assert len(train) == config.num_train and train.info.class_names[0] == "background"


def test_synthetic_classes_are_separable_by_colour():
    """An independent per-pixel rule (saturation, dominant channel) recovers the labels."""
    source = create_source(dataset_config("synthetic"), "val")
    examples = [source[i] for i in range(24)]
    image = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
    label = np.stack([e["label"] for e in examples])
    assert set(np.unique(label)) == {0, 1, 2, 3}
    saturation = (image.max(-1) - image.min(-1)) / np.maximum(image.max(-1), 1e-6)
    # Discs are red, rectangles green, triangles blue; the background is nearly grey.
    rule = np.where(saturation < 0.4, 0, image.argmax(-1) + 1)
    assert (rule == label).mean() > 0.95
    for cls in (1, 2, 3):
        assert (rule == label)[label == cls].mean() > 0.98


def test_synthetic_one_channel():
    source = create_source(dataset_config("synthetic", num_channels=1, image_size=16), "test")
    assert source[0]["image"].shape == (16, 16, 1) and source.info.num_channels == 1


@pytest.mark.parametrize(
    "overrides, split, message",
    [
        ({}, "holdout", "Unknown split"),
        (dict(num_channels=2), "train", "1 or 3 channels"),
        (dict(num_classes=5), "train", "4 classes"),
        (dict(num_val=0), "val", "empty"),
        (dict(min_shapes=3, max_shapes=2), "train", "min_shapes"),
    ],
)
def test_synthetic_errors(overrides, split, message):
    with pytest.raises(ValueError, match=message):
        create_source(dataset_config("synthetic", **overrides), split)


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown key"):
        dataset_config("synthetic", num_trian=5)
    with pytest.raises(ValueError, match="image_size"):
        dataset_config("synthetic", image_size=(0, 4))
    config = dataset_config("synthetic")
    config.source = "s3"
    with pytest.raises(ValueError, match="source='s3'"):
        create_source(config, "train")


# ---------------------------------------------------------------------------------------------
# Folder


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, n=5, size=(12, 16), channels=1, seed=0, raw_values=(0, 255), base=""):
    """Writes `n` image/mask pairs under root/base; returns {stem: (image, raw mask)}."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for i in range(n):
        shape = size + (channels,) if channels > 1 else size
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        mask = np.asarray(raw_values, np.uint8)[rng.integers(0, len(raw_values), size=size)]
        save(os.path.join(root, base, "images", f"img{i}.png"), image)
        save(os.path.join(root, base, "masks", f"img{i}.png"), mask)
        pairs[f"img{i}"] = (image, mask)
    return pairs


def folder_config(root, **overrides):
    defaults = dict(
        path=str(root),
        num_classes=2,
        value_map={0: 0, 255: 1},
        num_channels=1,
        image_size=(12, 16),
        val_fraction=0.4,
    )
    defaults.update(overrides)
    return dataset_config("folder", **defaults)


def test_folder_value_map_and_seeded_split(tmp_path):
    pairs = make_folder(tmp_path)
    config = folder_config(tmp_path)
    train, val = create_source(config, "train"), create_source(config, "val")
    assert (len(train), len(val)) == (3, 2)
    stems = [p.stem for p in train.pairs] + [p.stem for p in val.pairs]
    assert sorted(stems) == sorted(pairs)
    assert [p.stem for p in create_source(config, "val").pairs] == [p.stem for p in val.pairs]
    example = train[0]
    image, raw = pairs[train.pairs[0].stem]
    np.testing.assert_array_equal(example["image"][..., 0], image)
    np.testing.assert_array_equal(example["label"], (raw == 255).astype(np.uint8))


def test_folder_cache_keeps_decoded_examples_read_only(tmp_path):
    make_folder(tmp_path)
    cached = create_source(folder_config(tmp_path, cache=True), "train")
    plain = create_source(folder_config(tmp_path), "train")
    first = cached[1]
    assert cached[1] is first and not first["image"].flags.writeable
    for key in ("image", "label"):
        np.testing.assert_array_equal(first[key], plain[1][key])


def test_folder_subfolder_splits_palette_masks_and_metadata(tmp_path):
    """RGB colour-coded masks decoded by a palette from dataset.json, with a void colour."""
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            classes = rng.integers(0, 3, size=(10, 10))
            rgb = np.asarray(palette, np.uint8)[classes]
            rgb[0, 0] = (255, 255, 255)  # void
            save(
                os.path.join(tmp_path, split, "images", f"{i}.jpg"),
                rng.integers(0, 256, (10, 10, 3), dtype=np.uint8),
            )
            save(os.path.join(tmp_path, split, "masks", f"{i}.png"), rgb)
    meta = {
        "class_names": ["bg", "red", "green"],
        "palette": palette,
        "void_values": [[255, 255, 255]],
    }
    with open(os.path.join(tmp_path, "dataset.json"), "w") as f:
        json.dump(meta, f)
    config = dataset_config("folder", path=str(tmp_path), image_size=10)
    train = create_source(config, "train")
    assert len(train) == 3 and len(create_source(config, "val")) == 2
    assert train.info.class_names == ("bg", "red", "green") and train.info.num_classes == 3
    label = train[0]["label"]
    assert label[0, 0] == 255 and set(np.unique(label)) <= {0, 1, 2, 255}
    with pytest.raises(ValueError, match=r"\(split_subfolders layout\) has no 'test' split; it "
                       "has train, val"):
        create_source(config, "test")


def test_palette_mode_masks_are_class_indices(tmp_path):
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    pil = Image.fromarray(mask).convert("P")
    os.makedirs(tmp_path / "masks")
    pil.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (253 * 3))
    pil.save(tmp_path / "masks" / "a.png")
    save(str(tmp_path / "images" / "a.png"), np.zeros((2, 2, 3), np.uint8))
    config = dataset_config("folder", path=str(tmp_path), num_classes=3, val_fraction=0.0)
    np.testing.assert_array_equal(create_source(config, "train")[0]["label"], mask)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_mask", r"1 image\(s\) without a mask.*img4.png"),
        ("no_image", r"1 mask\(s\) without an image.*img4.png"),
        ("size", r"size mismatch \(WxH\): .*images/img1.png is 16x12, .*masks/img1.png is 5x5"),
        ("channels", r"img2.png has 3 channel\(s\).*num_channels=3"),
        ("unreadable", r"unreadable file.*img3.png"),
        ("missing_dir", "does not exist"),
        ("no_classes", r"No class information .*values 0 \(\d+ px\), 255 \(\d+ px\); e.g. "
                       r"--config.dataset.num_classes=2 "
                       r"--config.dataset.value_map='\{0: 0, 255: 1\}'"),
    ],
)
def test_folder_errors_name_the_files(tmp_path, breakage, message):
    make_folder(tmp_path)
    config = folder_config(tmp_path, val_fraction=0.0)
    if breakage == "no_mask":
        os.remove(tmp_path / "masks" / "img4.png")
    elif breakage == "no_image":
        os.remove(tmp_path / "images" / "img4.png")
    elif breakage == "size":
        save(str(tmp_path / "masks" / "img1.png"), np.zeros((5, 5), np.uint8))
    elif breakage == "channels":
        save(str(tmp_path / "images" / "img2.png"), np.zeros((12, 16, 3), np.uint8))
    elif breakage == "unreadable":
        (tmp_path / "images" / "img3.png").write_bytes(b"not a png")
    elif breakage == "missing_dir":
        config = folder_config(tmp_path / "nowhere")
    elif breakage == "no_classes":
        config = folder_config(tmp_path, num_classes=None, value_map=None)
    with pytest.raises(ValueError, match=message):
        create_source(config, "train")


def test_mask_values_outside_the_mapping_fail_on_read(tmp_path):
    make_folder(tmp_path, raw_values=(0, 128, 255))
    source = create_source(folder_config(tmp_path, val_fraction=0.0), "train")
    with pytest.raises(ValueError, match=r"img0.png: mask values \[128\] are not in the value"):
        source[0]
    # Declared void: now they read as ignore_index.
    source = create_source(folder_config(tmp_path, val_fraction=0.0, void_values=(128,)), "train")
    assert 255 in np.unique(source[0]["label"])


def test_label_mapper_for_presets():
    pets = dataset_config("oxford_iiit_pet")
    mapper = LabelMapper(3, 255, parse_value_map(pets.value_map), pets.void_values)
    np.testing.assert_array_equal(mapper(np.array([[1, 2, 3]])), [[0, 1, 2]])
    city = dataset_config("cityscapes_tfds")
    mapper = LabelMapper(19, 255, parse_value_map(city.value_map), city.void_values)
    # road, sky, bicycle; unlabeled and parking are void.
    np.testing.assert_array_equal(mapper(np.array([7, 23, 33, 0, 9])), [0, 10, 18, 255, 255])
    identity = LabelMapper(3, 255)
    np.testing.assert_array_equal(identity(np.array([0, 2, 255])), [0, 2, 255])
    with pytest.raises(ValueError, match=r"not class indices 0..2"):
        identity(np.array([3]))
    # A config saved as JSON turns int keys into strings; they still parse.
    assert parse_value_map({"0": 0, "255": "1"}) == {0: 0, 255: 1}


# ---------------------------------------------------------------------------------------------
# tfds (array_record, no TensorFlow)


def test_tfds_round_trip_matches_the_folder(tmp_path):
    from flaxseg.data.tfds import prepare_folder_dataset

    make_folder(tmp_path / "folder")
    config = folder_config(tmp_path / "folder", class_names=("membrane", "interior"))
    data_dir = str(tmp_path / "tfds")
    prepare_folder_dataset(config, name="tiny_cells", data_dir=data_dir)
    tfds_config = dataset_config("tiny_cells", data_dir=data_dir, image_size=(12, 16))
    # Classes and channels come from the prepared dataset's metadata.
    assert tfds_config.num_classes == 2 and tfds_config.num_channels == 1
    for split in ("train", "val"):
        folder_source, tfds_source = create_source(config, split), create_source(tfds_config, split)
        assert tfds_source.info.class_names == ("membrane", "interior")
        folder_examples = {p.stem: folder_source[i] for i, p in enumerate(folder_source.pairs)}
        assert len(tfds_source) == len(folder_examples)
        for i in range(len(tfds_source)):
            # Records come back in key-hashed order: match them up by content.
            example = tfds_source[i]
            matches = [
                s
                for s, e in folder_examples.items()
                if np.array_equal(e["image"], example["image"])
            ]
            assert len(matches) == 1
            np.testing.assert_array_equal(folder_examples[matches[0]]["label"], example["label"])
    with pytest.raises(ValueError, match=r"has no split 'test'.*\['train', 'val'\]"):
        create_source(tfds_config, "test")
    assert not check_dataset(tfds_config).problems  # an absent test split is no problem
    batch = next(
        create_train_iterator(
            create_source(tfds_config, "train"),
            batch_size=2,
            seed=0,
            augment=augment_config(),
            image_size=(8, 8),
        )
    )
    # The host batch: uint8 on a canvas of the images' size, labels in uint8.
    assert batch["image"].dtype == batch["label"].dtype == np.uint8
    assert batch["image"].shape == (2, *batch["size"][0], 1)


@pytest.mark.parametrize(
    "name, message",
    [
        ("oxford_iiit_pet", "tfds build oxford_iiit_pet"),
        ("cityscapes_tfds", "gtFine_trainvaltest.zip"),
        ("not_prepared_here", "python -m flaxseg.data prepare"),
    ],
)
def test_unprepared_tfds_dataset_fails_with_instructions(tmp_path, name, message):
    config = dataset_config(name, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        create_source(config, "train")


@pytest.mark.parametrize(
    "name, image_key, label_key, raw, expected",
    [
        # Pets' trimap: 1 pet, 2 background, 3 border.
        ("oxford_iiit_pet", "image", "segmentation_mask", [1, 2, 3, 2], [0, 1, 2, 1]),
        # Cityscapes labelIds -> trainIds: road, car, unlabeled (void), bicycle.
        ("cityscapes_tfds", "image_left", "segmentation_label", [7, 26, 0, 33], [0, 13, 255, 18]),
    ],
)
def test_registered_tfds_dataset_maps_its_labels(
    tmp_path, name, image_key, label_key, raw, expected
):
    """Registered datasets are read through `as_data_source` (mocked: no data offline)."""
    import tensorflow_datasets as tfds

    records = [
        {
            image_key: np.full((3, 4, 3), i, np.uint8),
            label_key: np.tile(np.asarray(raw, np.uint8), (3, 1))[..., None],
        }
        for i in range(3)
    ]
    splits = []

    def as_data_source(self, split, **kwargs):
        splits.append(split)
        return records

    with (
        tfds.testing.mock_data(as_data_source_fn=as_data_source),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        source = create_source(dataset_config(name, data_dir=str(tmp_path)), "val")
    assert splits == [{"oxford_iiit_pet": "test", "cityscapes_tfds": "validation"}[name]]
    assert len(source) == 3 and source.info.ignore_index == 255
    np.testing.assert_array_equal(source[2]["image"], records[2][image_key])
    np.testing.assert_array_equal(source[0]["label"], np.tile(expected, (3, 1)))
    batch = next(create_eval_iterator(source, batch_size=2, image_size=(4, 4)))
    assert batch["image"].shape == (2, 4, 4, 3) and batch["label"].dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Identical batch format across sources


def test_all_sources_yield_identical_batch_format(tmp_path):
    make_folder(tmp_path, channels=3)
    configs = [dataset_config("synthetic", image_size=16), folder_config(tmp_path, num_channels=3)]
    for config in configs:
        source = create_source(config, "val")
        train = next(
            create_train_iterator(
                source, batch_size=2, seed=0, augment=augment_config(), image_size=(8, 12)
            )
        )
        evals = next(create_eval_iterator(source, batch_size=2, image_size=(8, 12)))
        # What the host sends: uint8 on a canvas of the images' size, and metadata.
        canvas = (16, 16) if config.source == "synthetic" else (12, 16)
        assert {k: (v.dtype, v.shape) for k, v in train.items()} == {
            "image": (np.uint8, (2, *canvas, 3)), "label": (np.uint8, (2, *canvas)),
            "valid": (np.int32, (2, 2)), "size": (np.int32, (2, 2)),
            "epoch": (np.int32, (2,)), "index": (np.int32, (2,)),
        }
        assert {k: (v.dtype, v.shape) for k, v in evals.items()} == {
            "image": (np.uint8, (2, 8, 12, 3)), "label": (np.uint8, (2, 8, 12)),
            "valid": (np.int32, (2, 2)),
        }


# ---------------------------------------------------------------------------------------------
# check


def test_check_reports_every_problem_without_touching_files(tmp_path, capsys):
    make_folder(tmp_path, n=6, raw_values=(0, 255))
    os.remove(tmp_path / "masks" / "img5.png")
    save(str(tmp_path / "masks" / "extra.png"), np.zeros((12, 16), np.uint8))
    save(str(tmp_path / "masks" / "img1.png"), np.zeros((7, 7), np.uint8))
    save(str(tmp_path / "masks" / "img2.png"), np.full((12, 16), 77, np.uint8))
    data = (tmp_path / "images" / "img3.png").read_bytes()
    (tmp_path / "images" / "img3.png").write_bytes(data[: len(data) // 2])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    code = cli_main(
        [
            "check",
            str(tmp_path),
            "--num-classes",
            "2",
            "--value-map",
            "0:0,255:1",
            "--num-channels",
            "1",
            "--val-fraction",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "image(s) without a mask" in out and "img5.png" in out
    assert "mask(s) without an image" in out and "extra.png" in out
    assert "size mismatch" in out and "img1.png" in out
    assert "mask values [77] are not in the value mapping" in out and "img2.png" in out
    assert ("images/img3.png: cannot decode this image file (OSError: image file is truncated)"
            in out)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_check_counts_and_histogram(tmp_path):
    pairs = make_folder(tmp_path, n=4)
    report = check_dataset(folder_config(tmp_path, val_fraction=0.25))
    assert [(s.name, s.count) for s in report.splits] == [("train", 3), ("val", 1)]
    masks = np.stack([m for _, m in pairs.values()])
    np.testing.assert_array_equal(report.class_pixels, [(masks == 0).sum(), (masks == 255).sum()])
    assert report.void_pixels == 0 and not report.problems
    text = format_report(report)
    assert "No problems found." in text and "12x16: 3" in text


def test_check_channel_mismatch_and_missing_mapping(tmp_path, capsys):
    make_folder(tmp_path, n=2)
    assert cli_main(["check", str(tmp_path), "--num-channels", "3"]) == 1
    out = capsys.readouterr().out
    assert "have 1 channel(s) but the config says num_channels=3" in out
    assert "No class information" in out and "Raw mask values (value: pixels): 0:" in out


def test_check_synthetic_and_unknown_target(capsys):
    assert cli_main(["check", "synthetic", "--max-examples", "3"]) == 0
    assert "No problems found." in capsys.readouterr().out
    assert cli_main(["check", "./no/such/folder"]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real ISBI 2012 data (skips unless FLAXSEG_ISBI_DIR is set)


def test_isbi2012(isbi_dir, capsys):
    config = dataset_config("isbi2012", path=isbi_dir)
    train, val = create_source(config, "train"), create_source(config, "val")
    assert (len(train), len(val)) == (24, 6)
    example = train[0]
    assert example["image"].shape == (512, 512, 1) and example["label"].shape == (512, 512)
    report = check_dataset(config)
    assert report.num_examples == 30 and not report.problems
    assert all(set(s.sizes) == {(512, 512)} for s in report.splits)
    membrane = report.class_pixels[0] / report.class_pixels.sum()
    assert 0.20 < membrane < 0.24
    assert cli_main(["check", isbi_dir, "--preset", "isbi2012"]) == 0
    assert "membrane" in capsys.readouterr().out
    augment = augment_config(rot90=True, vflip=True)
    host = next(create_train_iterator(train, batch_size=2, seed=0, augment=augment,
                                      image_size=64))
    assert host["image"].shape == (2, 512, 512, 1) and host["image"].dtype == np.uint8
    batch = jax.jit(augment_lib.train_fn(augment, seed=0, image_size=64,
                                         ignore_index=255))(host)
    assert batch["image"].shape == (2, 64, 64, 1)
