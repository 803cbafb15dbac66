"""What a network whose logits are at output stride s can score at best on the synthetic
scenes: the val masks fitted by free logits on the s-times coarser grid, resized
bilinearly to the image (as DeepLabV3+'s decoder output is), then scored.

    python -m benchmarks.output_stride                        # 64x64 scenes, stride 4
    python -m benchmarks.output_stride --image_size=128 --strides=2,4,8
    python -m benchmarks.output_stride --runs=runs/default,runs/deeplabv3plus

For each stride it prints two mIoUs over the val split:

  pooled   each class's one-hot averaged over the s x s cells, resized back, argmax: what
           an output that only knows each cell's class shares gives (not a bound)
  fitted   the coarse logits optimised per image (Adam, --steps, cross-entropy after the
           resize), starting from the pooled ones: an upper bound, up to the optimiser,
           on any network with that output grid and resize

Measured (64x64, stride 4, 2000 steps): pooled 0.9435, fitted 0.9916 (classes 0.997,
0.994, 0.989, 0.986). So stride-4 logits can reach the U-Net's 0.97.

`--runs` (training workdirs on the synthetic data) says where a trained network's val
errors lie instead: its mIoU, and for bands of 1, 2 and 4 pixels around the label
boundaries (`flaxseg.metrics.boundary_band`, the DeepLab papers' trimap) the mIoU inside
the band and the share of the errors in it (`python -m flaxseg.evaluate --trimap=1,2,4`
prints the band scores for any run and dataset). Measured on 7 December 2026 (300 steps each,
`flaxseg/configs/default.py` and `deeplabv3plus.py`):

| run | mIoU | pixels wrong | errors in 1-px band | band mIoU 1 px | 2 px | 4 px | outside 2 px |
|---|---:|---:|---:|---:|---:|---:|---:|
| U-Net | 0.9711 | 0.78% | 98.3% | 0.823 | 0.916 | 0.954 | 0.9999 |
| DeepLabV3+ | 0.9377 | 1.67% | 91.8% | 0.670 | 0.827 | 0.903 | 0.9996 |

The 1-px band is 7.8% of the pixels, the 2-px band 18.2%, the 4-px band 35.7%; 99.6% or
more of either network's errors lie within 2 px of a boundary. Both networks get the
shapes' interiors right; DeepLabV3+ errs on twice as many boundary pixels (19.6% of the
1-px band against 9.8%), where its stride-4 output must place each edge inside a 4x4
cell: its 0.938 is near the pooled bound above (0.9435), not the fitted one. At test
time, the images upscaled 2x (`python -m flaxseg.evaluate --scales=2`, the output grid
then 2 px) give 0.982, and the U-Net 0.995. Trained on 13x the images (batch 32, 2000
steps: val mIoU 0.9705) it learns the edges: band mIoU 0.821 / 0.915 / 0.954.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseg.configs import default
from flaxseg.data.synthetic import SyntheticSource
from flaxseg.metrics import confusion_matrix, segmentation_scores
from flaxseg.models.layers import resize_bilinear


def val_masks(image_size: int) -> np.ndarray:
    """The default config's synthetic val masks at `image_size`: int32 `[N, S, S]`."""
    config = default.get_config().dataset
    config.image_size = (image_size, image_size)
    source = SyntheticSource(config, "val")
    return np.stack([source[i]["label"] for i in range(len(source))]).astype(np.int32)


def scores(logits: jax.Array, masks: np.ndarray, num_classes: int) -> tuple[float, list]:
    """(mIoU, per-class IoUs) of the coarse `logits` `[N, h, w, C]` resized to the masks."""
    preds = jnp.argmax(resize_bilinear(logits, masks.shape[1:]), axis=-1)
    result = segmentation_scores(confusion_matrix(jnp.asarray(masks), preds, num_classes))
    return result["mean_iou"], [round(c["iou"], 3) for c in result["per_class"].values()]


def fitted_logits(masks: np.ndarray, stride: int, num_classes: int, steps: int
                  ) -> tuple[jax.Array, jax.Array]:
    """(pooled, fitted) coarse logits `[N, S/s, S/s, C]` for the masks."""
    n, height, width = masks.shape
    onehot = jax.nn.one_hot(masks, num_classes)
    pooled = onehot.reshape(n, height // stride, stride, width // stride, stride,
                            num_classes).mean((2, 4))
    optimizer = optax.adam(0.3)

    def loss(z):
        up = resize_bilinear(z, (height, width))
        return optax.softmax_cross_entropy(up, onehot).mean()

    @jax.jit
    def step(z, state):
        grads = jax.grad(loss)(z)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(z, updates), state

    z = 8.0 * pooled  # a confident start: argmax unchanged
    state = optimizer.init(z)
    for _ in range(steps):
        z, state = step(z, state)
    return pooled, z


def run_errors(workdir: str, widths: tuple[int, ...] = (1, 2, 4)) -> dict:
    """Where a trained run's val errors lie (`flaxseg.evaluate.evaluate`'s trimap, mode
    'pad'): `{'mean_iou', 'error_rate', 'bands': {w: {'mean_iou', 'mean_iou_outside',
    'error_share', 'pixel_share'}}}` for each band width."""
    from flaxseg import evaluate
    from flaxseg.data import create_source
    from flaxseg.train.checkpoint import load_for_inference

    model, variables, config = load_for_inference(workdir)
    scores = evaluate.evaluate(model, variables, create_source(config.dataset, "val"),
                               preprocess=evaluate.eval_preprocess(config, "native"),
                               mode="pad", batch_size=64, trimap=widths)
    pixels = scores["num_pixels"]
    errors = pixels * (1 - scores["pixel_accuracy"])
    bands = {}
    for width, parts in scores["trimap"].items():
        band = parts["band"]
        bands[width] = {
            "mean_iou": band["mean_iou"], "mean_iou_outside": parts["outside"]["mean_iou"],
            "error_share": band["num_pixels"] * (1 - band["pixel_accuracy"]) / max(errors, 1),
            "pixel_share": band["num_pixels"] / pixels}
    return {"mean_iou": scores["mean_iou"], "error_rate": errors / pixels, "bands": bands}


def _print_run(workdir: str) -> None:
    r = run_errors(workdir)
    print(f"{workdir}: val mIoU {r['mean_iou']:.4f}, {r['error_rate']:.2%} of the pixels "
          "wrong")
    for width, b in r["bands"].items():
        print(f"  {width}-px band ({b['pixel_share']:.1%} of the pixels): "
              f"{b['error_share']:.1%} of the errors, mIoU {b['mean_iou']:.4f} inside, "
              f"{b['mean_iou_outside']:.4f} outside")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--strides", default="4", help="comma-separated output strides")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps per fit")
    parser.add_argument("--runs", default="", help="comma-separated training workdirs: "
                        "where their val errors lie (instead of the bounds)")
    args = parser.parse_args()
    if args.runs:
        for workdir in args.runs.split(","):
            _print_run(workdir)
        return
    masks = val_masks(args.image_size)
    num_classes = int(masks.max()) + 1
    print(f"{len(masks)} val masks of {args.image_size}x{args.image_size}, "
          f"{num_classes} classes")
    for stride in (int(s) for s in args.strides.split(",")):
        if args.image_size % stride:
            raise SystemExit(f"--image_size {args.image_size} is not a multiple of {stride}")
        pooled, fitted = fitted_logits(masks, stride, num_classes, args.steps)
        (p, _), (f, per_class) = (scores(z, masks, num_classes) for z in (pooled, fitted))
        print(f"stride {stride}: pooled mIoU {p:.4f}, fitted mIoU {f:.4f} "
              f"(per class {per_class})")


if __name__ == "__main__":
    main()
