"""`python -m flaxseg.models [--size 256 --num-classes 21 --in-channels 3 --models a,b]`
and `python -m flaxseg.models convert-vgg16 FILE --out vgg16_imagenet.npz`.

The first prints a Markdown table of every registered model at its default (paper)
width: parameter count and forward GFLOPs per image from XLA's cost analysis, at the
smallest input size at or above `--size` the model takes (its geometry).

The second converts a VGG-16 ImageNet checkpoint (torchvision's `vgg16-397923af.pth`,
Keras's `vgg16_weights_tf_dim_ordering_tf_kernels.h5`) into flaxseg's .npz: one array
per parameter keyed by its Flax path (`conv1_1/kernel` [3, 3, 3, 64], ..., `fc6/kernel`
[7, 7, 512, 4096], `fc7/kernel` [1, 1, 4096, 4096]) and the normalisation the weights
expect; `--config.model.backbone_weights=vgg16_imagenet.npz` starts FCN from it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flaxseg.models import (
    FCN,
    available_models,
    create_model,
    forward_flops,
    model_geometry,
    model_spec,
    param_count,
)

CONVERT = "convert-vgg16"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flaxseg.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="input H = W (default 256)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument(
        "--models", default=",".join(available_models()),
        help="comma-separated names (default: all)",
    )
    args = parser.parse_args(argv)
    for flag in ("size", "num_classes", "in_channels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    unknown = sorted(set(args.models.split(",")) - set(available_models()))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available: {', '.join(available_models())}")
    return args


def zoo(argv: Sequence[str]) -> None:
    """Prints the model table (see the module docstring)."""
    args = _parse(argv)
    print("| model | paper | input | output | parameters | GFLOPs / image |")
    print("|---|---|---|---|---:|---:|")
    for name in args.models.split(","):
        model = create_model(name, num_classes=args.num_classes)
        geometry = model_geometry(model)
        size = geometry.smallest_input(args.size)
        out = geometry.output_shape(size, size)[0]
        shape = (1, size, size, args.in_channels)
        params = param_count(model, shape)
        gflops = forward_flops(model, shape) / 1e9
        print(
            f"| {name} | {model_spec(name).paper} | {size}x{size} | {out}x{out} | "
            f"{params:,} | {gflops:,.1f} |"
        )


def convert_vgg16(argv: Sequence[str]) -> int:
    """`convert-vgg16 FILE --out OUT.npz`; returns the exit status (2: a bad file)."""
    import jax

    from flaxseg.models.weights import WeightsError, load_backbone, save_npz

    parser = argparse.ArgumentParser(prog=f"python -m flaxseg.models {CONVERT}",
                                     description="VGG-16 ImageNet weights -> flaxseg .npz")
    parser.add_argument("file", help="torchvision .pth, Keras .h5 or flaxseg .npz")
    parser.add_argument("--out", required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        pretrained = load_backbone(args.file, FCN(1).backbone_module())
    except WeightsError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    save_npz(args.out, pretrained, "vgg16")
    count = sum(leaf.size for leaf in jax.tree.leaves(pretrained.variables))
    print(f"Wrote {args.out}: {count:,} VGG-16 parameters (conv1_1 ... fc7), expecting "
          f"{pretrained.normalization.description}.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CONVERT]:
        return convert_vgg16(argv[1:])
    zoo(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
