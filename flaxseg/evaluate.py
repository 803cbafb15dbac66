"""`python -m flaxseg.evaluate`: the FCN metric table of a trained run on any split.

For a dataset of binary membrane maps (`dataset.membrane_class` set: ISBI 2012) it also
reports the ISBI 2012 challenge's pixel error and Rand error (`metrics.isbi_errors`).
`--trimap=1,2,4` adds the DeepLab papers' trimap: the scores of the pixels within 1, 2
and 4 px of a label boundary, and of the rest (`metrics.trimap_scores`).

    python -m flaxseg.evaluate --workdir=runs/default                      # val split
    python -m flaxseg.evaluate --workdir=runs/default --split=test --mode=pad --flip
    python -m flaxseg.evaluate --workdir=runs/isbi --mode=overlap_tile     # native 512 px
    python -m flaxseg.evaluate --workdir=runs/default --trimap=1,2,4       # edges apart

The run's model, weights and config come from its latest checkpoint
(`--step` for another); the split is read from the dataset in that config. With
`--input_size=config` every example is brought to the config's `image_size` exactly
as the training loop's evaluation does; `native` keeps each image's own size (for
`pad`, `sliding` and `overlap_tile`); `auto` (default) picks `config` for `--mode=whole`
and `native` otherwise.

`--mode` defaults to `auto` (from the model's geometry: `pad` for most nets), as in
`predict` and `export`, so the default scores are those of the procedure an exported
artifact runs. Every option given is applied or refused (`--tile_size` with `--mode=pad`
is an error), and the first line names every option in effect.

`--mode=whole --input_size=config` without `--flip`, `--scales` or `--limit` is the
training loop's own evaluation (`flaxseg.train.loop.evaluate`: global batches over every
device of every process); the other modes run `evaluate(model, variables, source, ...)`
below, each process on its share of the examples, the confusion matrices summed over
processes.
Several processes take the same flags as `python -m flaxseg.train`
(`--coordinator_address`, `--num_processes`, `--process_id`, ...).

The library side, `evaluate(model, variables, source, ...)`, and the inference flags
shared with `python -m flaxseg.predict` live here too.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from flaxseg import cli, inference, metrics
from flaxseg.models import model_geometry
from flaxseg.train import distributed

Example = dict[str, np.ndarray]

INPUT_SIZES = ("auto", "config", "native")


def _center_crop(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (labels.shape[1] - height) // 2, (labels.shape[2] - width) // 2
    return labels[:, top : top + height, left : left + width]


def _batches(examples: Iterable[Example], batch_size: int) -> Iterable[Example]:
    """Stacks consecutive examples of one image shape into batches of up to `batch_size`."""
    pending: list[Example] = []
    for example in examples:
        if pending and (
            len(pending) == batch_size or example["image"].shape != pending[0]["image"].shape
        ):
            yield {key: np.stack([e[key] for e in pending]) for key in ("image", "label")}
            pending = []
        pending.append(example)
    if pending:
        yield {key: np.stack([e[key] for e in pending]) for key in ("image", "label")}


def evaluate(
    model: Any,
    variables: Any,
    source: Any,
    *,
    preprocess: Callable[[Example], Example] | None = None,
    mode: str = "whole",
    batch_size: int = 4,
    limit: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    membrane_class: int | None = None,
    trimap: Sequence[int] = (),
    **predict_kwargs: Any,
) -> dict[str, Any]:
    """FCN-paper scores of `model` on a data source (`flaxseg.data.create_source`).

    Args:
      variables: on devices of this process only (`for_this_process`).
      source: `len(source)`, `source[i]` -> `{'image': uint8 [H, W, C], 'label': int
        [H, W]}` and `source.info` (`num_classes`, `class_names`, `ignore_index`).
      preprocess: example -> `{'image': float32 [h, w, C], 'label': int [h, w]}`
        (normalise, resize); default: image / 255, label as is.
      mode, batch_size, predict_kwargs: as `inference.predict_logits` (`flip`,
        `tile_size`, ...). Consecutive examples of one size are predicted together.
        Labels are centre-cropped to the logits when they are smaller (VALID U-Net,
        mode 'whole').
      limit: evaluate only the first `limit` examples.
      on_progress: called with (examples done, total) after each batch (this process's).
      membrane_class: the class index of membranes in binary membrane maps (ISBI 2012:
        0); set, the scores also hold the ISBI 2012 challenge's `pixel_error` and
        `rand_error` (`metrics.isbi_errors`; the Rand error's segments are those of each
        whole predicted image, so use a mode that predicts the whole image).
      trimap: band widths in pixels, e.g. `(1, 2, 4)`; given, the scores also hold
        `trimap`: `metrics.trimap_scores` of the pixels within each width of a label
        boundary and of the rest (the DeepLab papers' trimap).

    Under several processes each takes every `process_count()`-th example and the
    confusion matrices (and Rand pair counts) are summed over all of them (every process
    must call this). Returns `metrics.segmentation_scores` of the summed confusion matrix
    (void pixels left out), plus `num_images`.
    """
    from flaxseg.train.parallel import sum_over_processes

    info = source.info
    total = len(source) if limit is None else min(limit, len(source))
    if total < 1:
        raise ValueError(
            f"nothing to evaluate: the source has {len(source)} examples, limit={limit}"
        )
    extra = _ExtraCounts(info, membrane_class, trimap)
    if preprocess is None:
        unit = inference.normalizer()

        def preprocess(example: Example) -> Example:
            return {"image": unit(example["image"]), "label": example["label"]}

    confusion_fn = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
    share = range(jax.process_index(), total, jax.process_count())
    batch_sizes: list[int] = []

    def batch_confusions() -> Iterable[dict[str, Any]]:
        for batch in _batches((preprocess(source[i]) for i in share), batch_size):
            logits = inference.predict_logits(
                model, variables, batch["image"], mode=mode, batch_size=batch_size,
                **predict_kwargs
            )
            if logits.shape[-1] != info.num_classes:
                raise ValueError(
                    f"the model predicts {logits.shape[-1]} classes but the dataset has "
                    f"{info.num_classes}; evaluate on the dataset the run was trained on"
                )
            labels = _center_crop(batch["label"].astype(np.int32), *logits.shape[1:3])
            preds = np.argmax(logits, axis=-1).astype(np.int32)
            extra.add(labels, preds)
            batch_sizes.append(len(labels))
            yield {"confusion": confusion_fn(labels, preds, info.num_classes,
                                             info.ignore_index)}

    def progress(batches_read: int) -> None:
        on_progress(sum(batch_sizes[:batches_read]), len(share))

    sums = metrics.sum_batches(batch_confusions(), info.num_classes,
                               on_batch=on_progress and progress)
    confusion = sum_over_processes(sums.confusion)
    scores = metrics.segmentation_scores(confusion, info.class_names)
    scores.update(extra.scores(confusion))
    scores["num_images"] = total
    return scores


class _ExtraCounts:
    """What `evaluate` counts beside the confusion matrix, per batch on the host: the ISBI
    2012 Rand pair counts (`membrane_class` set) and the trimap's band confusions
    (`trimap` widths given); `scores` sums them over processes and scores them."""

    def __init__(self, info: Any, membrane_class: int | None, trimap: Sequence[int]):
        self.info = info
        self.membrane_class = (None if membrane_class is None else
                               metrics.check_membrane_class(membrane_class, info.num_classes))
        self.trimap = metrics.check_trimap_widths(trimap) if trimap else ()
        self.rand = np.zeros(4, np.int64)
        self.bands = np.zeros((len(self.trimap), info.num_classes, info.num_classes),
                              np.int64)
        self._bands_fn = jax.jit(metrics.trimap_confusions, static_argnums=(2, 3, 4))
        self._pending: jax.Array | None = None  # the last batch's bands, still computing

    def _take_pending(self) -> None:
        # One batch behind, as metrics.sum_batches reads: the host never waits on the
        # batch just dispatched; int64 on the host, as int32 counts overflow.
        if self._pending is not None:
            self.bands += np.asarray(self._pending)
            self._pending = None

    def add(self, labels: np.ndarray, preds: np.ndarray) -> None:
        """One batch: int32 `[B, H, W]` labels and predictions."""
        if self.membrane_class is not None:
            for label, pred in zip(labels, preds, strict=True):
                self.rand += metrics.rand_pair_counts(label, pred, self.membrane_class,
                                                      self.info.ignore_index)
        if self.trimap:
            self._take_pending()
            self._pending = self._bands_fn(labels, preds, self.info.num_classes,
                                           self.trimap, self.info.ignore_index)

    def scores(self, confusion: np.ndarray) -> dict[str, Any]:
        """The ISBI errors and `trimap` of the summed `confusion` (every process calls)."""
        from flaxseg.train.parallel import sum_over_processes

        out: dict[str, Any] = {}
        if self.membrane_class is not None:
            out.update(metrics.isbi_errors(confusion, sum_over_processes(self.rand),
                                           self.membrane_class))
        if self.trimap:
            self._take_pending()
            out["trimap"] = metrics.trimap_scores(confusion, sum_over_processes(self.bands),
                                                  self.trimap, self.info.class_names)
        return out


def eval_preprocess(
    config: ml_collections.ConfigDict, input_size: str = "config"
) -> Callable[[Example], Example]:
    """The example preprocessing of a run's config.

    `'config'`: `flaxseg.data.transforms.eval_transform` to `config.dataset.image_size`,
    the training loop's evaluation input. `'native'`: the image keeps its size and only
    gets the config's normalisation.
    """
    from flaxseg.data import transforms

    if input_size == "config":
        image_size = tuple(config.dataset.image_size)

        def preprocess(example: Example) -> Example:
            return transforms.eval_transform(
                example,
                image_size=image_size,
                augment=config.augment,
                ignore_index=config.dataset.ignore_index,
            )

        return preprocess
    if input_size == "native":
        normalize = image_normalizer(config)

        def preprocess(example: Example) -> Example:
            return {"image": normalize(example["image"]), "label": example["label"]}

        return preprocess
    raise ValueError(f"input_size must be 'config' or 'native', got {input_size!r}")


def image_normalizer(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 `[H, W, C]` -> float32, normalised as the run's `config.augment` says."""
    from flaxseg.data import transforms

    mean, std = transforms.normalization_stats(config.augment, int(config.dataset.num_channels))
    return inference.normalizer(mean, std)


# -- flags shared with `python -m flaxseg.predict` ------------------------------------------


def define_inference_flags() -> None:
    """Defines the flags that pick the run and the inference mode (absl, global FLAGS).

    One default mode for evaluate, predict and export (`auto`), so that `evaluate`'s
    default number is the one an exported artifact reproduces.
    """
    flags.DEFINE_string("workdir", None, "A training run's --workdir (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_string("model", None, "The run's model, when it is your own "
                        "'package.module:Attr': naming it allows importing that module "
                        "(a saved config never imports code by itself).")
    flags.DEFINE_bool("trust_saved_code", False, "Import whatever 'package.module:Attr' model "
                      "the run's saved config names (only for runs you trust).")
    flags.DEFINE_enum(
        "mode",
        "auto",
        ("auto", *inference.MODES),
        "whole | pad | sliding | gaussian | overlap_tile; auto (from the model's geometry): "
        "overlap_tile for a net whose output is smaller than its input (the VALID U-Net), "
        "pad for a net with a stride (U-Nets, FCNs, the encoder-decoder), else whole.",
    )
    flags.DEFINE_bool("flip", False, "Average with the horizontally mirrored prediction.")
    flags.DEFINE_list("scales", None, "Multi-scale test-time augmentation: the image at each "
                      "scale, logits resized back and averaged, e.g. 0.5,0.75,1,1.25,1.5,1.75.")
    flags.DEFINE_list(
        "tile_size",
        None,
        "sliding / gaussian / overlap_tile input tile 'H,W' or 'S' (default: the config's "
        "image_size; given with --mode=auto, it picks gaussian, or overlap_tile for a VALID "
        "net), or 'auto': the largest square tile whose compiled forward pass of "
        "--tile_batch tiles fits --memory_budget_gb (or the device's memory).",
    )
    flags.DEFINE_alias("tile", "tile_size")
    flags.DEFINE_float("overlap", 0.5, "sliding / gaussian: the fraction of a tile its "
                       "neighbour overlaps (0.5: nnU-Net's).")
    flags.DEFINE_list("stride", None, "sliding / gaussian tile step 'H,W' or 'S' (default: "
                      "from --overlap).")
    flags.DEFINE_list("multiple", None, "pad: pad to a multiple of this (default: the model's "
                      "stride).")
    flags.DEFINE_integer("batch_size", 4, "Images per call of the compiled procedure.")
    flags.DEFINE_integer("tile_batch", 4, "Tile positions per forward pass (tiled modes).")
    flags.DEFINE_float("memory_budget_gb", 0.0, "--tile_size=auto, predict's --mode=auto "
                       "(one pass or tiles) and export's (the size of its tiles): the device "
                       "memory one forward pass may use (0: what the device reports; a CPU "
                       "reports none, and those two then take half of the host's memory).")
    flags.DEFINE_integer("max_tile", 1024, "--tile_size=auto: the largest tile side tried.")
    flags.mark_flag_as_required("workdir")
    distributed.define_flags()


def size_flag(value: list[str] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value]
    except ValueError:
        raise ValueError(f"--{name} takes 'H,W' or 'S' (integers), got {','.join(value)}") from None
    if len(sizes) not in (1, 2):
        raise ValueError(f"--{name} takes 'H,W' or 'S', got {','.join(value)}")
    return (sizes[0], sizes[-1])


def _scales_flag(value: list[str] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except ValueError:
        raise ValueError(f"--scales takes numbers such as 0.5,1,1.5; got {','.join(value)}"
                         ) from None


def auto_tile_size(model: Any, variables: Any, channels: int, tile_batch: int,
                   budget_gb: float, max_tile: int, host_fallback: bool = False) -> int:
    """`--tile_size=auto`: the largest square tile (one the model's geometry takes) whose
    compiled forward pass of `tile_batch` tiles fits the memory budget; says so.
    `host_fallback`: see `memory.memory_budget`."""
    from flaxseg.train import memory

    budget, where = memory.memory_budget(
        budget_gb, what="--tile_size=auto",
        fix="set --memory_budget_gb (the GiB one device may use), or give --tile_size",
        host_fallback=host_fallback)
    candidates = memory.tile_candidates(model_geometry(model), max_tile)
    size, why = memory.fit_tile_size(
        lambda s: memory.forward_bytes(model, variables, (tile_batch, s, s, channels)),
        candidates, budget)
    distributed.say(f"{why} ({where}).")
    return size


# The flags that apply only to some modes (or only with another flag): any other
# combination is refused, so that no option given is silently ignored.
_TILED = f"the tiled modes ({', '.join(inference.TILED_MODES)})"
_FLAG_APPLIES = {
    "tile_size": (inference.TILED_MODES, _TILED),
    "tile_batch": (inference.TILED_MODES, _TILED),
    "overlap": (("sliding", "gaussian"), "--mode=sliding and gaussian"),
    "stride": (("sliding", "gaussian"), "--mode=sliding and gaussian"),
    "multiple": (("pad",), "--mode=pad"),
}


def refuse_unused_flags(mode: str, given: set[str], sized_auto: bool = False) -> None:
    """Raises ValueError for a flag in `given` (the flags on the command line) that the
    resolved `mode` would ignore. `sized_auto`: --mode=auto chose between one pass and
    tiles from the images' size (`fit_mode_to_images`), which reads the budget flags."""
    for name, (modes, where) in _FLAG_APPLIES.items():
        if name in given and mode not in modes:
            raise ValueError(f"--{name} applies to {where}, not to mode {mode!r}; drop it "
                             "or pick such a --mode (--mode=auto picks one when --tile_size "
                             "is given).")
    auto_tile = mode in inference.TILED_MODES and flags.FLAGS.tile_size == ["auto"]
    for name in ("memory_budget_gb", "max_tile"):
        if name in given and not (auto_tile or sized_auto):
            raise ValueError(f"--{name} applies to --tile_size=auto (a tiled mode) and to "
                             "predict's and export's --mode=auto only; drop it or pass "
                             "--tile_size=auto.")


def options_text(options: dict[str, Any], mode_flag: str) -> str:
    """Every inference option in effect, for a command's header line: `mode=pad (auto:
    from the model's geometry), flip=False, batch_size=4, scales=(0.75, 1.0, 1.25), ...`
    (scales (1.0,) where none are given)."""
    if options["mode"] in inference.TILED_MODES and flags.FLAGS["tile_size"].present:
        why = "--tile_size given: a tiled mode, streamed in bands"
    elif options["mode"] == "gaussian":  # no geometry defaults to it: fit_mode_to_images
        why = "an image too large for one pass: gaussian tiles, streamed in bands"
    else:
        why = "from the model's geometry"
    shown = {"mode": options["mode"] + (f" (auto: {why})" if mode_flag == "auto" else ""),
             **{k: v for k, v in options.items() if k not in ("mode", "sharding")}}
    shown["scales"] = tuple(options.get("scales") or (1.0,))
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def fit_mode_to_images(model: Any, variables: Any, config: ml_collections.ConfigDict,
                       mode: str, image_sizes: list[tuple[int, int]]) -> bool:
    """Whether one `mode` ('whole' or 'pad') forward pass over the largest of `image_sizes`
    ((height, width), at the largest --scales, padded as 'pad' pads, split over the run's
    spatial partitions) fits --memory_budget_gb (or the device's memory; a CPU's: half
    of the host's); says which, and that tiles follow when it does not. The compiled
    pass's memory analysis decides; nothing runs."""
    from flaxseg.train import memory

    values = flags.FLAGS
    height, width = max(image_sizes, key=lambda size: size[0] * size[1])
    scale = max(_scales_flag(values.scales) or (1.0,))
    stride = model_geometry(model).stride
    multiple = size_flag(values.multiple, "multiple") or (stride, stride)
    if mode == "whole":
        multiple = (1, 1)
    rows, cols = (-(-math.ceil(n * scale) // m) * m for n, m in zip((height, width), multiple,
                                                                     strict=True))
    rows = -(-rows // int(config.get("spatial_partitions", 1)))
    budget, where = memory.memory_budget(
        values.memory_budget_gb, what="--mode=auto", fix="set --memory_budget_gb",
        host_fallback=True)
    used = memory.forward_bytes(model, variables,
                                (1, rows, cols, int(config.dataset.num_channels)))
    distributed.say(memory.one_pass_verdict("--mode=auto", mode, (height, width), used, budget,
                                            where, "tiles instead (--tile_size=auto)"))
    return used <= budget


def inference_options(model: Any, variables: Any, config: ml_collections.ConfigDict,
                      image_sizes: list[tuple[int, int]] | None = None,
                      tiled_fallback: bool = False) -> dict[str, Any]:
    """`predict_logits` keyword arguments from the shared flags (after parsing); raises
    ValueError for a flag the mode would ignore. `image_sizes` (predict: the input files'
    (height, width)): --mode=auto without --tile_size tiles them when one pass over the
    largest would not fit the memory budget (`fit_mode_to_images`). `tiled_fallback`
    (export): --mode=auto's one-pass procedure gets tiles sized by the budget flags
    (`flaxseg.export.tiled_fallback`), so they apply."""
    values = flags.FLAGS
    # --mode=auto with --tile_size tiles (a tile size is never ignored); explicit whole or
    # pad with it is refused below.
    mode = (inference.default_mode(model, tiled=values["tile_size"].present)
            if values.mode == "auto" else values.mode)
    sized_auto = (bool(image_sizes) or tiled_fallback) and values.mode == "auto" and mode in (
        "whole", "pad")
    refuse_unused_flags(mode, {name for name in _FLAG_APPLIES.keys() | {
        "memory_budget_gb", "max_tile"} if values[name].present}, sized_auto)
    if image_sizes and sized_auto and not fit_mode_to_images(model, variables, config, mode,
                                                             image_sizes):
        mode = inference.default_mode(model, tiled=True)
        refuse_unused_flags(mode, {name for name in _FLAG_APPLIES if values[name].present})
    options: dict[str, Any] = {"mode": mode, "flip": values.flip, "batch_size": values.batch_size,
                               "scales": _scales_flag(values.scales)}
    if mode in inference.TILED_MODES:
        if values.tile_size == ["auto"] or not values["tile_size"].present and sized_auto:
            side = auto_tile_size(model, variables, int(config.dataset.num_channels),
                                  values.tile_batch, values.memory_budget_gb, values.max_tile,
                                  host_fallback=sized_auto)
            tile = (side, side)
        else:
            tile = size_flag(values.tile_size, "tile_size")
        options["tile_size"] = tile or tuple(int(s) for s in config.dataset.image_size)
        options["tile_batch"] = values.tile_batch
    if mode in ("sliding", "gaussian"):
        options["overlap"] = values.overlap
        if values.stride is not None:
            options["stride"] = size_flag(values.stride, "stride")
    if mode == "pad" and values.multiple is not None:
        options["multiple"] = size_flag(values.multiple, "multiple")
    return options


def _progress(done: int, total: int) -> None:
    if done == total or done * 10 // total != (done - 1) * 10 // total:
        print(f"  evaluated {done}/{total} images", file=sys.stderr, flush=True)


def load_run(argv: list[str], image_sizes: list[tuple[int, int]] | None = None,
             tiled_fallback: bool = False
             ) -> tuple[Any, Any, ml_collections.ConfigDict, dict[str, Any]]:
    """The entry points' shared start: `(model, variables, config, predict options)`.

    Rejects positional arguments, starts `jax.distributed` when the flags or the
    environment ask for it, quiets library logs, loads `--workdir` (at `--step`) with the
    variables replicated over every device of every process, and reads the shared
    inference flags (`image_sizes`, `tiled_fallback`: see `inference_options`). Raises ValueError /
    FileNotFoundError for a workdir or option that cannot be used.
    """
    if len(argv) > 1:
        raise cli.unexpected_arguments(argv[1:])
    from flaxseg.train.checkpoint import load_for_inference
    from flaxseg.train.parallel import DataParallel
    from flaxseg.train.reporting import quiet_library_logs

    quiet_library_logs()
    distributed.initialize_from_flags()
    model, variables, config = load_for_inference(
        flags.FLAGS.workdir, flags.FLAGS.step, sharding=DataParallel("mesh").replicated,
        model_name=flags.FLAGS.model, trust_saved_code=flags.FLAGS.trust_saved_code)
    return model, variables, config, inference_options(model, variables, config,
                                                       image_sizes, tiled_fallback)


def for_this_process(variables: Any, config: ml_collections.ConfigDict,
                     options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(variables, `predict_logits` options) for inference by this process alone.

    The variables on one local device; or, when the run split its images
    (`config.spatial_partitions` > 1) and the mode predicts whole images ('whole', 'pad'),
    replicated over that many local devices, with a `sharding` that splits each image's
    rows over them: a large image in one pass, no tiling.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from flaxseg.train.parallel import SPACE_AXIS, DataParallel

    local = DataParallel("mesh").local_copy(variables)
    spatial = int(config.get("spatial_partitions", 1))
    if spatial == 1 or options["mode"] not in ("whole", "pad"):
        return local, options
    par = DataParallel("mesh", devices=jax.local_devices()[:spatial], spatial_partitions=spatial)
    sharding = NamedSharding(par.mesh, PartitionSpec(None, SPACE_AXIS))
    return par.put_state(local), {**options, "sharding": sharding}


def tiles_over_local_devices(variables: Any, options: dict[str, Any]
                             ) -> tuple[Any, dict[str, Any]]:
    """(variables, `predict_labels` options) for streaming by this process alone: the
    variables replicated over its devices, each pass of tiles split over them
    (`tile_sharding`; `tile_batch` must be a multiple of the device count)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from flaxseg.train.parallel import AXIS_NAME, DataParallel

    par = DataParallel("mesh", devices=jax.local_devices())
    local = par.put_state(par.local_copy(variables))
    return local, {**options, "tile_sharding": NamedSharding(par.mesh, PartitionSpec(AXIS_NAME))}


def membrane_class_of(dataset: ml_collections.ConfigDict) -> int | None:
    """A run's `dataset.membrane_class` (ISBI 2012: 0), None for other datasets; a run saved
    before the key existed takes its dataset preset's."""
    if "membrane_class" in dataset:
        return dataset.membrane_class
    from flaxseg.data import available_datasets, dataset_config

    if dataset.name not in available_datasets():
        return None
    return dataset_config(dataset.name).get("membrane_class")


def _trimap_flag(value: list[str] | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return metrics.check_trimap_widths(int(v) for v in value)
    except ValueError:
        raise ValueError(f"--trimap takes distinct positive band widths in pixels, e.g. "
                         f"--trimap=1,2,4; got {','.join(value)}") from None


def _like_the_loop(options: dict[str, Any], input_size: str, limit: int | None,
                   membrane_class: int | None, trimap: tuple[int, ...]) -> bool:
    """Whether the flags ask for exactly the training loop's evaluation (which has no ISBI
    errors, no trimap, no test-time augmentation and no other option)."""
    return (options["mode"] == "whole" and input_size == "config" and not options["flip"]
            and options.get("scales") in (None, (1.0,)) and limit is None
            and membrane_class is None and not trimap)


def _loop_evaluation(model: Any, variables: Any, config: ml_collections.ConfigDict,
                     source: Any, batch_size: int) -> dict[str, Any]:
    """The training loop's evaluation over every device (batch rounded up to fill them)."""
    from flaxseg.train.config import loss_from_config
    from flaxseg.train.loop import evaluate as loop_evaluate
    from flaxseg.train.parallel import DataParallel
    from flaxseg.train.steps import make_eval_step

    par = DataParallel("mesh", spatial_partitions=config.get("spatial_partitions", 1))
    config = ml_collections.ConfigDict(config.to_dict())
    config.batch_size = -(-batch_size // par.batch_splits) * par.batch_splits
    eval_step = make_eval_step(model, loss_from_config(config), source.info.num_classes,
                               parallel=par, ignore_index=source.info.ignore_index)
    scores = loop_evaluate(eval_step, variables, par, source, config)
    return {**scores, "num_images": len(source)}


def main(argv: list[str]) -> int:
    from flaxseg.data import create_source
    from flaxseg.train.reporting import json_safe

    values = flags.FLAGS
    trimap = _trimap_flag(values.trimap)
    model, variables, config, options = load_run(argv)
    input_size = values.input_size
    if input_size == "auto":
        input_size = "config" if options["mode"] == "whole" else "native"
    source = create_source(config.dataset, values.split)
    membrane_class = membrane_class_of(config.dataset)
    like_the_loop = _like_the_loop(options, input_size, values.limit, membrane_class, trimap)
    distributed.say(
        f"Evaluating {values.workdir} on {config.dataset.name}/{values.split} "
        f"({len(source)} images, {options_text(options, values.mode)}, input_size="
        f"{input_size}" + (f", limit={values.limit}" if values.limit is not None else "")
        + (f", trimap={trimap}" if trimap else "")
        + ("; the training loop's evaluation" if like_the_loop else "") + ")"
    )
    if like_the_loop:
        scores = _loop_evaluation(model, variables, config, source, values.batch_size)
    else:
        local_variables, local_options = for_this_process(variables, config, options)
        scores = evaluate(
            model,
            local_variables,
            source,
            preprocess=eval_preprocess(config, input_size),
            limit=values.limit,
            on_progress=_progress if jax.process_index() == 0 else None,
            membrane_class=membrane_class,
            trimap=trimap,
            **local_options,
        )
    distributed.say(metrics.format_scores_table(scores))
    if values.output_json and jax.process_index() == 0:
        record = {"split": values.split, "input_size": input_size, **options, **scores}
        with open(values.output_json, "w") as f:
            json.dump(json_safe(record), f, indent=2)
        print(f"Wrote {values.output_json}")
    return 0


if __name__ == "__main__":
    define_inference_flags()
    flags.DEFINE_string("split", "val", "Dataset split: train | val | test.")
    flags.DEFINE_enum(
        "input_size",
        "auto",
        INPUT_SIZES,
        "config: resize/pad like the training evaluation; native: each image's own size; "
        "auto: config for --mode=whole, native otherwise.",
    )
    flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
    flags.DEFINE_string("output_json", None, "Also write the scores to this JSON file.")
    flags.DEFINE_list("trimap", None, "Band widths in pixels, e.g. 1,2,4: also score the "
                      "pixels within each width of a label boundary, and the rest (the DeepLab "
                      "papers' trimap).")
    cli.run_absl(main)
