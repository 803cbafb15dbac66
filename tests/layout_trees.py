"""Miniature dataset trees in the layouts users have, written by the tests themselves.

Each writer makes a few 12x16 examples with the dataset's real naming, folders, palettes,
suffixes and side files, and returns a `Tree`: the folder to point flaxseg at, the layout
it must be read as, the config overrides it needs, and per split the examples it holds
with the class labels flaxseg must read (void = 255). `write_plain` writes the same
examples as `split_subfolders` (or `pooled`) with class-index masks, the layout flaxseg
read before layouts existed: a layout's batches must equal the plain tree's.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
from PIL import Image

from flaxseg.data import classes

H, W = 12, 16
VOID = 255


@dataclasses.dataclass
class Tree:
    path: str
    layout: str
    num_classes: int
    # split ('pool' for a pooled layout) -> [(stem, image files, class labels uint8 [H, W])]
    examples: dict
    overrides: dict = dataclasses.field(default_factory=dict)


def _save(path, array, palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette([v for colour in palette for v in colour])
    img.save(path)


def _image(rng, path, channels=3):
    shape = (H, W, channels) if channels > 1 else (H, W)
    _save(path, rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def _write_text(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def _classes(rng, values, void_border=False):
    label = np.asarray(values, np.uint8)[rng.integers(0, len(values), (H, W))]
    if void_border:
        label[0, :] = VOID
    return label


def _voc_images_and_masks(rng, base, ids, aug_ids=()):
    """JPEGImages and SegmentationClass (palette PNGs, palette index = class, 255 border)."""
    labels = {}
    for stem in ids:
        _image(rng, os.path.join(base, "JPEGImages", f"{stem}.jpg"))
        labels[stem] = _classes(rng, range(21), void_border=True)
        indexed = Image.fromarray(labels[stem], mode="L").convert("P")
        indexed.putpalette([v for colour in classes.voc_palette(256) for v in colour])
        os.makedirs(os.path.join(base, "SegmentationClass"), exist_ok=True)
        indexed.save(os.path.join(base, "SegmentationClass", f"{stem}.png"))
    for stem in aug_ids:  # SBD images: JPEGImages has them, SegmentationClass does not
        _image(rng, os.path.join(base, "JPEGImages", f"{stem}.jpg"))
    return labels


VOC_TRAIN, VOC_VAL = ["2007_000032", "2007_000039", "2008_000008"], ["2007_000033", "2009_000012"]
SBD_EXTRA = ["2008_000002", "2008_000003"]


def write_voc2012(root, rng):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    labels = _voc_images_and_masks(rng, base, VOC_TRAIN + VOC_VAL)
    sets = os.path.join(base, "ImageSets", "Segmentation")
    _write_text(os.path.join(sets, "train.txt"), VOC_TRAIN)
    _write_text(os.path.join(sets, "val.txt"), VOC_VAL)
    _write_text(os.path.join(sets, "trainval.txt"), sorted(VOC_TRAIN + VOC_VAL))
    os.makedirs(os.path.join(base, "Annotations"))  # detection boxes: not read
    return Tree(root, "voc2012", 21, _split_examples(base, labels, VOC_TRAIN, VOC_VAL))


def _split_examples(base, labels, train, val):
    return {split: [(s, (os.path.join(base, "JPEGImages", f"{s}.jpg"),), labels[s]) for s in ids]
            for split, ids in (("train", train), ("val", val))}


def write_voc_aug(root, rng):
    tree = write_voc2012(root, rng)
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    labels = {s: label for split in tree.examples.values() for s, _, label in split}
    _voc_images_and_masks(rng, base, [], SBD_EXTRA)
    trainaug = sorted(VOC_TRAIN + SBD_EXTRA)
    for stem in trainaug:  # SegmentationClassAug: grey class-index PNGs
        labels.setdefault(stem, _classes(rng, range(21), void_border=True))
        _save(os.path.join(base, "SegmentationClassAug", f"{stem}.png"), labels[stem])
    _write_text(os.path.join(base, "ImageSets", "Segmentation", "trainaug.txt"), trainaug)
    return Tree(root, "voc_aug", 21, _split_examples(base, labels, trainaug, VOC_VAL))


def write_sbd(root, rng):
    from scipy.io import savemat

    base = os.path.join(root, "benchmark_RELEASE", "dataset")
    train, val = ["2008_000002", "2008_000003", "2008_000007"], ["2008_000009", "2008_000016"]
    examples = {}
    for split, ids in (("train", train), ("val", val)):
        _write_text(os.path.join(base, f"{split}.txt"), ids)
        examples[split] = []
        for stem in ids:
            image = _image(rng, os.path.join(base, "img", f"{stem}.jpg"))
            label = _classes(rng, range(21))  # SBD has no void border
            os.makedirs(os.path.join(base, "cls"), exist_ok=True)
            savemat(os.path.join(base, "cls", f"{stem}.mat"), {"GTcls": {
                "Segmentation": label, "CategoriesPresent": np.unique(label).astype(np.uint8)}})
            examples[split].append((stem, (image,), label))
    os.makedirs(os.path.join(base, "inst"))  # instance masks: not read
    return Tree(root, "sbd", 21, examples)


def write_cityscapes(root, rng, train_ids=False):
    examples = {}
    ids_to_train = np.full(256, VOID, np.uint8)
    for label_id, train_id in classes.CITYSCAPES_ID_TO_TRAIN_ID.items():
        ids_to_train[label_id] = train_id
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"]),
                          ("test", ["berlin"])):
        examples[split] = []
        for city in cities:
            for frame in (19, 20):
                stem = f"{city}_000000_{frame:06d}"
                image = _image(rng, os.path.join(root, "leftImg8bit", split, city,
                                                 f"{stem}_leftImg8bit.png"))
                gt = os.path.join(root, "gtFine", split, city, stem)
                label_ids = rng.integers(0, 34, (H, W)).astype(np.uint8)
                _save(f"{gt}_gtFine_labelIds.png", label_ids)
                _save(f"{gt}_gtFine_instanceIds.png", label_ids)  # not read
                _save(f"{gt}_gtFine_color.png", rng.integers(0, 256, (H, W, 3), np.uint8))
                _write_text(f"{gt}_gtFine_polygons.json", ["{}"])
                if train_ids:
                    _save(f"{gt}_gtFine_labelTrainIds.png", ids_to_train[label_ids])
                examples[split].append((stem, (image,), ids_to_train[label_ids]))
    _write_text(os.path.join(root, "README"), ["Cityscapes"])
    return Tree(root, "cityscapes", 19, examples)


def write_ade20k(root, rng):
    base = os.path.join(root, "ADEChallengeData2016")
    examples = {}
    for split, folder, count in (("train", "training", 3), ("val", "validation", 2)):
        examples[split] = []
        for i in range(count):
            stem = f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}"
            image = _image(rng, os.path.join(base, "images", folder, f"{stem}.jpg"))
            raw = rng.integers(0, 151, (H, W)).astype(np.uint8)  # 0 = other objects
            _save(os.path.join(base, "annotations", folder, f"{stem}.png"), raw)
            examples[split].append((stem, (image,), np.where(raw == 0, VOID, raw - 1)
                                    .astype(np.uint8)))
    _write_text(os.path.join(base, "objectInfo150.txt"), ["Idx\tRatio\tTrain\tVal\tName"])
    _write_text(os.path.join(base, "sceneCategories.txt"), ["ADE_train_00000001 airport"])
    return Tree(root, "ade20k", 150, examples)


def write_camvid(root, rng):
    base = os.path.join(root, "CamVid")
    examples = {}
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        examples[split], lines = [], []
        for i in range(count):
            stem = f"0001TP_{6690 + 30 * i:06d}" if split != "test" else f"Seq05VD_f{i:05d}"
            image = _image(rng, os.path.join(base, split, f"{stem}.png"))
            raw = rng.integers(0, 12, (H, W)).astype(np.uint8)  # 11 = unlabelled
            _save(os.path.join(base, f"{split}annot", f"{stem}.png"), raw)
            lines.append(f"/SegNet/CamVid/{split}/{stem}.png "
                         f"/SegNet/CamVid/{split}annot/{stem}.png")
            examples[split].append((stem, (image,), np.where(raw == 11, VOID, raw)
                                    .astype(np.uint8)))
        _write_text(os.path.join(base, f"{split}.txt"), lines)  # the tutorial's lists
    return Tree(root, "camvid", 11, examples)


def write_mmseg(root, rng):
    examples = {}
    for split, count in (("train", 3), ("val", 2)):
        examples[split] = []
        for i in range(count):
            stem = f"tile_{split}_{i}"
            image = _image(rng, os.path.join(root, "img_dir", split, f"{stem}_sat.jpg"))
            label = _classes(rng, range(3))
            _save(os.path.join(root, "ann_dir", split, f"{stem}_mask.png"), label)
            examples[split].append((stem, (image,), label))
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"class_names": ["background", "building", "road"]}, f)
    return Tree(root, "mmseg", 3, examples,
                overrides=dict(image_suffix="_sat.jpg", mask_suffix="_mask.png"))


def write_nnunet(root, rng):
    base = os.path.join(root, "Dataset004_Cells")
    pool = []
    for i in range(5):
        case = f"cell_{i:03d}"
        images = tuple(_image(rng, os.path.join(base, "imagesTr", f"{case}_{c:04d}.png"), 1)
                       for c in range(2))
        raw = rng.integers(0, 3, (H, W)).astype(np.uint8)  # 2 = the "ignore" label
        _save(os.path.join(base, "labelsTr", f"{case}.png"), raw)
        pool.append((case, images, np.where(raw == 2, VOID, raw).astype(np.uint8)))
    for i in range(2):  # the unlabelled test cases: not read
        for c in range(2):
            _image(rng, os.path.join(base, "imagesTs", f"cell_{100 + i:03d}_{c:04d}.png"), 1)
    with open(os.path.join(base, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "DAPI", "1": "GFP"},
                   "labels": {"background": 0, "cell": 1, "ignore": 2},
                   "numTraining": 5, "file_ending": ".png", "name": "Cells"}, f)
    return Tree(root, "nnunet", 2, {"pool": pool}, overrides=dict(val_fraction=0.4))


def write_images_by_split(root, rng):
    """The street-scene case: images/<split>/ beside masks/<split>/, void 11 from dataset.json."""
    examples = {}
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        examples[split] = []
        for i in range(count):
            stem = f"{split}_{i:03d}"
            image = _image(rng, os.path.join(root, "images", split, f"{stem}.png"))
            raw = rng.integers(0, 12, (H, W)).astype(np.uint8)
            _save(os.path.join(root, "masks", split, f"{stem}.png"), raw)
            examples[split].append((stem, (image,), np.where(raw == 11, VOID, raw)
                                    .astype(np.uint8)))
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"num_classes": 11, "void_values": [11]}, f)
    return Tree(root, "images_by_split", 11, examples)


def write_split_subfolders(root, rng):
    tree = write_plain(root, _random_examples(rng, {"train": 3, "val": 2}))
    return Tree(root, "split_subfolders", 3, tree, overrides=dict(num_classes=3))


def write_pooled(root, rng):
    examples = write_plain(root, _random_examples(rng, {"pool": 5}))
    return Tree(root, "pooled", 3, examples, overrides=dict(num_classes=3, val_fraction=0.4))


def _random_examples(rng, counts):
    """split -> [(stem, image array, class labels)]: examples not yet on disk."""
    return {split: [(f"{split}{i}", rng.integers(0, 256, (H, W, 3), np.uint8),
                     _classes(rng, range(3), void_border=True)) for i in range(count)]
            for split, count in counts.items()}


def write_plain(root, examples):
    """The examples as `split_subfolders` (or `pooled` for 'pool'), class-index masks;
    image files are copied (their bytes, so JPEGs decode alike), or arrays written as PNG.
    Returns the examples with the paths written."""
    written = {}
    for split, items in examples.items():
        base = root if split == "pool" else os.path.join(root, split)
        written[split] = []
        for stem, images, label in items:
            if isinstance(images, np.ndarray):
                target = os.path.join(base, "images", f"{stem}.png")
                _save(target, images)
            elif len(images) == 1:
                target = os.path.join(base, "images", stem + os.path.splitext(images[0])[1])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(images[0], target)
            else:  # one file per channel: one 2-channel (LA) PNG
                stacked = np.stack([np.asarray(Image.open(p)) for p in images], axis=-1)
                target = os.path.join(base, "images", f"{stem}.png")
                _save(target, stacked)
            _save(os.path.join(base, "masks", f"{stem}.png"), label)
            written[split].append((stem, (target,), label))
    return written


WRITERS = {
    "voc2012": write_voc2012,
    "voc_aug": write_voc_aug,
    "sbd": write_sbd,
    "cityscapes": write_cityscapes,
    "ade20k": write_ade20k,
    "camvid": write_camvid,
    "mmseg": write_mmseg,
    "nnunet": write_nnunet,
    "images_by_split": write_images_by_split,
    "split_subfolders": write_split_subfolders,
    "pooled": write_pooled,
}
