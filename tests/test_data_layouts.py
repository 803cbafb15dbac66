"""The dataset layouts users have (flaxseg.data.layouts): detection, pairing, splits, label
encodings, batches equal to the plain layout's, every error message, and a run on a layout
dataset whose config reads back from its checkpoint as it trained."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_env, file_mtimes
from layout_trees import WRITERS, write_cityscapes, write_images_by_split, write_plain
from PIL import Image

from flaxseg.data import augment_config, create_source, dataset_config, resolve_dataset_config
from flaxseg.data.__main__ import main as data_cli
from flaxseg.data.balance import ClassBalance, class_balance
from flaxseg.data.base import LabelMapper
from flaxseg.data.check import check_dataset, format_report
from flaxseg.data.folder import load_image
from flaxseg.data.pipeline import create_eval_iterator, create_train_iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(name, root, seed=0):
    return WRITERS[name](str(root), np.random.default_rng(seed))


def _config(tree, **overrides):
    return dataset_config("folder", path=tree.path, image_size=(12, 16),
                          **{**tree.overrides, **overrides})


def _by_split(tree, config):
    """split -> the tree's examples of that split, as flaxseg must split them."""
    if "pool" not in tree.examples:
        return tree.examples
    pool = {stem: (stem, images, label) for stem, images, label in tree.examples["pool"]}
    return {split: [pool[p.stem] for p in create_source(config, split).pairs]
            for split in ("train", "val")}


def _batches(source):
    evals = list(create_eval_iterator(source, batch_size=2, image_size=(12, 16)))
    train = create_train_iterator(source, batch_size=2, seed=3, augment=augment_config(),
                                  image_size=(10, 12))
    return evals + [next(train) for _ in range(3)]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_layout_is_detected_split_mapped_and_batches_like_the_plain_layout(name, tmp_path):
    tree = _tree(name, tmp_path / "tree")
    config = _config(tree)
    resolved = resolve_dataset_config(config)
    assert resolved.layout == tree.layout and resolved.num_classes == tree.num_classes
    report = check_dataset(config)
    assert report.layout == tree.layout and not report.problems, format_report(report)
    expected = _by_split(tree, config)
    assert {s.name: s.count for s in report.splits} == {s: len(e) for s, e in expected.items()}
    # The same examples written plainly: class-index PNG masks, images copied byte for byte.
    plain = write_plain(str(tmp_path / "plain"), expected)
    plain_config = dataset_config("folder", path=str(tmp_path / "plain"), image_size=(12, 16),
                                  num_classes=tree.num_classes)
    for split, examples in expected.items():
        source = create_source(config, split)
        assert [p.stem for p in source.pairs] == [stem for stem, _, _ in examples]
        for i, (_, images, label) in enumerate(examples):
            np.testing.assert_array_equal(source[i]["label"], label)
            stacked = np.concatenate([load_image(p) for p in images], axis=-1)
            np.testing.assert_array_equal(source[i]["image"], stacked)
        assert len(plain[split]) == len(examples)
        for got, want in zip(_batches(source), _batches(create_source(plain_config, split)),
                             strict=True):
            for key in ("image", "label"):
                np.testing.assert_array_equal(got[key], want[key])


def test_check_names_the_layout_and_counts(tmp_path, capsys):
    tree = _tree("camvid", tmp_path)
    before = file_mtimes(tmp_path)
    assert data_cli(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layout: camvid\n" in out and "11 classes, ignore_index 255" in out
    for line in ("train          3", "val            2", "test           2", "total          7"):
        assert line in out
    assert "sign_symbol" in out and "weight" in out and "No problems found." in out
    assert file_mtimes(tmp_path) == before  # nothing written
    assert tree.layout == "camvid"


def test_presets_forced_layouts_and_wrappers(tmp_path):
    _tree("voc_aug", tmp_path / "voc")
    # The devkit holds both: detection takes the augmented set; a preset or layout forces one.
    assert resolve_dataset_config(dataset_config("folder", path=str(tmp_path / "voc"))
                                  ).layout == "voc_aug"
    voc = resolve_dataset_config(dataset_config("voc2012", path=str(tmp_path / "voc")))
    assert voc.layout == "voc2012" and voc.path.endswith(os.path.join("VOCdevkit", "VOC2012"))
    assert voc.class_names[15] == "person" and voc.palette[15] == (192, 128, 128)
    assert len(create_source(voc, "train")) == 3
    with pytest.raises(ValueError, match=r"has no 'test' split; it has train, val"):
        create_source(voc, "test")
    _tree("camvid", tmp_path / "camvid")
    with pytest.raises(ValueError, match=r"not in the ade20k layout .*lacks images/training, "
                                         r"annotations/training"):
        resolve_dataset_config(dataset_config("ade20k", path=str(tmp_path / "camvid")))
    with pytest.raises(ValueError, match=r"Unknown dataset layout 'camvid2'; layouts: 'auto'"):
        resolve_dataset_config(dataset_config("folder", path=str(tmp_path / "camvid"),
                                              layout="camvid2"))


def test_cityscapes_reads_train_ids_when_they_were_made(tmp_path):
    tree = write_cityscapes(str(tmp_path), np.random.default_rng(1), train_ids=True)
    config = resolve_dataset_config(dataset_config("cityscapes", path=str(tmp_path)))
    assert config.mask_suffix == "_gtFine_labelTrainIds.png" and config.value_map is None
    source = create_source(config, "val")
    for i, (_, _, label) in enumerate(tree.examples["val"]):
        np.testing.assert_array_equal(source[i]["label"], label)


def test_reduce_zero_label_is_a_general_option():
    mapper = LabelMapper(3, 255, reduce_zero_label=True)
    np.testing.assert_array_equal(mapper(np.array([0, 1, 3, 255])), [255, 0, 2, 255])
    with pytest.raises(ValueError, match=r"values \[4\] are not 0 \(void\) nor 1..3"):
        mapper(np.array([4]))
    with pytest.raises(ValueError, match="reduce_zero_label and value_map"):
        LabelMapper(3, 255, {0: 1}, reduce_zero_label=True)
    assert dataset_config("oxford_iiit_pet").reduce_zero_label is False


def test_median_frequency_weights_follow_eigen_and_fergus():
    balance = ClassBalance(3, 255)
    balance.add(np.array([[0, 0, 0, 1]]))  # 4 labelled pixels: classes 0 and 1
    balance.add(np.array([[0, 0, 255, 255]]))  # 2 labelled pixels: class 0
    # freq = pixels / labelled pixels of the images holding the class: 5/6, 1/4, absent.
    np.testing.assert_allclose(balance.frequencies(), [5 / 6, 1 / 4, 0])
    median = np.median([5 / 6, 1 / 4])
    np.testing.assert_allclose(balance.median_frequency_weights(),
                               [median / (5 / 6), median / (1 / 4), 0])
    assert balance.void_pixels == 2


@pytest.mark.parametrize("name", ["voc2012", "sbd", "cityscapes", "ade20k", "nnunet"])
def test_prepare_reads_each_kind_of_layout_into_tfds(name, tmp_path):
    """Lists (VOC, SBD's .mat), suffixes in city folders with labelIds, reduce_zero_label,
    channel files: the prepared records hold the examples the folder source reads."""
    tree = _tree(name, tmp_path / "tree")
    data_dir = str(tmp_path / "tfds")
    args = ["prepare", tree.path, "--name", "tiny", "--data-dir", data_dir]
    for key, value in tree.overrides.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert data_cli(args) == 0
    prepared = dataset_config("tiny", data_dir=data_dir)
    assert prepared.num_classes == tree.num_classes
    for split in ("train", "val"):
        folder, records = create_source(_config(tree), split), create_source(prepared, split)
        by_image = {folder[i]["image"].tobytes(): folder[i]["label"] for i in range(len(folder))}
        assert len(records) == len(by_image)
        for i in range(len(records)):  # records come back in key-hashed order
            np.testing.assert_array_equal(records[i]["label"],
                                          by_image[records[i]["image"].tobytes()])


# -- what check and a run say when something is wrong ----------------------------------------


def test_no_layout_and_empty_root_are_one_problem_each(tmp_path, capsys):
    assert data_cli(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("is empty") == 1 and "1 problem(s):" in out
    for name in ("voc2012", "cityscapes", "ade20k", "camvid", "mmseg", "nnunet",
                 "images_by_split", "split_subfolders", "pooled"):
        assert f"\n  {name} " in out
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert data_cli(["check", str(tmp_path)]) == 1
    assert "holds 1 folder(s), no image files, 1 other file(s)" in capsys.readouterr().out


def test_an_empty_split_names_the_folders_it_looked_in(tmp_path):
    _tree("images_by_split", tmp_path)
    for stem in ("val_000", "val_001"):  # val/ left with folders and no image files
        for kind in ("images", "masks"):
            os.remove(tmp_path / kind / "val" / f"{stem}.png")
    for sub in ("a", "b", "c"):
        (tmp_path / "images" / "val" / sub).mkdir()
    with pytest.raises(ValueError) as error:
        create_source(dataset_config("folder", path=str(tmp_path)), "val")
    message = str(error.value)
    assert "split 'val' of" in message and "(images_by_split layout) is empty" in message
    assert f"{tmp_path / 'images' / 'val'} holds 3 folder(s), no image files" in message
    assert f"{tmp_path / 'masks' / 'val'} is empty" in message and "  camvid " in message


def test_check_without_classes_proposes_them_and_warns_on_binary_masks(tmp_path, capsys):
    tree = _tree("pooled", tmp_path / "multi")
    assert data_cli(["check", tree.path, "--val-fraction", "0.4"]) == 0  # not a failure
    out = capsys.readouterr().out
    assert "No class information" in out and "Raw mask values (value: pixels): 0:" in out
    assert "would read with: --num-classes 3 (in a training config: " \
           "--config.dataset.num_classes=3;" in out
    binary = tmp_path / "binary"
    write_plain(str(binary), {"pool": [(f"c{i}", np.zeros((12, 16, 3), np.uint8),
                                        np.where(np.eye(12, 16) > 0, 255, 0).astype(np.uint8))
                                       for i in range(3)]})
    assert data_cli(["check", str(binary), "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "--num-classes 2 --value-map 0:0,255:1" in out
    assert "Warning: the masks hold only 0 and 255; 255 is void (ignore_index) by default" in out
    assert data_cli(["check", str(binary), "--val-fraction", "0", "--num-classes", "2"]) == 0
    assert "Warning: the masks hold only 0 and 255" in capsys.readouterr().out


def test_training_without_classes_fails_before_anything_is_written(tmp_path):
    from flaxseg import configs
    from flaxseg.train.loop import train_and_evaluate

    _tree("split_subfolders", tmp_path / "data")
    config = configs.get_config("folder")
    config.dataset.path = str(tmp_path / "data")
    with pytest.raises(ValueError, match=r"No class information for .*\(split_subfolders layout\)"
                                         r".*sampled masks hold the values 0 \(.* px\), 1 .*; "
                                         r"e.g. --config.dataset.num_classes=3"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_check_attributes_each_broken_file_and_lists_bad_mask_values(tmp_path, capsys):
    tree = _tree("camvid", tmp_path)
    base = tmp_path / "CamVid"
    mask = base / "trainannot" / f"{tree.examples['train'][1][0]}.png"
    mask.write_bytes(mask.read_bytes()[:-40])  # a truncated mask beside an intact image
    image = base / "val" / f"{tree.examples['val'][0][0]}.png"
    image.write_bytes(image.read_bytes()[:-40])
    bad = base / "testannot" / f"{tree.examples['test'][1][0]}.png"
    Image.fromarray(np.full((12, 16), 40, np.uint8)).save(bad)
    before = file_mtimes(tmp_path)
    assert data_cli(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"  - {mask}: cannot decode this mask file (OSError: image file is truncated)" in out
    assert f"  - {image}: cannot decode this image file" in out
    assert (f"  - {bad}: mask values [40] are not class indices 0..10, void values (11,) nor "
            "ignore_index 255") in out
    assert "3 problem(s)" in out and file_mtimes(tmp_path) == before
    # Reading them for training names the same files, and the command that finds them all.
    config = dataset_config("camvid", path=str(tmp_path))
    for split, path in (("train", mask), ("val", image), ("test", bad)):
        source = create_source(config, split)
        with pytest.raises(ValueError, match=str(path)) as error:
            next(create_eval_iterator(source, batch_size=4, image_size=12))
        if split != "test":
            assert f"`python -m flaxseg.data check {base}` finds every such file" in str(
                error.value)


def test_layout_specific_problems_name_the_files(tmp_path):
    _tree("nnunet", tmp_path / "nn")
    base = tmp_path / "nn" / "Dataset004_Cells"
    os.remove(base / "imagesTr" / "cell_003_0001.png")
    with pytest.raises(ValueError, match=r"1 case\(s\) of .*imagesTr miss channel files .*"
                                         r"cell_003 \(has \[0\]\)"):
        create_source(dataset_config("folder", path=str(base), val_fraction=0.4), "train")
    meta = json.loads((base / "dataset.json").read_text())
    meta["labels"]["tumour"] = [1, 2]
    (base / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"region-based labels \['tumour'\] are not supported"):
        resolve_dataset_config(dataset_config("folder", path=str(base)))
    _tree("voc2012", tmp_path / "voc")
    os.remove(tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000039.png")
    with pytest.raises(ValueError, match=r"1 id\(s\) of .*train.txt have no mask file: .*"
                                         r"SegmentationClass/2007_000039.png"):
        create_source(dataset_config("voc2012", path=str(tmp_path / "voc")), "train")


# -- configs: the command line, and the round trip through a checkpoint's JSON --------------


def _json_round_trip(config):
    """What a checkpoint's config item (orbax JsonSave: json.dumps) reads back as."""
    from flaxseg.train.config import restored_config

    return restored_config(json.loads(json.dumps(config.to_dict())))


@pytest.mark.parametrize("name", ["synthetic", "tfds", *sorted(WRITERS)])
def test_a_config_read_back_from_json_is_the_config_that_trained(name, tmp_path):
    from flaxseg import configs

    if name == "synthetic":
        dataset = dataset_config("synthetic", image_size=(500,), num_train=4)
    elif name == "tfds":
        from flaxseg.data.tfds import prepare_folder_dataset

        tree = _tree("pooled", tmp_path / "folder")
        prepare_folder_dataset(_config(tree), name="tiny_pool", data_dir=str(tmp_path / "tfds"))
        dataset = dataset_config("tiny_pool", data_dir=str(tmp_path / "tfds"))
    else:
        dataset = _config(_tree(name, tmp_path / "tree"))
    config = configs.get_config("folder")
    config.dataset = resolve_dataset_config(dataset)
    config.loss.class_weights = (1.0,) * config.dataset.num_classes
    restored = _json_round_trip(config)
    assert restored.to_dict() == config.to_dict()  # tuples stay tuples, int keys ints
    assert resolve_dataset_config(restored.dataset).to_dict() == config.dataset.to_dict()
    for split in ("train", "val"):
        a, b = create_source(config.dataset, split)[0], create_source(restored.dataset, split)[0]
        np.testing.assert_array_equal(a["label"], b["label"])
    if name == "synthetic":
        assert config.dataset.image_size == (500, 500)  # --config.dataset.image_size=500


def test_a_folder_config_saved_before_layouts_still_reads_its_dataset_json(tmp_path):
    """Such a run saved `"void_values": []` meaning "from dataset.json" (issue 14's case)."""
    from flaxseg import configs
    from flaxseg.train.config import restored_config

    tree = _tree("images_by_split", tmp_path)
    saved = configs.get_config("folder").to_dict()
    saved["dataset"] = {key: value for key, value in saved["dataset"].items() if key not in
                        ("layout", "image_suffix", "mask_suffix", "reduce_zero_label")}
    saved["dataset"].update(path=tree.path, void_values=[], num_channels=3,
                            images_dir="images", masks_dir="masks")
    restored = restored_config(json.loads(json.dumps(saved)))
    resolved = resolve_dataset_config(restored.dataset)
    assert resolved.void_values == (11,) and resolved.num_classes == 11
    assert resolved.layout == "images_by_split"


def test_switching_the_dataset_on_the_command_line_says_what_to_write(tmp_path):
    from flaxseg import configs
    from flaxseg.train.config import validate_config

    for args in ([], ["--config=flaxseg/configs/test.py"]):
        result = subprocess.run(
            [sys.executable, "-m", "flaxseg.train", *args, "--config.dataset.name=folder",
             f"--config.dataset.path={tmp_path}", f"--workdir={tmp_path / 'run'}"],
            cwd=REPO_ROOT, env=child_env(1), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert ("Error: the config's dataset has no key 'path'" in result.stderr
                and "--config=flaxseg/configs/folder.py --config.dataset.path="
                    f"{tmp_path}`" in result.stderr), result.stderr
    config = configs.get_config("test")
    config.dataset.name = "folder"  # the name alone: the keys are still synthetic's
    with pytest.raises(ValueError, match=r"names 'folder' \(a folder dataset\) but holds the keys "
                                         r"of a synthetic dataset.*configs/folder.py"):
        validate_config(config, num_devices=1)
    assert not (tmp_path / "run").exists()


# -- a run on a layout dataset, evaluated from its checkpoint --------------------------------


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """2 steps of a tiny U-Net on the street-scene tree (images/<split>/ + masks/<split>/,
    void 11 from dataset.json), median-frequency class weights."""
    from flaxseg import configs
    from flaxseg.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("layout_run")
    write_images_by_split(str(root / "data"), np.random.default_rng(0))
    config = configs.get_config("folder")
    config.model.update(features=4, depth=2, norm=None)
    config.update_from_flattened_dict({
        "dataset.path": str(root / "data"), "dataset.image_size": (16,),
        "loss.class_weights": "median_frequency", "parallel": "jit", "batch_size": 2,
        "num_train_steps": 2, "optimizer.warmup_steps": 0, "eval_every_steps": 2,
        "checkpoint_every_steps": 2, "log_every_steps": 1, "num_grid_images": 1})
    return root, train_and_evaluate(config, str(root / "run"))


def test_a_layout_run_saves_its_resolved_dataset_and_class_weights(layout_run):
    from flaxseg.train.checkpoint import load_for_inference

    root, summary = layout_run
    assert summary["steps"] == 2
    _, _, saved = load_for_inference(root / "run")
    assert saved.dataset.layout == "images_by_split" and saved.dataset.void_values == (11,)
    assert saved.dataset.path == str(root / "data") and saved.dataset.image_size == (16, 16)
    train = create_source(saved.dataset, "train")
    weights = tuple(class_balance(train).median_frequency_weights())
    assert saved.loss.class_weights == pytest.approx(weights)
    report = check_dataset(dataset_config("folder", path=str(root / "data")))
    np.testing.assert_allclose(report.train_balance().median_frequency_weights(), weights)
    cached = json.loads((root / "run" / "class_weights.json").read_text())
    assert cached["weights"] == pytest.approx(weights) and sum(cached["class_pixels"]) > 0


def test_evaluate_reads_a_layout_run_on_its_own_data(layout_run):
    root, _ = layout_run
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.evaluate", f"--workdir={root / 'run'}", "--split=test"],
        cwd=str(root), env=child_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "on folder/test (2 images" in result.stdout
    assert "pixel acc  mean acc  mean IU  f.w. IU" in result.stdout


def test_a_truncated_mask_ends_training_with_one_line_naming_it(tmp_path):
    tree = _tree("split_subfolders", tmp_path / "data")
    mask = tmp_path / "data" / "train" / "masks" / f"{tree.examples['train'][0][0]}.png"
    mask.write_bytes(mask.read_bytes()[:-40])
    before = file_mtimes(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.train", "--config=flaxseg/configs/folder.py",
         f"--config.dataset.path={tmp_path / 'data'}", "--config.dataset.num_classes=3",
         "--config.dataset.image_size=12", "--config.model.features=4",
         "--config.model.depth=2", "--config.parallel=jit", "--config.batch_size=2",
         "--config.num_train_steps=2", "--config.optimizer.warmup_steps=0",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=child_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error == [f"Error: {mask}: cannot decode this mask file (OSError: image file is "
                     f"truncated); replace or remove it. `python -m flaxseg.data check "
                     f"{tmp_path / 'data'}` finds every such file."], result.stderr
    assert "Traceback" not in result.stderr
    assert file_mtimes(tmp_path / "data") == before


def test_an_empty_split_counts_each_folder_against_its_own_suffix(tmp_path, capsys):
    _tree("mmseg", tmp_path)
    assert data_cli(["check", str(tmp_path), "--image-suffix", "_rgb.jpg",
                     "--mask-suffix", "_label.png"]) == 1
    out = capsys.readouterr().out
    for folder, suffix in (("img_dir", "_rgb.jpg"), ("ann_dir", "_label.png")):
        assert f"{tmp_path / folder / 'train'} holds 3 image file(s), 0 ending in {suffix!r}" in out
