"""`python -m flaxseg.models [--size 256 --num-classes 21 --in-channels 3]`.

Prints a Markdown table of every registered model at its default (paper) width:
parameter count and forward GFLOPs per image from XLA's cost analysis. The VALID
U-Net runs at the nearest valid input size at or above `--size`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from flaxseg.models import (
    available_models,
    create_model,
    forward_flops,
    param_count,
    unet_output_size,
    unet_valid_input_sizes,
)

PAPERS = {
    "unet": "Ronneberger et al. 2015 (SAME padding)",
    "unet_valid": "Ronneberger et al. 2015",
    "fcn32s": "Long et al. 2015",
    "fcn16s": "Long et al. 2015",
    "fcn8s": "Long et al. 2015",
    "encoder_decoder": "U-Net without skips (baseline)",
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flaxseg.models", description=__doc__)
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


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    print("| model | paper | input | output | parameters | GFLOPs / image |")
    print("|---|---|---|---|---:|---:|")
    for name in args.models.split(","):
        size, out = args.size, args.size
        if name == "unet_valid":
            size = unet_valid_input_sizes(args.size, args.size + 64)[0]
            out = unet_output_size(size)
        model = create_model(name, num_classes=args.num_classes)
        shape = (1, size, size, args.in_channels)
        params = param_count(model, shape)
        gflops = forward_flops(model, shape) / 1e9
        print(
            f"| {name} | {PAPERS[name]} | {size}x{size} | {out}x{out} | {params:,} | "
            f"{gflops:,.1f} |"
        )


if __name__ == "__main__":
    main()
