"""flaxseg's U-Net against the same U-Net in PyTorch: checked equal, then timed alternately.

    python benchmarks/compare_torch.py                      # features 16 and 64, 128 px, batch 8
    python benchmarks/compare_torch.py --features=16 --rounds=10 --modes=infer

Needs the `torch` extra (`pip install 'flaxseg[torch]'`); without it the script says so
and exits 0. For each width it

1. builds flaxseg's `unet` (SAME padding, no norm, no dropout, `depth` 4) and a PyTorch
   twin, copies flaxseg's initial weights into it, and checks on one batch that the
   logits agree within `--atol` (NCHW and channels_last), the cross-entropy losses
   agree, and so do the gradients (relative to each tensor's largest entry);
2. times, on identical batches and alternating A B C A B C ... so that background
   load falls on every side alike: flaxseg (jit, donated state) and PyTorch in NCHW and
   channels_last, for a training step (forward, cross-entropy, backward, Adam lr 1e-3)
   and for inference (logits, no gradient);
3. prints images/s (median step, and best step) and the ratios flaxseg / PyTorch
   (above 1: flaxseg is faster). Background load slows PyTorch's OpenMP threads far
   more than XLA's; the best-step ratio is the less disturbed one, and a quiet machine
   is the only fair one (`uptime` before and after).

The flaxseg training step is the library's own `make_train_step` (it also computes the
confusion matrix and the non-finite guard each step), not a stripped-down copy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/compare_torch.py`: make flaxseg importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F  # noqa: N812
except ImportError:  # the torch extra is optional
    torch = None

LAYOUTS = ("nchw", "channels_last")
MODES = ("train", "infer")


def require_torch() -> None:
    if torch is None:
        raise ImportError(
            "benchmarks/compare_torch.py needs PyTorch: pip install 'flaxseg[torch]' "
            "(torch==2.13.0 is the CPU wheel this project was measured with)."
        )


def _double_conv(c_in: int, c_out: int) -> Any:
    return tnn.Sequential(
        tnn.Conv2d(c_in, c_out, 3, padding=1), tnn.ReLU(inplace=True),
        tnn.Conv2d(c_out, c_out, 3, padding=1), tnn.ReLU(inplace=True),
    )  # fmt: skip


def torch_unet(in_channels: int, num_classes: int, features: int, depth: int = 4) -> Any:
    """flaxseg's SAME U-Net (no norm, no dropout) as a `torch.nn.Module` on NCHW input.

    Its input H, W must be multiples of `2**depth` (flaxseg pads other sizes itself).
    """
    require_torch()

    class UNet(tnn.Module):
        def __init__(self):
            super().__init__()
            widths = [features * 2**i for i in range(depth + 1)]
            self.encoders = tnn.ModuleList(
                _double_conv(c_in, c) for c_in, c in zip([in_channels] + widths[:-2],
                                                         widths[:-1], strict=True))
            self.bottleneck = _double_conv(widths[-2], widths[-1])
            self.upconvs = tnn.ModuleList(
                tnn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth))
            self.decoders = tnn.ModuleList(
                _double_conv(2 * widths[i], widths[i]) for i in range(depth))
            self.classifier = tnn.Conv2d(widths[0], num_classes, 1)

        def forward(self, x):
            skips = []
            for encoder in self.encoders:
                x = encoder(x)
                skips.append(x)
                x = F.max_pool2d(x, 2)
            x = self.bottleneck(x)
            for i in reversed(range(depth)):
                x = torch.cat([skips[i], self.upconvs[i](x)], dim=1)  # flaxseg: [skip, up]
                x = self.decoders[i](x)
            return self.classifier(x)

    return UNet()


def copy_flax_weights(module: Any, params: dict[str, Any], depth: int = 4) -> None:
    """Loads flaxseg U-Net params (`encoder_i/conv1`, `upconv_i`, ...) into `torch_unet`.

    Conv kernels HWIO -> OIHW. flaxseg's transposed conv kernel `[2, 2, C_in, C_out]`
    (flax `transpose_kernel=False` convention) adds `x * kernel[1 - p, 1 - q]` to output
    offset (p, q); PyTorch's weight `[C_in, C_out, 2, 2]` adds `x * weight[..., p, q]`,
    so the spatial axes are flipped.
    """
    require_torch()

    def tensor(array):  # a writable, contiguous copy (device arrays come back read-only)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())

    def conv(target, flax_conv):
        target.weight.copy_(tensor(np.asarray(flax_conv["kernel"]).transpose(3, 2, 0, 1)))
        target.bias.copy_(tensor(flax_conv["bias"]))

    def block(target, flax_block):
        conv(target[0], flax_block["conv1"])
        conv(target[2], flax_block["conv2"])

    with torch.no_grad():
        for i in range(depth):
            block(module.encoders[i], params[f"encoder_{i}"])
            block(module.decoders[i], params[f"decoder_{i}"])
            up = params[f"upconv_{i}"]
            module.upconvs[i].weight.copy_(
                tensor(np.asarray(up["kernel"])[::-1, ::-1].transpose(2, 3, 0, 1)))
            module.upconvs[i].bias.copy_(tensor(up["bias"]))
        block(module.bottleneck, params["bottleneck"])
        conv(module.classifier, params["classifier"])


def torch_gradients_as_flax(module: Any, depth: int = 4) -> dict[str, Any]:
    """The torch twin's `.grad`s in flaxseg's param layout (inverse of `copy_flax_weights`)."""

    def conv(source):
        return {"kernel": source.weight.grad.numpy().transpose(2, 3, 1, 0),
                "bias": source.bias.grad.numpy()}

    def block(source):
        return {"conv1": conv(source[0]), "conv2": conv(source[2])}

    grads = {"bottleneck": block(module.bottleneck), "classifier": conv(module.classifier)}
    for i in range(depth):
        grads[f"encoder_{i}"] = block(module.encoders[i])
        grads[f"decoder_{i}"] = block(module.decoders[i])
        up = module.upconvs[i]
        grads[f"upconv_{i}"] = {
            "kernel": up.weight.grad.numpy().transpose(2, 3, 0, 1)[::-1, ::-1],
            "bias": up.bias.grad.numpy(),
        }
    return grads


def make_batch(seed: int, batch: int, size: int, in_channels: int, num_classes: int
               ) -> dict[str, np.ndarray]:
    """Float32 images in [0, 1) `[B, H, W, C]` and int32 labels `[B, H, W]` (NumPy)."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch, size, size, in_channels), dtype=np.float32),
        "label": rng.integers(0, num_classes, (batch, size, size), dtype=np.int32),
    }


def _to_torch(batch: dict[str, np.ndarray], layout: str) -> tuple[Any, Any]:
    images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy())
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.from_numpy(batch["label"].astype(np.int64))


class Pair:
    """flaxseg's U-Net and its PyTorch twin, with equal initial weights."""

    def __init__(self, features: int, in_channels: int, num_classes: int, image_size: int,
                 batch: int, depth: int = 4, seed: int = 0):
        require_torch()
        import jax
        import jax.numpy as jnp

        from flaxseg.losses import get_loss_fn
        from flaxseg.models import create_model
        from flaxseg.train import create_optimizer

        if image_size % 2**depth:
            raise ValueError(f"image_size must be a multiple of {2**depth}; got {image_size}.")
        self.num_classes, self.depth, self.seed = num_classes, depth, seed
        self.model = create_model("unet", num_classes=num_classes, features=features,
                                  depth=depth, dropout_rate=0.0)
        self.loss_fn = get_loss_fn("cross_entropy")
        self.tx = create_optimizer({"name": "adam", "learning_rate": 1e-3}, num_train_steps=1)
        self.input_shape = (batch, image_size, image_size, in_channels)
        init = jax.jit(lambda key: self.model.init(key, jnp.zeros((1, *self.input_shape[1:]))))
        self.params = init(jax.random.key(seed))["params"]
        self.torch_model = torch_unet(in_channels, num_classes, features, depth)
        copy_flax_weights(self.torch_model, jax.device_get(self.params), depth)

    def torch_copy(self, layout: str) -> Any:
        """A fresh twin with the initial weights in `layout`."""
        module = torch_unet(self.input_shape[-1], self.num_classes,
                            self.model.features, self.depth)
        module.load_state_dict(self.torch_model.state_dict())
        if layout == "channels_last":
            module = module.to(memory_format=torch.channels_last)
        return module


def check_equal(pair: Pair, batch: dict[str, np.ndarray], atol: float = 1e-4,
                grad_rtol: float = 1e-2) -> dict[str, float]:
    """Raises AssertionError unless logits, loss and gradients agree; returns the gaps.

    Logits: max |flax - torch| <= atol in both layouts. Loss: |difference| <= 1e-5 x
    max(1, |loss|). Gradients: for every tensor, ||difference|| <= grad_rtol x ||torch's||
    (Frobenius norms; the libraries sum in different orders, which moves single entries
    of a float32 gradient more than the whole).
    """
    import jax
    import jax.numpy as jnp

    params = pair.params

    def flax_loss(params):
        logits = pair.model.apply({"params": params}, jnp.asarray(batch["image"]), train=False)
        loss_sum, weight = pair.loss_fn(logits, jnp.asarray(batch["label"]))
        return loss_sum / weight, logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(flax_loss, has_aux=True))(params)
    logits = np.asarray(logits)
    gaps = {}
    for layout in LAYOUTS:
        module = pair.torch_copy(layout)
        images, labels = _to_torch(batch, layout)
        torch_logits = module(images)
        torch_loss = F.cross_entropy(torch_logits, labels)
        torch_loss.backward()
        gap = float(np.abs(torch_logits.detach().numpy().transpose(0, 2, 3, 1) - logits).max())
        loss_gap = abs(torch_loss.item() - float(loss))
        torch_grads = torch_gradients_as_flax(module, pair.depth)
        grad_gap = max(
            float(np.linalg.norm(np.asarray(g) - t) / max(np.linalg.norm(t), 1e-30))
            for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(torch_grads), strict=True)
        )
        if gap > atol:
            raise AssertionError(f"{layout}: logits differ by {gap:.3g} > {atol}.")
        if loss_gap > 1e-5 * max(1.0, abs(float(loss))):
            raise AssertionError(f"{layout}: loss {torch_loss.item()} vs flaxseg {float(loss)}.")
        if grad_gap > grad_rtol:
            raise AssertionError(f"{layout}: gradients differ by {grad_gap:.3g} (relative).")
        gaps.update({f"{layout}_logits_max_abs": gap, f"{layout}_loss_abs": loss_gap,
                     f"{layout}_grad_max_rel": grad_gap})
    gaps["loss"] = float(loss)
    return gaps


def flax_runner(pair: Pair, batch: dict[str, np.ndarray], mode: str) -> Callable[[], None]:
    """One flaxseg step per call (blocking): the library's train step, or jitted logits."""
    import jax
    import jax.numpy as jnp

    from flaxseg.train import create_train_state, make_train_step

    device_batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
    if mode == "train":
        step = make_train_step(pair.model, pair.loss_fn, pair.num_classes)
        # Its own state, with the same initial params as the twin (init is seeded alike);
        # the step donates (consumes) it.
        state = create_train_state(pair.model, pair.tx, jax.random.key(pair.seed),
                                   pair.input_shape)
        holder = [state.replace(params=jax.tree.map(jnp.copy, pair.params))]

        def run() -> None:
            holder[0], metrics = step(holder[0], device_batch)
            jax.block_until_ready((holder[0], metrics))

        return run
    variables = {"params": pair.params}
    infer = jax.jit(lambda v, x: pair.model.apply(v, x, train=False))

    def run_infer() -> None:
        infer(variables, device_batch["image"]).block_until_ready()

    return run_infer


def torch_runner(pair: Pair, batch: dict[str, np.ndarray], mode: str, layout: str
                 ) -> Callable[[], None]:
    """One PyTorch step per call: Adam training step, or logits under inference_mode."""
    module = pair.torch_copy(layout)
    images, labels = _to_torch(batch, layout)
    if mode == "train":
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(images), labels).backward()
            optimizer.step()

        return run
    module.eval()

    def run_infer() -> None:
        with torch.inference_mode():
            module(images)

    return run_infer


def time_alternating(runners: dict[str, Callable[[], None]], rounds: int, warmup: int = 2
                     ) -> dict[str, list[float]]:
    """Seconds per call of each runner, interleaved A B C A B C ... over `rounds`."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}.")
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def compare(features: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Equality check, then alternating timings; one row per mode."""
    pair = Pair(features, args.in_channels, args.num_classes, args.image_size, args.batch)
    batch = make_batch(1, args.batch, args.image_size, args.in_channels, args.num_classes)
    gaps = check_equal(pair, batch, atol=args.atol)
    print(f"features={features}: equal. " + ", ".join(f"{k}={v:.3g}" for k, v in gaps.items()),
          flush=True)
    rows = []
    for mode in args.modes:
        runners = {"flaxseg": flax_runner(pair, batch, mode)}
        for layout in LAYOUTS:
            runners[f"torch_{layout}"] = torch_runner(pair, batch, mode, layout)
        load = os.getloadavg()[0]
        times = time_alternating(runners, args.rounds)
        # Median step, and the best step: under background load the best is the
        # less disturbed estimate of each side's own speed.
        speed = {name: args.batch / statistics.median(t) for name, t in times.items()}
        best = {name: args.batch / min(t) for name, t in times.items()}
        rows.append({
            "features": features, "mode": mode, "load_before": load,
            "load_after": os.getloadavg()[0], **{f"{k}_img_s": v for k, v in speed.items()},
            **{f"{k}_best_img_s": v for k, v in best.items()},
            **{f"ratio_vs_{layout}": speed["flaxseg"] / speed[f"torch_{layout}"]
               for layout in LAYOUTS},
            **{f"best_ratio_vs_{layout}": best["flaxseg"] / best[f"torch_{layout}"]
               for layout in LAYOUTS},
        })
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Images/s of the median step (best step in brackets) and the ratios."""
    lines = ["| features | mode | flaxseg img/s | torch NCHW img/s | torch channels_last img/s "
             "| flaxseg / NCHW | flaxseg / channels_last | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{k}_img_s']:.2f} ({r[f'{k}_best_img_s']:.2f})"
                 for k in ("flaxseg", "torch_nchw", "torch_channels_last")]
        ratios = [f"{r[f'ratio_vs_{k}']:.2f}x ({r[f'best_ratio_vs_{k}']:.2f}x)" for k in LAYOUTS]
        lines.append(f"| {r['features']} | {r['mode']} | {' | '.join(cells)} | "
                     f"{' | '.join(ratios)} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    lines.append("\nimg/s of the median step (of the best step); ratio > 1: flaxseg faster.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="16,64",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--modes", default="train,infer", type=lambda s: s.split(","))
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per side")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch intra-op threads (XLA uses every core)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if any(m not in MODES for m in args.modes):
        parser.error(f"--modes must be from {MODES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if torch is None:
        print("PyTorch is not installed; skipping the comparison "
              "(pip install 'flaxseg[torch]' to run it).")
        return 0
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); U-Net {args.image_size}x{args.image_size}, "
          f"batch {args.batch}, {args.in_channels} in-channels, {args.num_classes} classes, "
          f"float32, Adam; {args.rounds} alternating rounds; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = []
    for features in args.features:
        rows.extend(compare(features, args))
        print(format_rows(rows), flush=True)
    return 0


if __name__ == "__main__":
    from flaxseg import cli

    sys.exit(cli.run(main))
