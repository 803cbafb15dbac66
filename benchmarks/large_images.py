"""Large images, streamed: seconds per megapixel and peak host memory.

    python -m benchmarks.large_images                         # 2k, 8k, 20k on 1 and 4 devices
    python -m benchmarks.large_images --sizes=4096 --devices=1,4   # the device speed-up
    python -m benchmarks.large_images --sizes=12000 --devices=1 --runtimes=inprocess,exported
    python -m benchmarks.large_images --sizes=4096 --devices=1 --scales=0.5,1,1.5  # TTA

Each size is written once as an uncompressed RGB TIFF (a smooth synthetic scene), which
`flaxseg.image_files` memory-maps. Each (size, device count, runtime) runs in a fresh
process with `JAX_NUM_CPU_DEVICES` CPU devices (on CPU; an accelerator's devices as they
are), so its peak resident memory (`ru_maxrss`) is that prediction's alone. That peak
counts the pages of the memory-mapped input the process has read (clean, file-backed: the
OS reclaims them under pressure); `peak anon` is the peak of the process's own memory
(`RssAnon`, sampled every 50 ms), what the streaming bounds:

- `inprocess`: `flaxseg.inference.predict` of a U-Net (random weights; the cost does not
  depend on them) in a tiled mode, each pass of `--tile_batch` x devices tiles spread
  over the devices, the mask and overlay written (tiled TIFF past Pillow's size limit).
- `exported`: the same procedure exported (`flaxseg.export`, with its band program) in
  one process, then segmented by `flaxseg.exported.segment_files` in another, which
  imports no flax.

Wall time is the whole `predict` call (compilation included, a few seconds); one row per
run, as a table, and as JSON lines with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

RUNTIMES = ("inprocess", "exported")


def write_scene(path: str, size: int, rows: int = 1024) -> None:
    """An uncompressed uint8 RGB TIFF `[size, size, 3]` of smooth blobs, written in blocks
    of `rows` rows through a memory map (the scene is never whole in memory)."""
    import tifffile

    image = tifffile.memmap(path, shape=(size, size, 3), dtype=np.uint8)
    x = np.arange(size, dtype=np.float32)
    for top in range(0, size, rows):
        y = np.arange(top, min(top + rows, size), dtype=np.float32)[:, None]
        for c in range(3):
            wave = np.sin(y / (97.0 + 31 * c)) * np.cos(x / (61.0 + 17 * c))
            image[top : top + len(y), :, c] = (127.5 + 127.5 * wave).astype(np.uint8)
    image.flush()
    del image


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    from flaxseg.models import create_model

    model = create_model("unet", num_classes=args.classes, features=args.features,
                         depth=args.depth)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def _options(args: argparse.Namespace, devices: int) -> dict[str, Any]:
    return {"mode": args.mode, "tile_size": args.tile, "overlap": args.overlap,
            "tile_batch": args.tile_batch * devices,
            "scales": [float(s) for s in args.scales.split(",")]}


def run_inprocess(args: argparse.Namespace) -> dict[str, Any]:
    """One `inference.predict` of `args.image` on every device of this process."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from flaxseg import inference
    from flaxseg.train.parallel import AXIS_NAME, DataParallel

    model, variables = _model(args)
    par = DataParallel("mesh")
    start = time.perf_counter()
    [result] = inference.predict(
        model, par.put_state(variables), args.image, args.output,
        tile_sharding=NamedSharding(par.mesh, PartitionSpec(AXIS_NAME)),
        **_options(args, jax.device_count()))
    if not result.ok:
        raise RuntimeError(result.error)
    return {"seconds": time.perf_counter() - start, "devices": jax.device_count()}


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """Writes the artifact (whole procedure and band program) to `args.artifact`."""
    from flaxseg import export, inference
    from flaxseg.normalization import UNIT

    model, variables = _model(args)
    plan = inference.make_plan(model, variables, 3, **_options(args, 1))
    whole, rule = export.export_procedure(model, variables, plan, normalization=UNIT,
                                          channels=3)
    bands = export.export_bands(model, variables, plan, normalization=UNIT, channels=3)
    data, band_data = whole.serialize(), bands.serialize()
    info = export.sidecar(whole, data, plan=plan, rule=rule, normalization=UNIT,
                          outputs="labels", palette=None,
                          class_names=[f"class_{i}" for i in range(args.classes)])
    info["bands"] = export.bands_entry(args.artifact, band_data, plan)
    export.write(args.artifact, data, info, band_data)
    return {}


def run_exported(args: argparse.Namespace) -> dict[str, Any]:
    """`flaxseg.exported.segment_files` of `args.image` with `args.artifact`."""
    import jax

    from flaxseg import exported

    artifact = exported.load(args.artifact)
    start = time.perf_counter()
    [result] = exported.segment_files(artifact, args.image, args.output)
    if not result.ok:
        raise RuntimeError(result.error)
    assert "flax" not in sys.modules
    return {"seconds": time.perf_counter() - start, "devices": jax.device_count()}


class AnonPeak:
    """The peak of this process's `RssAnon` (Linux), sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.05):
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def _child(args: argparse.Namespace, task: str, devices: int, **paths: str) -> dict[str, Any]:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    flags = [f"--{k}={v}" for k, v in paths.items()] + [
        f"--{name}={getattr(args, name)}" for name in
        ("features", "depth", "classes", "mode", "tile", "overlap", "tile_batch", "scales")]
    result = subprocess.run([sys.executable, "-m", "benchmarks.large_images",
                             f"--child={task}", *flags], env=env, capture_output=True,
                            text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, size: int, devices: int, runtime: str, scene: str,
            work: str) -> dict[str, Any]:
    """One row: the prediction of the `size` scene on `devices` devices by `runtime`."""
    output = os.path.join(work, f"out_{size}_{devices}_{runtime}")
    if runtime == "exported":
        artifact = os.path.join(work, "model.jax")
        _child(args, "export", 1, artifact=artifact)
        row = _child(args, "exported", devices, image=scene, output=output, artifact=artifact)
    else:
        row = _child(args, "inprocess", devices, image=scene, output=output)
    megapixels = size * size / 1e6
    scales = "" if args.scales == "1" else f", scales {args.scales}"
    return {"size": size, "devices": row["devices"], "runtime": runtime + scales,
            "seconds": round(row["seconds"], 1),
            "s_per_mpx": round(row["seconds"] / megapixels, 3),
            "peak_gib": round(row["peak_kib"] / 2**20, 2),
            "anon_gib": round(row["anon_kib"] / 2**20, 2)}


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| image | devices | runtime | wall s | s / megapixel | peak RSS | peak anon |",
             "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['size']}x{r['size']} | {r['devices']} | {r['runtime']} | "
              f"{r['seconds']} | {r['s_per_mpx']} | {r['peak_gib']} GiB | "
              f"{r['anon_gib']} GiB |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2048,8192,20000")
    parser.add_argument("--devices", default="1,4", help="CPU device counts to compare.")
    parser.add_argument("--runtimes", default="inprocess", help=f"Some of {RUNTIMES}.")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--mode", default="gaussian")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--tile_batch", type=int, default=4, help="Tiles per device a pass.")
    parser.add_argument("--scales", default="1", help="Multi-scale TTA, e.g. 0.5,1,1.5 "
                        "(in process only: the exported band program streams one scale).")
    parser.add_argument("--json", action="store_true", help="Also print JSON lines.")
    parser.add_argument("--child", choices=("inprocess", "export", "exported"),
                        help=argparse.SUPPRESS)
    for name in ("image", "output", "artifact"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        anon = AnonPeak()
        row = {"inprocess": run_inprocess, "export": run_export,
               "exported": run_exported}[args.child](args)
        print(json.dumps({**row, "anon_kib": anon.stop(),
                          "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return 0
    runtimes = args.runtimes.split(",")
    if set(runtimes) - set(RUNTIMES):
        raise SystemExit(f"--runtimes takes some of {RUNTIMES}, got {args.runtimes}")
    if args.scales != "1" and "exported" in runtimes:
        raise SystemExit("--scales applies to --runtimes=inprocess: the exported band program "
                         "streams one scale")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for size in (int(s) for s in args.sizes.split(",")):
            scene = os.path.join(work, f"scene_{size}.tif")
            write_scene(scene, size)
            for devices in (int(d) for d in args.devices.split(",")):
                for runtime in runtimes:
                    rows.append(measure(args, size, devices, runtime, scene, work))
                    print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
            os.remove(scene)
    print(format_rows(rows))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
