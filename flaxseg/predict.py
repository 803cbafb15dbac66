"""`python -m flaxseg.predict`: segment image files with a trained run.

    python -m flaxseg.predict --workdir=runs/default --input=photos/ --output=out/
    python -m flaxseg.predict --workdir=runs/isbi --input=slice.png --output=out/ \
        --mode=overlap_tile --tile_size=572

Writes `<output>/masks/<name>.png` (class indices, uint8) and
`<output>/overlays/<name>.png` (class colours over the image). Images are
normalised as the run's config says; by default (`--mode=auto`) the VALID U-Net
uses overlap-tile and other U-Nets mirror-pad, so images of any size get a full
mask. A file that cannot be segmented (unreadable, wrong channel count, a size the
model cannot take) is reported by name, the others are still written, and the exit
status is 1. The library function is `flaxseg.inference.predict`.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from flaxseg import evaluate, inference


def main(argv: list[str]) -> int:
    values = flags.FLAGS
    try:
        model, variables, config, options = evaluate.load_run(argv)
        palette = config.dataset.get("palette")
        results = inference.predict(
            model,
            variables,
            values.input,
            values.output,
            palette=None if palette is None else np.asarray(palette, np.uint8),
            num_channels=int(config.dataset.num_channels),
            preprocess=evaluate.image_normalizer(config),
            **options,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    print(
        f"Segmented {len(results) - len(failed)} of {len(results)} images "
        f"(mode={options['mode']}, flip={options['flip']}) into {values.output}"
    )
    for result in failed:
        print(f"  failed: {result.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    evaluate.define_inference_flags(default_mode="auto")
    flags.DEFINE_string("input", None, "An image file or a directory of images.")
    flags.DEFINE_string("output", None, "Directory for masks/ and overlays/.")
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)
