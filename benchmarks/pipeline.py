"""The host side of training: images per CPU-second, with 0, 1 and 2 data workers, and
end-to-end training with the share of time spent waiting for data.

    python -m benchmarks.pipeline                 # the table of benchmarks/README.md
    python -m benchmarks.pipeline --quick         # seconds: small folders, few batches
    python -m benchmarks.pipeline --folder=PATH --crop=352x480 --cache

It generates folders (pooled layout: images/ + masks/, photo-like smooth images with
noise, masks of 4 classes) of PNG and JPEG images at each `--sizes`, then, for each folder
and worker count, iterates `flaxseg.data.pipeline.create_train_iterator` as the training
loop builds it (default augmentation, `--batch_size`) and reports:

  host img/s      images the iterator delivered per second of wall time
  img/CPU-s       images per CPU-second, counting this process's threads and the grain
                  worker processes (/proc), i.e. what one core of the host sustains
  CPU-ms/img      the inverse, in milliseconds

Timing starts after the first batch (worker start-up and, with `--cache`, one epoch that
fills the cache are left out). `--train_steps=N` also trains a model whose step is nearly
free (`Pointwise`, one 1x1 convolution, passed to the loop by path) from each folder and
reports the loop's img/s, end to end and the step's own, and its data-wait share.
Results: `--out_dir`/pipeline.jsonl and pipeline.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxseg.models.geometry import Geometry

NUM_CLASSES = 4


class Pointwise(nn.Module):
    """A model whose training step is nearly free: one 1x1 convolution (the model contract
    of `flaxseg.models.registry`), to time what the input pipeline and the loop cost."""

    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
        return conv(x).astype(jnp.float32)

    def geometry(self) -> Geometry:
        return Geometry()


def write_folder(root: str, extension: str, size: tuple[int, int], count: int,
                 seed: int = 0) -> str:
    """A pooled folder (images/, masks/, dataset.json) of `count` photo-like images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    rows, cols = np.mgrid[:height, :width] / max(height, width)
    for i in range(count):
        # Smooth colour fields plus sensor-like noise: compresses like a photo, unlike noise.
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = [np.sin(6 * rows + 4 * cols + p) for p in phase]
        image = (127 + 80 * np.stack(base, -1) + rng.normal(0, 8, (height, width, 3)))
        image = np.clip(image, 0, 255).astype(np.uint8)
        mask = ((rows * 4 + cols * 3 + i).astype(int) % NUM_CLASSES).astype(np.uint8)
        stem = f"{i:04d}"
        Image.fromarray(image).save(os.path.join(root, "images", f"{stem}.{extension}"),
                                    quality=90)
        Image.fromarray(mask).save(os.path.join(root, "masks", f"{stem}.png"))
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"num_classes": NUM_CLASSES}, f)
    return root


def folder_source(path: str, crop: tuple[int, int], cache: bool):
    """The training split of a folder, as the training program reads it."""
    from flaxseg import data

    config = data.resolve_dataset_config(data.dataset_config(
        "folder", path=path, image_size=crop, cache=cache, val_fraction=0.0))
    return data.create_source(config, "train")


def _cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its live child processes (grain's
    workers), read from /proc (Linux; elsewhere this process only)."""
    total = time.process_time()
    if not os.path.isdir("/proc"):
        return total
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # a process that just exited
            continue
        if int(fields[1]) == me:  # a child: add its utime + stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def host_rate(path: str, *, crop: tuple[int, int], workers: int, batches: int,
              batch_size: int, cache: bool) -> dict[str, float]:
    """Images per second and per CPU-second of the training iterator on `path`."""
    from flaxseg.data import augment_config
    from flaxseg.data.pipeline import create_train_iterator

    source = folder_source(path, crop, cache)
    warm = max(1, -(-len(source) // batch_size)) if cache else 1  # fill the cache first
    with create_train_iterator(source, batch_size=batch_size, seed=0, augment=augment_config(),
                               image_size=crop, worker_count=workers) as iterator:
        for _ in range(warm):
            next(iterator)
        cpu, wall = _cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    images = batches * batch_size
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
            "images_per_cpu_s": images / cpu, "cpu_ms_per_image": 1e3 * cpu / images}


def train_rate(path: str, *, crop: tuple[int, int], workers: int, steps: int,
               batch_size: int, cache: bool, workdir: str) -> dict[str, float]:
    """The training loop on `path` with `Pointwise`: its img/s and data-wait share."""
    from flaxseg.configs import folder as folder_config
    from flaxseg.train.loop import train_and_evaluate

    config = folder_config.get_config()
    config.model = ml_collections.ConfigDict({"name": "benchmarks.pipeline:Pointwise"})
    config.dataset.path = path
    config.dataset.image_size = crop
    config.dataset.cache = cache
    config.dataset.val_fraction = 0.0
    config.eval_split = "train"
    config.batch_size = batch_size
    config.num_train_steps = steps
    config.optimizer.warmup_steps = 0
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = steps
    if "data_workers" in config:  # (absent before flaxseg had the key)
        config.data_workers = workers
    summary = train_and_evaluate(config, workdir)
    return {k: summary.get(k) for k in ("images_per_sec", "step_images_per_sec",
                                        "data_wait_share")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small folders, few batches")
    parser.add_argument("--folder", default="", help="measure this folder instead")
    parser.add_argument("--crop", default="", help="HxW crop (default: half the image)")
    parser.add_argument("--sizes", default="512x512,1024x2048")
    parser.add_argument("--formats", default="png,jpg")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--count", type=int, default=16, help="images per generated folder")
    parser.add_argument("--cache", action="store_true", help="dataset.cache=True")
    parser.add_argument("--train_steps", type=int, default=0)
    parser.add_argument("--out_dir", default="")
    args = parser.parse_args(argv)
    if args.quick:  # fills in the flags left at their defaults
        quick = dict(sizes="64x96", workers="0,1", batches=2, count=8, batch_size=4,
                     train_steps=4)
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def _hw(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def _cases(args: argparse.Namespace, scratch: str) -> list[tuple[str, str, tuple[int, int]]]:
    """(name, folder, crop) for every folder to measure, generating them in `scratch`."""
    if args.folder:
        return [(args.folder, args.folder, _hw(args.crop))]
    cases = []
    for size in args.sizes.split(","):
        hw = _hw(size)
        crop = _hw(args.crop) if args.crop else (hw[0] // 2, hw[1] // 2)
        for extension in args.formats.split(","):
            path = write_folder(os.path.join(scratch, f"{size}_{extension}"), extension, hw,
                                args.count)
            cases.append((f"{extension.upper()} {size}", path, crop))
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, path, crop in _cases(args, scratch):
            for workers in (int(w) for w in args.workers.split(",")):
                record = {"folder": name, "crop": f"{crop[0]}x{crop[1]}", "workers": workers,
                          "cache": args.cache, "cpu_count": os.cpu_count()}
                record.update(host_rate(path, crop=crop, workers=workers, batches=args.batches,
                                        batch_size=args.batch_size, cache=args.cache))
                if args.train_steps:
                    record.update(train_rate(
                        path, crop=crop, workers=workers, steps=args.train_steps,
                        batch_size=args.batch_size, cache=args.cache,
                        workdir=os.path.join(scratch, f"run_{len(records)}")))
                records.append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
    table = markdown(records)
    print(table)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "pipeline.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(args.out_dir, "pipeline.md"), "w") as f:
            f.write(table + "\n")
    return 0


def markdown(records: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| folder | crop | workers | host img/s | img/CPU-s | CPU-ms/img | loop img/s "
             "(end to end / step) | data wait |", "|" + "---|" * 8]
    for r in records:
        loop = wait = "-"
        if r.get("images_per_sec") is not None:
            step = r.get("step_images_per_sec")
            loop = f"{r['images_per_sec']:.1f} / " + (f"{step:.1f}" if step else "-")
            if r.get("data_wait_share") is not None:
                wait = f"{100 * r['data_wait_share']:.0f}%"
        lines.append(f"| {r['folder']} | {r['crop']} | {r['workers']} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_cpu_s']:.1f} | "
                     f"{r['cpu_ms_per_image']:.1f} | {loop} | {wait} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
