"""Throughput, compile time, compiler FLOPs, MFU and device scaling of flaxseg's models.

    python -m benchmarks.throughput --quick
    python -m benchmarks.throughput --models=unet,fcn8s --image_sizes=256 \
        --batch_sizes=1,2,4,8 --dtype=bfloat16 --modes=train,infer
    python -m benchmarks.throughput --models=unet --scaling --num_devices=8
    python -m benchmarks.throughput --models=unet --features=64 --image_sizes=572 \
        --batch_sizes=1 --remat=none,block,save_convs --spatial_partitions=1,2,4 \
        --num_devices=4 --memory_only

Per configuration (model x image size x per-device batch x dtype x mode) it compiles the
real step once (`lower().compile()`, timed apart), runs `--warmup` steps, then times
`--steps` steps one by one with `block_until_ready` on every output. 'train' is
`flaxseg.train.make_train_step` (forward, cross-entropy, backward, Adam, metrics, the
non-finite guard; state donated); 'infer' is `model.apply(..., train=False)` -> logits.

Results go to `--out_dir` as `results.jsonl` (one object per configuration, with the
device kind, library versions and flags), `results.md` (the table, also printed) and
`images_per_s.png` (images/s against batch size, one line per model/size/mode/dtype).

`--parallel` picks the step's mode (`flaxseg.train.parallel`: `jit` on one device, `mesh`
or `pmap` over all of them). `--num_devices=N` on CPU forces N host devices per process
(`jax_num_cpu_devices`, set before JAX's backend starts); on GPU/TPU it uses the first N
devices of each process. `--scaling` runs the mesh step on 1, 2, 4, ... devices per
process at a fixed per-device batch and reports global and per-device images/s and the
weak-scaling efficiency img/s(n) / (n / n0 x img/s(n0)), n0 the smallest count. The
input pipeline's images/s (synthetic source plus the default augmentation, on this host)
is measured beside every configuration, so the slower of the two is visible.

`--remat=none,block,save_convs` runs each configuration with each rematerialisation policy
(`config.remat`); every record has the compiled program's bytes per device
(`compiled_memory_bytes`, XLA's memory analysis) and the activations the backward pass
keeps from the forward for one device's batch (`saved_activation_bytes`: what remat
trades; the same on every backend). `--memory_only` compiles and reports memory without
running a step: the memory report for sizes too slow to time here.

Several processes run the same command, with the distributed flags of `python -m
flaxseg.train` (`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`) or,
on a Cloud TPU VM and under SLURM / Open MPI, without (`flaxseg.train.distributed`);
each process feeds its own rows of every batch, and process 0 prints and writes results.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import peaks
from benchmarks.peaks import Peak

MODELS = ("unet", "unet_valid", "fcn8s", "fcn16s", "fcn32s", "encoder_decoder")
MODES = ("train", "infer")
PARALLEL = ("jit", "mesh", "pmap")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "block", "save_convs")  # flaxseg.models.layers; not imported
# here, so that --help and parsing stay free of JAX

# --quick: a CPU smoke run of every code path: jit train and infer at two batch sizes,
# then mesh training on 1 and 2 forced host devices (scaling), and the input pipeline.
QUICK = dict(
    models=["unet"],
    image_sizes=[32],
    batch_sizes=[1, 2],
    modes=["train", "infer"],
    features=4,
    depth=1,
    steps=5,
    warmup=1,
    num_devices=2,
    pipeline_batches=4,
)

ENV_FIELDS = ("device_kind", "platform", "jax_version", "jaxlib_version", "flax_version",
              "xla_flags", "jax_flags")
JSON_FIELDS = (
    "model", "image_size", "per_device_batch", "global_batch", "num_devices", "num_processes",
    "spatial_partitions", "dtype", "mode", "remat", "saved_activation_bytes",
    "parallel", "model_kwargs", "num_params", "compile_s", "step_ms_median", "step_ms_p10",
    "step_ms_p90", "images_per_s", "images_per_s_per_device", "flops_per_image",
    "flops_per_step_per_device", "tflops_per_s_per_device", "peak_tflops_per_device",
    "peak_source", "mfu", "peak_memory_bytes", "compiled_memory_bytes",
    "pipeline_images_per_s", "weak_scaling_efficiency", "timed_steps", "warmup_steps",
    "load_average", "device_kind", "platform", "jax_version", "jaxlib_version", "flax_version",
    "xla_flags", "jax_flags", "timestamp",
)  # fmt: skip


def image_size(text: str) -> int | str:
    """'572' -> 572 (square); '512x1024' -> '512x1024' (H x W)."""
    parts = text.strip().lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"image size {text!r}: give N or HxW with positive integers")
    return int(parts[0]) if len(parts) == 1 else f"{int(parts[0])}x{int(parts[1])}"


def height_width(size: int | str) -> tuple[int, int]:
    """(H, W) of an `image_size` value."""
    if isinstance(size, int):
        return size, size
    h, w = size.split("x")
    return int(h), int(w)


def _csv(kind: type, choices: Sequence[str] | None = None):
    def parse(text: str) -> list:
        items = [kind(item) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [item for item in items if item not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--models", type=_csv(str, MODELS), default=["unet"], help=f"from {MODELS}")
    add("--image_sizes", type=_csv(image_size), default=[128],
        help="input sizes: N (N x N) or HxW, e.g. 572,512x1024")
    add("--batch_sizes", type=_csv(int), default=[1, 2, 4, 8], help="per-device batch sizes")
    add("--dtype", type=_csv(str, DTYPES), default=["float32"], help="compute dtype(s)")
    add("--modes", type=_csv(str, MODES), default=["train"], help="train and/or infer")
    add("--parallel", choices=PARALLEL, default="jit",
        help="jit: one device; mesh (jit over a device mesh) or pmap: all devices")
    add("--num_devices", type=int, default=None,
        help="devices per process; on CPU, the number of forced host devices")
    add("--scaling", action="store_true",
        help="the mesh step on 1, 2, 4, ... num_devices per process")
    add("--remat", type=_csv(str, REMAT_POLICIES), default=["none"],
        help=f"rematerialisation policies, from {REMAT_POLICIES} (flaxseg.models.layers)")
    add("--memory_only", action="store_true",
        help="compile and report memory per device; run no step")
    add("--spatial_partitions", type=_csv(int), default=None,
        help="split each image's rows over S devices (the mesh on S devices, per process), "
             "for each S given: memory per device against step time")
    add("--coordinator_address", default=None, help="several processes: HOST:PORT of process 0")
    add("--num_processes", type=int, default=None, help="several processes: how many")
    add("--process_id", type=int, default=None, help="several processes: this one's index")
    add("--features", type=int, default=None, help="base width for unet / encoder_decoder")
    add("--depth", type=int, default=None, help="down-sampling stages for unet / encoder_decoder")
    add("--num_classes", type=int, default=3)
    add("--in_channels", type=int, default=3)
    add("--steps", type=int, default=20, help="timed steps per configuration")
    add("--warmup", type=int, default=2, help="untimed steps after compiling")
    add("--pipeline_batches", type=int, default=10,
        help="batches timed from the input pipeline (0: skip)")
    add("--out_dir", default=os.path.join("benchmarks", "results"))
    add("--quick", action="store_true",
        help="CPU smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags; `--quick` fills in every flag left at its default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if min(args.batch_sizes) < 1:
        parser.error("--batch_sizes must be positive.")
    if args.steps < 3 or args.warmup < 0 or args.pipeline_batches < 0:
        parser.error("--steps must be >= 3 (for p10/p90), --warmup and --pipeline_batches >= 0.")
    if args.num_devices is not None and args.num_devices < 1:
        parser.error("--num_devices must be >= 1.")
    if args.spatial_partitions and (args.scaling or args.quick
                                    or min(args.spatial_partitions) < 1):
        parser.error("--spatial_partitions takes positive counts, without --scaling/--quick.")
    for name in ("features", "depth"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    return args


def configure_devices(num_devices: int | None) -> None:
    """Forces `num_devices` CPU devices; must run before JAX's backend initialises."""
    if num_devices is None:
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot force {num_devices} CPU devices: JAX's backend has already started "
            "in this process. Run the benchmark in a fresh process (python -m "
            "benchmarks.throughput) or set XLA_FLAGS=--xla_force_host_platform_device_count."
        ) from error


@dataclass(frozen=True)
class Case:
    """One benchmark configuration; the batch is per device, or per group of
    `spatial_partitions` devices that split each image's rows."""

    model: str
    image_size: int | str  # N (square) or 'HxW'
    per_device_batch: int
    dtype: str
    mode: str
    remat: str
    parallel: str
    num_devices: int
    spatial_partitions: int = 1

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.num_devices // self.spatial_partitions


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (NumPy's default method)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def step_statistics(step_seconds: Sequence[float], global_batch: int, num_devices: int
                    ) -> dict[str, float]:
    """Median / p10 / p90 step time in ms and the images/s the median gives."""
    median = statistics.median(step_seconds)
    images_per_s = global_batch / median
    return {
        "step_ms_median": 1e3 * median,
        "step_ms_p10": 1e3 * percentile(step_seconds, 10),
        "step_ms_p90": 1e3 * percentile(step_seconds, 90),
        "images_per_s": images_per_s,
        "images_per_s_per_device": images_per_s / num_devices,
    }


def environment() -> dict[str, Any]:
    """What a result needs to be compared across machines."""
    import flax
    import jax
    import jaxlib

    device = jax.devices()[0]
    flags = ("jax_num_cpu_devices", "jax_default_matmul_precision", "jax_enable_x64",
             "jax_threefry_partitionable")
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_flags": {name: getattr(jax.config, name, None) for name in flags},
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _model_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {k: getattr(args, k) for k in ("features", "depth") if getattr(args, k) is not None}
    if kwargs and name.startswith("fcn"):
        raise ValueError(f"--features / --depth do not apply to {name} (VGG-16 is fixed).")
    return kwargs


def _compiled_costs(compiled) -> tuple[float, int | None]:
    """(FLOPs per device per call, compiled memory bytes or None) from XLA's analyses."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX returned one dict per device program
        cost = cost[0]
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = None
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        stats = None
    if stats is not None:
        memory = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                     + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    return flops, memory


def _peak_memory(devices) -> int | None:
    peaks = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


@functools.cache
def _initial_state(model_name: str, dtype: str, args_key: tuple, in_channels: int):
    """(model, TrainState with Adam) for one model config, built once and placed per case.

    The params do not depend on the batch shape, so one small init serves every case
    (`create_train_state` compiles the whole initialisation, which is not cheap).
    """
    import jax
    import jax.numpy as jnp

    from flaxseg.models import create_model, model_geometry
    from flaxseg.train import create_optimizer, create_train_state

    num_classes, kwargs = args_key[0], dict(args_key[1])
    model = create_model(model_name, num_classes=num_classes, dtype=jnp.dtype(dtype), **kwargs)
    tx = create_optimizer({"name": "adam", "learning_rate": 1e-3}, num_train_steps=1)
    # A small input the model takes (its declared geometry: the VALID U-Net's sizes).
    size = model_geometry(model).smallest_input(32)
    state = create_train_state(model, tx, jax.random.key(0), (1, size, size, in_channels))
    return model, state


def case_devices(num_devices: int) -> list:
    """The first `num_devices / process_count` devices of every process, by process."""
    import jax

    per_process, rest = divmod(num_devices, jax.process_count())
    if rest or not 1 <= per_process <= jax.local_device_count():
        raise ValueError(f"{num_devices} devices cannot be taken equally from "
                         f"{jax.process_count()} processes of {jax.local_device_count()}.")
    return [d for p in range(jax.process_count())
            for d in jax.local_devices(process_index=p)[:per_process]]


def _prepare(case: Case, args: argparse.Namespace):
    """Builds (function with `.lower`, its operands, num_params, model kwargs) for one case."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxseg.losses import get_loss_fn
    from flaxseg.models import model_geometry
    from flaxseg.train import DataParallel, make_train_step
    from flaxseg.train.steps import variables_of

    kwargs = _model_kwargs(case.model, args)
    if case.remat != "none":
        kwargs["remat"] = case.remat
    model, state = _initial_state(case.model, case.dtype,
                                  (args.num_classes, tuple(sorted(kwargs.items()))),
                                  args.in_channels)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    # A clear error for a size the model cannot take (e.g. an invalid VALID U-Net size).
    height, width = height_width(case.image_size)
    model_geometry(model).output_shape(height, width, model=f"{case.model} (--image_sizes)")
    par = DataParallel(case.parallel, devices=case_devices(case.num_devices),
                       spatial_partitions=case.spatial_partitions)
    rows = par.process_rows(case.global_batch)
    rng = np.random.default_rng(1)
    # This process's rows of the batch, placed before timing (no host transfer per step).
    batch = par.put_batch({
        "image": rng.random((rows.stop - rows.start, height, width, args.in_channels),
                            np.float32),
        "label": rng.integers(0, args.num_classes, (rows.stop - rows.start, height, width),
                              dtype=np.int32),
    })
    if case.mode == "train":
        # The train step donates (consumes) its state: place a copy of the cached one.
        fn = make_train_step(model, get_loss_fn("cross_entropy"), args.num_classes,
                             parallel=par)
        operands = [par.put_state(jax.tree.map(jnp.copy, state)), batch]
    else:
        def infer(variables, batch):
            return model.apply(variables, batch["image"], train=False)

        fn = par.compile(infer, sharded_output=True)
        operands = [par.put_state(variables_of(state)), batch]
    return fn, operands, int(num_params), kwargs, _saved_activations(case, args, model, state)


def _saved_activations(case: Case, args: argparse.Namespace, model, state) -> int | None:
    """Bytes one device keeps for the backward pass (train only): its batch's residuals,
    split over the devices that share each image."""
    if case.mode != "train":
        return None
    from flaxseg.train.memory import residual_bytes
    from flaxseg.train.steps import variables_of

    shape = (case.per_device_batch, *height_width(case.image_size), args.in_channels)
    return residual_bytes(model, variables_of(state), shape) // case.spatial_partitions


def run_case(case: Case, args: argparse.Namespace, env: dict[str, Any],
             peak: Peak | None, pipeline_images_per_s: float | None) -> dict[str, Any]:
    """Compiles, warms up and times one configuration; returns its JSON record."""
    import jax

    fn, operands, num_params, kwargs, saved_activations = _prepare(case, args)
    start = time.perf_counter()
    compiled = fn.lower(*operands).compile()
    compile_s = time.perf_counter() - start
    flops_per_step, compiled_memory = _compiled_costs(compiled)
    record: dict[str, Any] = {**asdict(case), "global_batch": case.global_batch,
                              "num_processes": jax.process_count(),
                              "model_kwargs": kwargs, "num_params": num_params,
                              "compile_s": compile_s, "compiled_memory_bytes": compiled_memory,
                              "saved_activation_bytes": saved_activations,
                              **{k: env[k] for k in ENV_FIELDS}}
    if args.memory_only:
        return record

    def call(operands):
        out = compiled(*operands)
        jax.block_until_ready(out)
        # A train step returns (state, metrics) and donates the old state: carry it on.
        return [out[0], operands[1]] if case.mode == "train" else operands

    for _ in range(args.warmup):
        operands = call(operands)
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        operands = call(operands)
        times.append(time.perf_counter() - begin)

    global_batch = case.global_batch
    record.update(step_statistics(times, global_batch, case.num_devices))
    step_s = record["step_ms_median"] / 1e3
    record.update(
        flops_per_step_per_device=flops_per_step,
        # A device holds 1/spatial_partitions of each of its group's images.
        flops_per_image=flops_per_step * case.spatial_partitions / case.per_device_batch,
        tflops_per_s_per_device=peaks.achieved_tflops(flops_per_step, step_s),
        peak_tflops_per_device=peak.tflops if peak else None,
        peak_source=peak.source if peak else "unknown device: add it to benchmarks/peaks.py",
        mfu=peaks.mfu(flops_per_step, step_s, peak.tflops) if peak else None,
        peak_memory_bytes=_peak_memory([d for d in case_devices(case.num_devices)
                                        if d.process_index == jax.process_index()]),
        pipeline_images_per_s=pipeline_images_per_s,
        weak_scaling_efficiency=None,
        timed_steps=args.steps,
        warmup_steps=args.warmup,
        load_average=os.getloadavg()[0],
        timestamp=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    return record


def pipeline_throughput(image_size: int | str, batch_size: int, in_channels: int,
                        num_batches: int) -> float:
    """Images/s of flaxseg's training loader on this process (its rows of each global batch
    of `batch_size`): synthetic scenes + default augmentation.

    Timed from the loader's creation to its `num_batches`-th batch, start-up included,
    so the prefetch buffer cannot make it look faster than it sustains.
    """
    from flaxseg.data import augment_config, create_source, dataset_config
    from flaxseg.data.pipeline import create_train_iterator

    config = dataset_config("synthetic", image_size=height_width(image_size),
                            num_channels=in_channels,
                            num_train=max(256, 2 * batch_size))
    source = create_source(config, "train")
    start, images = time.perf_counter(), 0
    with create_train_iterator(source, batch_size=batch_size, seed=0,
                               augment=augment_config(),
                               image_size=height_width(image_size)) as iterator:
        for _ in range(num_batches):
            images += len(next(iterator)["image"])  # this process's rows
        return images / (time.perf_counter() - start)


def scaling_counts(max_devices: int, num_processes: int = 1) -> list[int]:
    """1, 2, 4, ... up to `max_devices` per process, and `max_devices` itself; times the
    process count (each process gives the same number of devices)."""
    per_process = sorted({n for n in (2**k for k in range(max_devices.bit_length()))
                          if n <= max_devices} | {max_devices})
    return [num_processes * n for n in per_process]


def cases(args: argparse.Namespace, max_devices: int, num_processes: int = 1) -> list[Case]:
    """Every configuration the flags ask for, in run order.

    `--scaling` runs each configuration's mesh step on `scaling_counts` devices;
    `--spatial_partitions=S,...` runs it with each image split over S devices (the mesh on
    S devices per process). `--quick` runs jit inference at every batch and jit training at
    the largest, then mesh training at the largest batch on 1..N devices. `max_devices` is
    per process.
    """
    grid = [
        (model, size, batch, dtype, mode, remat)
        for model in args.models
        for size in args.image_sizes
        for dtype in args.dtype
        for mode in args.modes
        for batch in args.batch_sizes
        for remat in args.remat
    ]
    counts = scaling_counts(max_devices, num_processes)
    if args.quick:  # every code path, with few (slow-to-compile) training cases
        largest = max(args.batch_sizes)
        todo = [Case(*g, "jit", 1) for g in grid if g[4] == "infer" or g[2] == largest]
        scaled = [g for g in grid if g[4] == "train" and g[2] == largest]
        if num_processes > 1:  # 'jit' runs in one process only
            todo = []
        return todo + [Case(*g, "mesh", n) for g in scaled for n in counts]
    if args.scaling:
        return [Case(*g, "mesh", n) for g in grid for n in counts]
    if args.spatial_partitions:
        return [Case(*g, "mesh", num_processes * p, p) for g in grid
                for p in args.spatial_partitions]
    return [Case(*g, args.parallel, counts[-1] if args.parallel != "jit" else 1)
            for g in grid]


def add_scaling_efficiency(records: list[dict[str, Any]]) -> None:
    """Sets `weak_scaling_efficiency` = img/s(n) / (n / n0 * img/s(n0)) on mesh and pmap
    records, n0 the fewest devices the same configuration ran on (None for jit)."""
    key = ("model", "image_size", "per_device_batch", "dtype", "mode", "remat", "parallel")
    spread = [r for r in records if r["parallel"] != "jit" and r["spatial_partitions"] == 1]
    fewest: dict[tuple, dict[str, Any]] = {}
    for r in sorted(spread, key=lambda r: r["num_devices"]):
        fewest.setdefault(tuple(r[k] for k in key), r)
    for r in spread:
        first = fewest[tuple(r[k] for k in key)]
        r["weak_scaling_efficiency"] = r["images_per_s"] / (
            r["num_devices"] / first["num_devices"] * first["images_per_s"])


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The results as a GitHub markdown table (device kind in the first column)."""
    header = ("| device | model | size | batch/dev | devices | split | remat | dtype | mode | "
              "compile s | step ms (p10-p90) | img/s | img/s/dev | GFLOP/img | TFLOP/s/dev | "
              "MFU | scaling eff. | peak mem MiB | saved act. MiB | pipeline img/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        memory = r["peak_memory_bytes"] or r["compiled_memory_bytes"]
        lines.append(
            f"| {r['device_kind']} | {r['model']} | {r['image_size']} | {r['per_device_batch']} "
            f"| {r['num_devices']} | {r['spatial_partitions']} | {r['remat']} | {r['dtype']} "
            f"| {r['mode']} | {r['compile_s']:.1f} "
            f"| {r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f}) "
            f"| {r['images_per_s']:.1f} | {r['images_per_s_per_device']:.1f} "
            f"| {r['flops_per_image'] / 1e9:.2f} | {r['tflops_per_s_per_device']:.3f} "
            f"| {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}% "
            f"| {_fmt(r['weak_scaling_efficiency'], '.2f')} "
            f"| {_fmt(memory and memory / 2**20, '.0f')} "
            f"| {_fmt(r['saved_activation_bytes'] and r['saved_activation_bytes'] / 2**20, '.1f')} "
            f"| {_fmt(r['pipeline_images_per_s'], '.0f')} |"
        )
    notes = {r["peak_source"] for r in records}
    lines.append("")
    lines.extend(f"Peak: {note}." for note in sorted(notes))
    if any(r["peak_memory_bytes"] is None for r in records):
        lines.append("peak mem: compiled program size (arguments + outputs + temporaries) "
                     "where the device reports no memory statistics.")
    return "\n".join(lines)


def memory_table(records: list[dict[str, Any]]) -> str:
    """`--memory_only` results: per-device compiled memory and saved activations."""
    header = ("| device | model | size | batch/dev | devices | split | remat | dtype | mode | "
              "compile s | compiled MiB/dev | saved act. MiB/dev |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in records:
        compiled, saved = r["compiled_memory_bytes"], r["saved_activation_bytes"]
        lines.append(
            f"| {r['device_kind']} | {r['model']} | {r['image_size']} | {r['per_device_batch']} "
            f"| {r['num_devices']} | {r['spatial_partitions']} | {r['remat']} | {r['dtype']} "
            f"| {r['mode']} | {r['compile_s']:.1f} | {_fmt(compiled and compiled / 2**20, '.1f')} "
            f"| {_fmt(saved and saved / 2**20, '.1f')} |")
    return "\n".join(lines)


def plot_records(records: list[dict[str, Any]], path: str) -> None:
    """images/s against per-device batch size, one line per model/size/mode/dtype/parallel."""
    from benchmarks.plot import line_plot

    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        name = (f"{r['model']} {r['image_size']}px {r['mode']} {r['dtype']}"
                f" {r['parallel']} x{r['num_devices']}")
        series.setdefault(name, []).append((r["per_device_batch"], r["images_per_s"]))
    device = records[0]["device_kind"]
    line_plot(series, path, title=f"flaxseg throughput on {device} (global images/s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_devices(args.num_devices)
    from flaxseg.train import distributed

    given = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in given) or distributed.cluster_environment():
        distributed.initialize(*given)
    import jax

    available = jax.local_device_count()
    num_devices = args.num_devices or available
    if num_devices > available:
        raise SystemExit(f"--num_devices={num_devices} but only {available} devices exist.")
    env = environment()
    chief = jax.process_index() == 0
    # One peak per dtype: the data sheet, or on CPU a matmul probe run before any model.
    device_peaks = {dtype: None if args.memory_only
                    else peaks.device_peak(env["device_kind"], env["platform"], dtype)
                    for dtype in args.dtype}
    pipeline: dict[tuple[int, int], float | None] = {}
    records = []
    todo = cases(args, num_devices, jax.process_count())
    for i, case in enumerate(todo):
        global_batch = case.global_batch
        pipe_key = (case.image_size, global_batch)
        if pipe_key not in pipeline:
            pipeline[pipe_key] = (pipeline_throughput(case.image_size, global_batch,
                                                      args.in_channels, args.pipeline_batches)
                                  if args.pipeline_batches and not args.memory_only else None)
        if chief:
            print(f"[{i + 1}/{len(todo)}] {case}", file=sys.stderr, flush=True)
        records.append(run_case(case, args, env, device_peaks[case.dtype], pipeline[pipe_key]))
    if not chief:
        return 0
    return write_results(records, args)


def write_results(records: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """results.jsonl, results.md (printed) and, for timed runs, images_per_s.png."""
    os.makedirs(args.out_dir, exist_ok=True)
    written = [os.path.join(args.out_dir, "results.jsonl"),
               os.path.join(args.out_dir, "results.md")]
    if args.memory_only:
        table = memory_table(records)
    else:
        add_scaling_efficiency(records)
        table = markdown_table(records)
        written.append(os.path.join(args.out_dir, "images_per_s.png"))
        plot_records(records, written[2])
    with open(written[0], "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    with open(written[1], "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\nwrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    from flaxseg import cli

    sys.exit(cli.run(main))
