"""`python -m flaxseg.predict`: segment image files with a trained run.

    python -m flaxseg.predict --workdir=runs/default --input=photos/ --output=out/
    python -m flaxseg.predict --workdir=runs/isbi --input=slice.png --output=out/ \
        --mode=overlap_tile --tile_size=572

Writes `<output>/masks/<name>.png` (class indices, uint8) and
`<output>/overlays/<name>.png` (class colours over the image). Images are
normalised as the run's config says; by default (`--mode=auto`) the VALID U-Net
uses overlap-tile and other U-Nets mirror-pad, so images of any size get a full
mask; when one pass over the largest input would not fit the memory budget
(`--memory_budget_gb`, else the device's memory, on a CPU half of the host's; read from
the compiled pass, nothing runs), every image is segmented in gaussian tiles of
`--tile_size=auto`, streamed, and the output says so. A file that cannot be segmented
(unreadable, wrong channel count, a size the model cannot take) is reported by name, the
others are still written, and the exit status is 1. The library function is
`flaxseg.inference.predict`.

With an artifact of `python -m flaxseg.export` instead of a workdir, only jax, NumPy and
Pillow are needed (not flax; `flaxseg.exported`):

    python -m flaxseg.predict --exported=model.jax --input=photos/ --output=out/

(an artifact exported with `--mode=auto` switches to its tiles, as `--mode=auto` does
here, when one pass over the largest input would not fit `--memory_budget_gb`).

The tiled modes (`--mode=sliding|gaussian|overlap_tile`, or `--mode=auto` with
`--tile_size`) stream an image of any size in bands of tile rows: host memory holds one
band and the labels, never the image's float scores; each pass of `--tile_batch` tiles is
spread over the process's devices, and a prediction longer than a few seconds prints
tiles done, tiles/s and ETA. With multi-scale TTA (`--scales`) every scale streams the
image resized to it, and the scales' logits are averaged a chunk of rows at a time.

A run trained with `spatial_partitions` > 1 predicts each image in one pass split over that
many devices (modes 'whole' and 'pad'). Several processes (the distributed flags of
`python -m flaxseg.train`) split the files:
each segments every `process_count()`-th one on its own device; process 0 reports the
totals.
"""

from __future__ import annotations

import sys

from flaxseg import cli


def main(argv: list[str]) -> int:
    import jax
    import numpy as np
    from absl import flags

    from flaxseg import evaluate, image_files, inference
    from flaxseg.train.parallel import sum_over_processes

    values = flags.FLAGS
    model, variables, config, options = evaluate.load_run(
        argv, image_files.readable_sizes(values.input))
    if inference.streams(options["mode"]):
        # Bands of tiles, each pass of --tile_batch tiles spread over this process's devices.
        variables, local_options = evaluate.tiles_over_local_devices(variables, options)
    else:
        variables, local_options = evaluate.for_this_process(variables, config, options)
    palette = config.dataset.get("palette")
    results = inference.predict(
        model,
        variables,
        values.input,
        values.output,
        shard=(jax.process_index(), jax.process_count()),
        palette=None if palette is None else np.asarray(palette, np.uint8),
        num_channels=int(config.dataset.num_channels),
        preprocess=evaluate.image_normalizer(config),
        **local_options,
    )
    failed = [r for r in results if not r.ok]
    num_ok, num_failed = sum_over_processes(np.array([len(results) - len(failed), len(failed)]))
    if jax.process_index() == 0:
        print(
            f"Segmented {num_ok} of {num_ok + num_failed} images "
            f"({evaluate.options_text(options, values.mode)}) into {values.output}"
        )
    for result in failed:
        print(f"  failed: {result.error}", file=sys.stderr)
    return 1 if num_failed else 0


def _define_flags() -> None:
    from absl import flags

    from flaxseg import evaluate

    evaluate.define_inference_flags()
    flags.DEFINE_string("input", None, "An image file or a directory of images.")
    flags.DEFINE_string("output", None, "Directory for masks/ and overlays/.")
    flags.mark_flags_as_required(["input", "output"])


if __name__ == "__main__":
    if any(arg.split("=")[0] in ("--exported", "-exported") for arg in sys.argv[1:]):
        from flaxseg import exported  # jax, NumPy and Pillow only

        sys.exit(cli.run(lambda: exported.main(sys.argv[1:])))
    _define_flags()
    cli.run_absl(main)
