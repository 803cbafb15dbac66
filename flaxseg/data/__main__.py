"""`python -m flaxseg.data check|prepare ...`: validate a dataset, or prepare it for tfds.

    python -m flaxseg.data check ../shared/data/isbi2012_membrane --preset isbi2012
    python -m flaxseg.data check my_folder --num-classes 3 --value-map 1:0,2:1,3:2
    python -m flaxseg.data check oxford_iiit_pet --data-dir ~/tensorflow_datasets
    python -m flaxseg.data prepare my_folder --name my_cells --data-dir /data/tfds

`check` exits with status 1 if it finds problems; it never modifies anything.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_collections

from flaxseg.data.check import check_dataset, format_report
from flaxseg.data.config import available_datasets, dataset_config


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
            help=f"a folder preset for a path, one of {available_datasets()}",
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
    )
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    target = args.target
    if os.path.isdir(target):
        config = dataset_config(args.preset or "folder", path=os.path.abspath(target), **overrides)
        if config.source != "folder":
            raise ValueError(f"--preset {args.preset} is not a folder dataset; drop it.")
        return config
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if target in available_datasets() and target != "folder":
        return dataset_config(target, **overrides)
    if os.sep in target and "/" not in target.split(os.sep)[0]:
        raise ValueError(f"{target!r} is not a folder (and not a tfds name).")
    return dataset_config(target, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
