"""A trained model's whole inference procedure as one portable `jax.export` artifact.

    python -m flaxseg.export --workdir=runs/default --out=model.jax
    python -m flaxseg.export --workdir=runs/isbi --out=isbi.jax --mode=overlap_tile \
        --flip --scales=0.75,1,1.25 --outputs=both --platforms=cpu,cuda,tpu

writes `model.jax`, a serialised `jax.export.Exported`, and `model.jax.json` beside it
(the sidecar: class names, palette, input channels, the size rule, the procedure, the
versions, the artifact's size and SHA-256). The program takes a uint8 image batch
`[B, H, W, C]` and returns the int32 class map `[B, H, W]` (`--outputs=labels`), the
float32 class probabilities `[B, H, W, K]` (`probabilities`) or both, in that order.
Inside it: the weights, the run's normalisation, the padding or tiling of `--mode`, the
test-time augmentation (`--flip`, `--scales`) and the argmax. B is symbolic; so are H
and W wherever the mode allows (`'whole'` on a SAME net: any multiple of its stride;
the other modes: any size); a model or mode that cannot take symbolic sizes is exported
for `--image_size` (default: the config's), and the command says so.

For a tiled procedure it also writes `model.jax.bands`: the band program (`export_bands`),
with which `flaxseg.exported` segments images of any size in bands of tile rows with
bounded memory, as `flaxseg.inference.predict_labels` does (with `--scales`, every scale
streams through it, the image resized on the host). With
`--mode=auto` (the default) and a one-pass procedure ('pad' or 'whole'),
`model.jax.bands` holds its tiled twin (`tiled_fallback`: the model's tiled mode, tiles of
`--tile_size=auto`), and `predict --exported` switches to it when one pass over the
largest input would not fit the memory budget, as `predict --mode=auto` does in process.

Running it needs jax alone (no flaxseg, no flax):

    exp = jax.export.deserialize(open("model.jax", "rb").read())
    labels = exp.call(images)          # uint8 [B, H, W, C] -> int32 [B, H, W]

or `python -m flaxseg.predict --exported=model.jax --input=... --output=...`
(`flaxseg.exported`). See docs/inference.md for the contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxseg import inference, visualize
from flaxseg.models import model_geometry
from flaxseg.normalization import Normalization

OUTPUTS = ("labels", "probabilities", "both")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
SIDECAR_SUFFIX = ".json"
BANDS_SUFFIX = ".bands"
FORMAT = "flaxseg-export/1"


def segmentation_function(model: Any, variables: Any, plan: inference.Plan,
                          normalization: Normalization, outputs: str = "labels"
                          ) -> Callable[[jax.Array], Any]:
    """uint8 images `[B, H, W, C]` -> int32 labels `[B, H', W']` and/or float32
    probabilities `[B, H', W', K]`: normalisation, `plan` and argmax, with `variables`
    as constants. Pure and traceable with symbolic sizes where the plan allows."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    logits_of = inference.logits_function(model, plan)
    normalize = _normalizer(normalization)

    def segment(images: jax.Array) -> Any:
        logits = logits_of(variables, normalize(images))
        labels = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if outputs == "labels":
            return labels
        probabilities = jax.nn.softmax(logits, axis=-1)
        return probabilities if outputs == "probabilities" else (labels, probabilities)

    return segment


def _normalizer(normalization: Normalization) -> Callable[[jax.Array], jax.Array]:
    """uint8 -> float32 as `Normalization.__call__` computes it, operation for operation."""
    mean = np.asarray(normalization.mean, np.float32)
    std = np.asarray(normalization.std, np.float32)
    return lambda images: (images.astype(jnp.float32) / jnp.float32(255.0) - mean) / std


def export_bands(model: Any, variables: Any, plan: inference.Plan, *,
                 normalization: Normalization, channels: int,
                 platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
    """The band program of a tiled plan (`inference.band_function`) lowered for
    `platforms`, for any image: the window's tile rows `n` and its width `w` are
    symbolic. Its inputs: rows `[1, th + (n - 1) * sh, w + tw - ow, C]`, the carry
    (float32 `[1, oh + (n - 1) * sh, w, K]`, and the summed weights `[oh + (n - 1) * sh,
    w, 1]` for 'sliding' and 'gaussian'), six int32 scalars.

    One scale: the rows are uint8 (the normalisation inside) and it returns the window's
    labels; `flaxseg.exported` streams images through it (`flaxseg.streaming.stream`).
    Multi-scale TTA: the rows are float32, normalised and resized on the host, and it
    returns the window's logits, for every scale (`flaxseg.streaming.stream_tta`)."""
    check_platforms(platforms)
    variables = jax.device_get(variables)
    scales = plan.scales
    plan = dataclasses.replace(plan, scales=(Fraction(1),))
    logits = scales != plan.scales
    band = inference.band_function(model, plan, logits=logits)
    normalize = (lambda rows: rows) if logits else _normalizer(normalization)

    def run(rows: jax.Array, carry: Any, *scalars: jax.Array) -> tuple[Any, Any]:
        return band(variables, normalize(rows), carry, *scalars)

    (th, tw), (oh, ow), sh = plan.tile, plan.out_tile or plan.tile, plan.step[0]
    # A window is at least one tile wide (the host pads a narrower image up to a tile).
    n, w = jax.export.symbolic_shape("n, w", constraints=(f"w >= {ow}",))
    num_classes = inference.num_classes(model, variables, channels)
    rows = jax.ShapeDtypeStruct((1, th + (n - 1) * sh, w + tw - ow, channels),
                                jnp.float32 if logits else jnp.uint8)
    window = oh + (n - 1) * sh
    carry = (jax.ShapeDtypeStruct((1, window, w, num_classes), jnp.float32),)
    if plan.mode != "overlap_tile":  # the summed weights (tiling.empty_canvas)
        carry += (jax.ShapeDtypeStruct((window, w, 1), jnp.float32),)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.export.export(jax.jit(run), platforms=tuple(platforms))(
        rows, carry, *[scalar] * 6)


def symbolic_input(model: Any, plan: inference.Plan, channels: int
                   ) -> tuple[str, tuple[int, int]] | None:
    """(shape spec for `jax.export.symbolic_shape`, the multiple H and W must be) of the
    sizes the plan takes, or None when it needs fixed sizes (the VALID U-Net's 'whole')."""
    geometry = model_geometry(model)
    if plan.mode != "whole":
        return f"b, h, w, {channels}", (1, 1)
    if geometry.output_size is not None:
        return None
    sh, sw = plan.multiple
    return f"b, {sh}*h, {sw}*w, {channels}", (sh, sw)


def check_platforms(platforms: Sequence[str]) -> None:
    """ValueError unless `platforms` is a non-empty selection of `PLATFORMS`."""
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")


def export_procedure(
    model: Any, variables: Any, plan: inference.Plan, *, normalization: Normalization,
    channels: int, outputs: str = "labels", platforms: Sequence[str] = ("cpu",),
    image_size: tuple[int, int] | None = None,
) -> tuple[jax.export.Exported, dict[str, Any]]:
    """`(exported, size rule)`: the procedure lowered for `platforms`, with B symbolic and
    H, W symbolic where the plan allows, else fixed to `image_size`. The size rule is a
    dict: `{'symbolic': True, 'multiple': [mh, mw]}` or `{'symbolic': False, 'height': H,
    'width': W, 'why': ...}`. Raises ValueError when neither works."""
    check_platforms(platforms)
    variables = jax.device_get(variables)  # constants of the program, from the host
    exporter = jax.export.export(
        jax.jit(segmentation_function(model, variables, plan, normalization, outputs)),
        platforms=tuple(platforms))
    symbolic = symbolic_input(model, plan, channels)
    why = "the model's output is not its input's size, so mode 'whole' needs one input size"
    if symbolic is not None:
        spec, multiple = symbolic
        try:
            shape = jax.export.symbolic_shape(spec)
            exported = exporter(jax.ShapeDtypeStruct(shape, jnp.uint8))
            return exported, {"symbolic": True, "multiple": list(multiple)}
        except Exception as error:  # the model's code needs concrete sizes: say which
            detail = " ".join(str(error).split())[:200]
            why = f"the model does not trace with symbolic H, W ({type(error).__name__}: {detail})"
    if image_size is None:
        raise ValueError(f"cannot export mode {plan.mode!r} for any image size: {why}. "
                         "Give --image_size=H,W to export it for one size.")
    height, width = image_size
    inference.check_size(model, variables, plan, (height, width, channels))
    shape = jax.export.symbolic_shape(f"b, {height}, {width}, {channels}")
    exported = exporter(jax.ShapeDtypeStruct(shape, jnp.uint8))
    return exported, {"symbolic": False, "height": height, "width": width, "why": why}


def size_rule_text(rule: dict[str, Any]) -> str:
    """The size rule in one sentence."""
    if not rule["symbolic"]:
        return (f"images of exactly {rule['height']}x{rule['width']} (fixed at export: "
                f"{rule['why']})")
    mh, mw = rule["multiple"]
    if (mh, mw) == (1, 1):
        return "images of any height and width"
    return f"images whose height is a multiple of {mh} and width a multiple of {mw}"


def sidecar(exported: jax.export.Exported, data: bytes, *, plan: inference.Plan,
            rule: dict[str, Any], normalization: Normalization, outputs: str,
            class_names: Sequence[str], palette: np.ndarray | None) -> dict[str, Any]:
    """The JSON sidecar of an artifact whose serialised bytes are `data`."""
    num_classes = len(class_names)
    palette, palette_source = visualize.palette_or_generated(palette, num_classes)
    return {
        "format": FORMAT,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "input": {"dtype": "uint8", "layout": "NHWC", "shape": str(exported.in_avals[0].shape),
                  "channels": int(exported.in_avals[0].shape[3]), "size_rule": rule,
                  "size_rule_text": size_rule_text(rule)},
        "outputs": ["labels", "probabilities"] if outputs == "both" else [outputs],
        "output_shapes": [str(aval.str_short()) for aval in exported.out_avals],
        "num_classes": num_classes,
        "class_names": list(class_names),
        "palette": palette.tolist(),
        # 'generated': the dataset gave no colours; these are flaxseg's, no dataset's.
        "palette_source": palette_source,
        "normalization": {**normalization.to_dict(), "inside": True},
        "procedure": procedure_info(plan),
        "platforms": list(exported.platforms),
        "versions": _versions(exported),
    }


def _versions(exported: jax.export.Exported) -> dict[str, Any]:
    import jaxlib

    import flaxseg

    return {"flaxseg": flaxseg.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "calling_convention": exported.calling_convention_version}


def procedure_info(plan: inference.Plan) -> dict[str, Any]:
    """A plan as the sidecar records it."""
    return {"mode": plan.mode, "flip": plan.flip, "scales": [float(s) for s in plan.scales],
            "multiple": plan.multiple, "tile": plan.tile, "step": plan.step,
            "out_tile": plan.out_tile, "tile_batch": plan.tile_batch}


def bands_entry(path: str | os.PathLike, data: bytes, plan: inference.Plan,
                fallback: bool = False) -> dict[str, Any]:
    """The sidecar's `bands` entry for the serialised band program `data` of the tiled
    `plan`: the artifact's own procedure, or (`fallback`) the tiles `flaxseg.exported`
    switches to when one pass of the artifact over an image would not fit in memory."""
    one_scale = plan.scales == (1,)
    return {"file": os.path.basename(os.fspath(path)) + BANDS_SUFFIX, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "inputs": ("uint8 rows (normalised inside)" if one_scale else
                       "float32 rows, normalised and resized to each scale on the host"),
            "outputs": ("uint8 labels" if one_scale else "float32 logits")
                       + " [1, window, w] and the carry (flaxseg.streaming)",
            "procedure": procedure_info(plan), "fallback": fallback,
            # The exact scales (the procedure's are floats), for the resized sizes.
            "scale_fractions": [[s.numerator, s.denominator] for s in plan.scales]}


def tiled_fallback(model: Any, variables: Any, plan: inference.Plan, *, channels: int,
                   tile_batch: int, budget_gb: float = 0.0, max_tile: int = 1024
                   ) -> inference.Plan | None:
    """The tiled twin of `--mode=auto`'s one-pass procedure ('whole' or 'pad'): the
    model's tiled mode with the same flip and scales, square tiles of `--tile_size=auto`
    (`budget_gb`, else this machine's memory; at most `max_tile`); None for any other
    plan."""
    from flaxseg import evaluate

    if plan.mode not in ("whole", "pad"):
        return None
    side = evaluate.auto_tile_size(model, variables, channels, tile_batch, budget_gb,
                                   max_tile, host_fallback=True)
    return inference.make_plan(model, variables, channels, flip=plan.flip, scales=plan.scales,
                               mode=inference.default_mode(model, tiled=True),
                               tile_size=(side, side), tile_batch=tile_batch)


def write(path: str | os.PathLike, data: bytes, info: dict[str, Any],
          bands: bytes | None = None) -> str:
    """Writes the artifact bytes to `path`, its band program's to `<path>.bands` when
    given, and the sidecar beside them; returns the sidecar's path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if bands is not None:
        with open(path + BANDS_SUFFIX, "wb") as f:
            f.write(bands)
    with open(path + SIDECAR_SUFFIX, "w") as f:
        json.dump(info, f, indent=2)
    return path + SIDECAR_SUFFIX


# -- the command line -------------------------------------------------------------------------


def _define_flags() -> None:
    from absl import flags

    from flaxseg import evaluate

    evaluate.define_inference_flags()
    flags.DEFINE_string("out", None, "The artifact to write (e.g. model.jax); the sidecar "
                        "goes beside it as <out>.json.")
    flags.DEFINE_enum("outputs", "labels", OUTPUTS,
                      "labels: int32 [B, H, W]; probabilities: float32 [B, H, W, K]; both.")
    flags.DEFINE_list("platforms", ["cpu"], f"Platforms to lower for, some of {PLATFORMS}.")
    flags.DEFINE_list("image_size", None, "'H,W' or 'S': the input size when the mode "
                      "cannot take symbolic sizes (default: the config's image_size).")
    flags.mark_flag_as_required("out")


def main(argv: list[str]) -> int:
    from absl import flags

    from flaxseg import evaluate

    values = flags.FLAGS
    check_platforms(values.platforms)  # before the checkpoint is read
    model, variables, config, options = evaluate.load_run(argv, tiled_fallback=True)
    channels = int(config.dataset.num_channels)
    plan_options = {k: v for k, v in options.items() if k != "batch_size"}
    plan = inference.make_plan(model, variables, channels, **plan_options)
    image_size = evaluate.size_flag(values.image_size, "image_size") or tuple(
        int(s) for s in config.dataset.image_size)
    normalization = evaluate.image_normalizer(config)
    exported, rule = export_procedure(
        model, variables, plan, normalization=normalization, channels=channels,
        outputs=values.outputs, platforms=values.platforms, image_size=image_size)
    data = exported.serialize()
    num_classes = inference.num_classes(model, variables, channels)
    names = config.dataset.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    palette = config.dataset.get("palette")
    info = sidecar(exported, data, plan=plan, rule=rule, normalization=normalization,
                   outputs=values.outputs, class_names=names,
                   palette=None if palette is None else np.asarray(palette, np.uint8))
    band_data, streamed = None, ""
    band_plan = plan if inference.streams(plan.mode) else (
        tiled_fallback(model, variables, plan, channels=channels, tile_batch=values.tile_batch,
                       budget_gb=values.memory_budget_gb, max_tile=values.max_tile)
        if values.mode == "auto" else None)
    if band_plan is not None:
        band_data = export_bands(model, variables, band_plan, normalization=normalization,
                                 channels=channels, platforms=values.platforms).serialize()
        info["bands"] = bands_entry(values.out, band_data, band_plan, band_plan is not plan)
        streamed = f", {values.out}{BANDS_SUFFIX} ({len(band_data) / 2**20:.1f} MiB, " + (
            "the band program: predict --exported streams images of any size)"
            if band_plan is plan else
            f"{band_plan.mode} tiles of {band_plan.tile[0]}x{band_plan.tile[1]}, streamed: "
            f"predict --exported switches to them for images too large for one "
            f"{plan.mode} pass)")
    sidecar_path = write(values.out, data, info, band_data)
    print(f"Wrote {values.out} ({len(data) / 2**20:.1f} MiB){streamed} and {sidecar_path}: mode "
          f"{plan.mode}, flip={plan.flip}, scales={info['procedure']['scales']}, outputs "
          f"{values.outputs}, platforms {','.join(exported.platforms)}; input uint8 "
          f"{info['input']['shape']}: {size_rule_text(rule)}; palette: "
          + ("the dataset's." if info["palette_source"] == "dataset" else
             "generated (the dataset gives none; these colours are no dataset's)."))
    return 0


if __name__ == "__main__":
    from flaxseg import cli

    _define_flags()
    cli.run_absl(main)
