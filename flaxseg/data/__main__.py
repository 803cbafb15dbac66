"""`python -m flaxseg.data check|prepare ...`: validate a dataset, or prepare it for tfds.

    python -m flaxseg.data check /data/CamVid                  # layout detected: camvid
    python -m flaxseg.data check ../shared/data/isbi2012_membrane --preset isbi2012
    python -m flaxseg.data check my_folder --num-classes 3 --value-map 1:0,2:1,3:2
    python -m flaxseg.data check my_mmseg_tree --layout mmseg --image-suffix .jpg
    python -m flaxseg.data check oxford_iiit_pet --data-dir ~/tensorflow_datasets
    python -m flaxseg.data prepare /data/VOCdevkit --name voc2012 --data-dir /data/tfds

A folder's layout (VOC, Cityscapes, ADE20K, CamVid, MMSegmentation, nnU-Net, ...) is
detected; its classes come from the flags, else its dataset.json, else the layout.
`check` exits with status 1 if it finds problems (warnings and a dataset with no class
information are not problems); it never modifies anything.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_collections

from flaxseg import cli
from flaxseg.data.check import check_dataset, format_report
from flaxseg.data.config import available_datasets, dataset_config
from flaxseg.data.layouts import LAYOUT_NAMES


def _pairs(text: str) -> dict[int, int]:
    try:
        return {int(a): int(b) for a, b in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected RAW:CLASS pairs like 0:0,255:1, got {text!r}"
        ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 128,200, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def _folder_presets() -> list[str]:
    return [name for name in available_datasets() if dataset_config(name).source == "folder"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flaxseg.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="scan a dataset and report problems")
    check.add_argument("target", help="a dataset folder, a flaxseg dataset name, or a tfds name")
    check.add_argument(
        "--max-examples", type=int, default=None, help="read at most this many examples per split"
    )
    prepare = commands.add_parser("prepare", help="write a folder dataset as tfds array_record")
    prepare.add_argument("target", help="the dataset folder")
    prepare.add_argument("--name", required=True, help="the tfds name to give it (snake_case)")
    for command in (check, prepare):
        command.add_argument(
            "--preset",
            default=None,
            help=f"a folder preset for a path, one of {', '.join(_folder_presets())}",
        )
        command.add_argument("--data-dir", default=None, help="tfds data_dir")
        command.add_argument("--num-classes", type=int)
        command.add_argument("--class-names", type=_names, help="comma-separated, one per class")
        command.add_argument("--value-map", type=_pairs, help="raw mask value -> class: 0:0,255:1")
        command.add_argument("--void-values", type=_ints, help="raw values that become void")
        command.add_argument("--num-channels", type=int)
        command.add_argument("--ignore-index", type=int)
        command.add_argument("--val-fraction", type=float)
        command.add_argument("--test-fraction", type=float)
        command.add_argument(
            "--layout", help=f"force a folder layout: one of {', '.join(LAYOUT_NAMES)}")
        command.add_argument("--image-suffix", help="what image names end with, e.g. .jpg")
        command.add_argument("--mask-suffix", help="what mask names end with, e.g. _mask.png")
        command.add_argument("--reduce-zero-label", action="store_true", default=None,
                             help="mask 0 is void and 1..N are the classes (ADE20K)")
    return parser


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The dataset config a command line describes (see the module docstring)."""
    keys = (
        "num_classes",
        "class_names",
        "value_map",
        "void_values",
        "num_channels",
        "ignore_index",
        "val_fraction",
        "test_fraction",
        "layout",
        "image_suffix",
        "mask_suffix",
        "reduce_zero_label",
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    target = args.target
    if os.path.isdir(target):
        preset = args.preset or "folder"
        if preset not in _folder_presets():
            raise ValueError(f"--preset {preset} is not a folder dataset; use one of "
                             f"{', '.join(_folder_presets())}, or none.")
        return dataset_config(preset, path=os.path.abspath(target), **overrides)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if target in available_datasets():
        config = dataset_config(target, **overrides)
        if config.source == "folder" and not config.path:
            raise ValueError(f"{target!r} is a folder dataset: give its folder, e.g. "
                             f"`python -m flaxseg.data check /data/{target} --preset {target}`.")
        return config
    if os.sep in target and "/" not in target.split(os.sep)[0]:
        raise ValueError(f"{target!r} is not a folder (and not a tfds name).")
    return dataset_config(target, **overrides)


def main(argv: list[str] | None = None) -> int:
    args, stray = _parser().parse_known_args(argv)
    try:
        if stray:  # argparse would print its usage and a second line
            raise cli.unexpected_arguments(stray, sys.argv[1:] if argv is None else argv)
        config = config_from_args(args)
        if args.command == "prepare":
            from flaxseg.data.tfds import prepare_folder_dataset

            if config.source != "folder":
                raise ValueError(f"prepare needs a dataset folder, got {args.target!r}.")
            if not args.data_dir:
                raise ValueError("prepare needs --data-dir (where the tfds dataset is written).")
            path = prepare_folder_dataset(config, name=args.name, data_dir=args.data_dir)
            print(
                f"Prepared {args.name} in {path}; read it with "
                f"dataset_config({args.name!r}, data_dir={args.data_dir!r})."
            )
            return 0
        report = check_dataset(config, max_examples=args.max_examples)
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return cli.USER_ERROR
    print(format_report(report))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
