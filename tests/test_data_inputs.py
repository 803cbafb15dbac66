"""What a user's files can get wrong, read as data: photos turned by their EXIF tag, absurd
`dataset.json` values, masks in a lossy format, proposed classes that are void. Each case
asserts the one line, the exit status and that nothing the user had was modified."""

import json
import os

import numpy as np
import pytest
from conftest import file_mtimes
from PIL import Image

from flaxseg import exported, image_files
from flaxseg.data import create_source, dataset_config
from flaxseg.data.__main__ import main as data_cli

# Four colours far apart (JPEG keeps them apart) and the class each one paints.
_COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)


def _displayed(height, width):
    """A photo as displayed (four coloured quadrants) and the mask drawn on it."""
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2, width // 2 :] = 1
    mask[height // 2 :, : width // 2] = 2
    mask[height // 2 :, width // 2 :] = 3
    return _COLOURS[mask], mask


def _save_turned(path, displayed):
    """Saves the sensor's rows of `displayed` with EXIF orientation 6 (turn 90 degrees
    clockwise to display), as a phone does."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(displayed, 1)).save(path, exif=exif, quality=95)


def _nearest_class(image):
    distance = ((image[..., None, :].astype(int) - _COLOURS.astype(int)) ** 2).sum(-1)
    return distance.argmin(-1)


def test_photos_with_an_exif_rotation_are_read_as_displayed_everywhere(tmp_path, capsys):
    # A non-square JPEG (once "size mismatch 48x32 vs 32x48") and a square PNG (once read
    # silently out of register) with orientation 6, masks drawn on the displayed photos.
    root = tmp_path / "data"
    for split, (name, (height, width)) in {"train": ("a.jpg", (32, 48)),
                                           "val": ("a.png", (32, 32))}.items():
        displayed, mask = _displayed(height, width)
        for folder in ("images", "masks"):
            os.makedirs(root / split / folder)
        _save_turned(root / split / "images" / name, displayed)
        Image.fromarray(mask).save(root / split / "masks" / "a.png")
    before = file_mtimes(root)
    assert data_cli(["check", str(root), "--num-classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "EXIF orientation: 2 file(s) carry a rotation tag; they are read turned as " \
           "displayed" in out and "No problems found." in out
    config = dataset_config("folder", path=str(root), num_classes=4)
    for split in ("train", "val"):  # what training and evaluation read
        example = create_source(config, split)[0]
        in_register = (_nearest_class(example["image"]) == example["label"]).mean()
        assert in_register > 0.97, (split, in_register)
    # predict (in-process and the exported artifact's runtime) reads the same way.
    assert exported.load_image is image_files.load_image
    image = image_files.load_image(str(root / "train" / "images" / "a.jpg"))
    assert image.shape == (32, 48, 3)
    assert (_nearest_class(image) == _displayed(32, 48)[1]).mean() > 0.97
    assert file_mtimes(root) == before


def _tiny_folder(root, masks):
    """A `split_subfolders` dataset: one 8x8 grey image per mask, all in train."""
    for folder in ("images", "masks"):
        os.makedirs(root / "train" / folder, exist_ok=True)
    for i, mask in enumerate(masks):
        Image.fromarray(np.full(mask.shape, 99, np.uint8)).save(root / "train" / "images"
                                                               / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "train" / "masks" / f"{i}.png")
    return root


@pytest.mark.parametrize("meta, key", [
    ({"num_classes": 1000000000}, "num_classes"),
    ({"num_classes": -3}, "num_classes"),
    ({"num_classes": 3.7}, "num_classes"),
    ({"num_classes": "3; import os"}, "num_classes"),
    ({"num_classes": True}, "num_classes"),
    ({"num_classes": 3, "class_names": ["a", "b"]}, None),
    ({"num_classes": 3, "void_values": [70000]}, "void_values"),
    ({"num_classes": 3, "value_map": {"0": 0, "-1": 1}}, "value_map"),
])
def test_dataset_json_is_validated_as_data_in_one_line(tmp_path, capsys, meta, key):
    from flaxseg import cli

    root = _tiny_folder(tmp_path / "data", [np.zeros((8, 8))])
    (root / "dataset.json").write_text(json.dumps(meta))
    before = file_mtimes(root)
    metadata = str(root / "dataset.json")
    assert data_cli(["check", str(root)]) == 1  # at once: no 4 GB table for 10**9 classes
    problems = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith(f"  - {metadata}: "), problems
    assert (f"{key!r} must be " if key else "the class counts disagree (num_classes 3, "
            "class_names 2)") in problems[0]
    with pytest.raises(ValueError) as error:  # what training and evaluation meet
        create_source(dataset_config("folder", path=str(root)), "train")
    line, status = cli.describe(error.value)
    assert status == 2 and line.startswith(metadata) and "\n" not in line
    assert file_mtimes(root) == before


def test_check_names_the_values_that_look_like_void_beside_the_class_count(tmp_path, capsys):
    # Masks holding 0..11 where 11 is void (CamVid's encoding), in 3 of 8 masks.
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 11, (8, 8)) for _ in range(8)]
    for mask in masks[:3]:
        mask[0, 0] = 11
    root = _tiny_folder(tmp_path / "data", masks)
    before = file_mtimes(root)
    assert data_cli(["check", str(root)]) == 0  # no class information is not a failure
    out = capsys.readouterr().out
    assert "These masks would read with: --num-classes 12 " in out
    assert ("Values that look like void rather than a class: 11 (the largest value; in only 3 "
            "of 8 masks). If 11 is void: --num-classes 11 --void-values 11 (in a training "
            "config: --config.dataset.num_classes=11 --config.dataset.void_values='(11,)')"
            ) in out
    assert data_cli(["check", str(root), "--num-classes", "11", "--void-values", "11"]) == 0
    out = capsys.readouterr().out
    assert "11 classes" in out and "No problems found." in out
    with pytest.raises(ValueError, match=r"if 11 is void: --config.dataset.num_classes=11 "
                                         r"--config.dataset.void_values='\(11,\)'"):
        create_source(dataset_config("folder", path=str(root)), "train")  # what training says
    assert file_mtimes(root) == before


def _problems(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("  - ")]


def test_check_names_the_likely_cause_beside_the_symptom(tmp_path, capsys):
    # JPEG masks: values that are no class, caused by the lossy format.
    root = _tiny_folder(tmp_path / "jpeg", [])
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 3
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "train" / "images" / "0.png")
    Image.fromarray(mask).save(root / "train" / "masks" / "0.jpg", quality=75)
    before = file_mtimes(root)
    assert data_cli(["check", str(root), "--num-classes", "4"]) == 1
    [line] = _problems(capsys)
    assert "0.jpg: mask values" in line and "(likely cause: .jpg is a lossy format, whose " \
        "compression changes values at region edges, so it cannot hold exact class indices " \
        "or colours; save masks as PNG)" in line
    with pytest.raises(ValueError, match=r"0.jpg: mask values .*\(likely cause: .jpg is a lossy"):
        create_source(dataset_config("folder", path=str(root), num_classes=4), "train")[0]
    assert file_mtimes(root) == before

    # Files of one split disagreeing among themselves: channels, mask kinds, a resized mask.
    root = _tiny_folder(tmp_path / "mixed", [np.zeros((8, 8))] * 4)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "images" / "1.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "masks" / "2.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "train" / "masks" / "0.png")
    before = file_mtimes(root)
    assert data_cli(["check", str(root), "--num-classes", "2"]) == 1
    problems = "\n".join(_problems(capsys))
    assert "have 3 channel(s) but the config says num_channels=1 (set dataset.num_channels / " \
           "--num-channels 3, or convert them); the split's images disagree among themselves " \
           "(1 with 1 channel(s), 1 with 3 channel(s)): convert them all to one mode (e.g. " \
           "RGB)" in problems
    assert "the masks disagree among themselves: 1 RGB and 3 class-index images" in problems
    assert "0.png is 4x4; they have the same aspect ratio: likely one was resized" in problems
    with pytest.raises(ValueError, match=r"split 'train': the split's images disagree among "
                                         r"themselves \(3 with 1 channel\(s\), 1 with 3"):
        create_source(dataset_config("folder", path=str(root), num_classes=2), "train")
    assert file_mtimes(root) == before

    # Images and masks that do not pair because the masks' names carry a suffix.
    root = _tiny_folder(tmp_path / "suffix", [np.zeros((8, 8))] * 2)
    for i in range(2):
        os.rename(root / "train" / "masks" / f"{i}.png", root / "train" / "masks" / f"{i}_m.png")
    before = file_mtimes(root)
    assert data_cli(["check", str(root), "--num-classes", "2"]) == 1
    problems = _problems(capsys)
    assert len(problems) == 2 and all(p.endswith(
        "(likely cause: the mask names carry the suffix '_m.png'; pair them with --mask-suffix "
        "_m.png / dataset.mask_suffix='_m.png')") for p in problems), problems
    assert data_cli(["check", str(root), "--num-classes", "2", "--mask-suffix", "_m.png"]) == 0
    assert file_mtimes(root) == before


def test_an_absurd_class_count_in_a_config_fails_before_any_allocation():
    from flaxseg import cli

    for bad in (1000000000, 0, True):
        with pytest.raises(ValueError) as error:
            dataset_config("synthetic", num_classes=bad)
        assert cli.describe(error.value) == (
            f"dataset.num_classes must be an integer from 1 to 4096 (the most classes flaxseg "
            f"trains), got {bad!r}.", 2)


def test_check_of_an_unquoted_path_with_spaces_says_to_quote_it(tmp_path, capsys):
    root = _tiny_folder(tmp_path / "my data", [np.zeros((8, 8))])
    before = file_mtimes(tmp_path)
    assert data_cli(["check", str(tmp_path / "my"), "data", "--num-classes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"Error: unexpected arguments ['data']: options are --flag=value; quote a "
                   f"path with spaces: '{tmp_path / 'my'} data'.")
    assert data_cli(["check", str(root), "--num-classes", "2"]) == 0
    assert file_mtimes(tmp_path) == before
