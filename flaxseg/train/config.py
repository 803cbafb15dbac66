"""A training-run config, checked and turned into a model: the program's reading of it.

    from flaxseg import configs
    from flaxseg.train.config import build_model, validate_config
    config = configs.get_config('default')
    validate_config(config)          # raises ValueError naming the fix; compiles nothing
    model = build_model(config)

The schema (`flaxseg.run_config.base_config`) is data; this module is the behaviour: every
key and section is checked by the code that owns it (the dataset, augmentation, loss and
optimiser factories, the model constructor, the parallel mode), before anything compiles.
Values the data decides (a folder's classes, `loss.class_weights='median_frequency'`) are
filled in by the training program (`flaxseg.data.resolve_dataset_config`,
`resolve_class_weights`), and the config it saves with a checkpoint reads back as it was
(`restored_config`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from flaxseg import losses, models
from flaxseg.data.balance import class_balance
from flaxseg.data.config import augment_config, dataset_config, normalize_image_size
from flaxseg.models.layers import REMAT_POLICIES
from flaxseg.normalization import IMAGENET
from flaxseg.optim import create_optimizer
from flaxseg.run_config import base_config
from flaxseg.train import parallel
from flaxseg.train.steps import NAN_POLICIES

DTYPES = ("float32", "bfloat16")
MEDIAN_FREQUENCY = "median_frequency"  # loss.class_weights computed from the train split
CLASS_WEIGHTS_FILE = "class_weights.json"  # their cache, in the run's workdir

# Keys of the model section that the program sets itself (from the dataset and the run),
# and those it reads itself rather than passing them to the model.
_MODEL_KEYS_SET_BY_PROGRAM = ("num_classes", "dtype", "axis_name", "remat")
_MODEL_KEYS_READ_BY_PROGRAM = ("backbone_weights",)


def _check_keys(actual: ml_collections.ConfigDict, expected: ml_collections.ConfigDict,
                where: str) -> None:
    unknown = sorted(set(actual.keys()) - set(expected.keys()))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {[f'{where}{k}' for k in unknown]}; "
            f"known keys here: {sorted(expected.keys())}. Check the spelling."
        )
    missing = sorted(set(expected.keys()) - set(actual.keys()))
    if missing:
        raise ValueError(
            f"Config is missing key(s) {[f'{where}{k}' for k in missing]}; start your config "
            "from flaxseg.run_config.base_config() so every documented key exists."
        )


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = " or 'auto'" if key == "batch_size" else ""
        raise ValueError(f"config.{key} must be a positive integer{also}, got {value!r}.")


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments for `create_model`, less `name`, the keys the program sets
    and those it reads itself (`backbone_weights`)."""
    kwargs = config.model.to_dict()
    kwargs.pop("name")
    for key in _MODEL_KEYS_READ_BY_PROGRAM:
        kwargs.pop(key, None)
    for key in _MODEL_KEYS_SET_BY_PROGRAM:
        if key in kwargs:
            raise ValueError(
                f"config.model.{key} is set by the training program (num_classes from "
                f"config.dataset.num_classes, dtype and remat from config.dtype and "
                f"config.remat, axis_name from config.parallel); remove config.model.{key}."
            )
    return kwargs


def build_model(config: ml_collections.ConfigDict):
    """Creates the Linen module a config describes.

    `config.model.name` is a registered model or `package.module:Attr` (see
    `flaxseg.models.registry`); `num_classes` comes from `config.dataset.num_classes`
    and the compute dtype from `config.dtype`; BatchNorm's cross-device axis is left
    unset (the pmap step sets it). Unknown model names or keyword arguments raise
    ValueError.
    """
    import jax.numpy as jnp

    name = config.model.name
    kwargs = model_kwargs(config)
    if config.dataset.num_classes is None:
        raise ValueError(
            "config.dataset.num_classes is not set; the training program fills it from the "
            "dataset (flaxseg.data.resolve_dataset_config), or set it yourself.")
    fixed = {"num_classes": int(config.dataset.num_classes), "dtype": jnp.dtype(config.dtype)}
    remat = config.get("remat", "none")  # runs saved before the key existed: 'none'
    if remat != "none":  # a user's model without the field still builds without remat
        fixed["remat"] = remat
    try:
        return models.create_model(name, **fixed, **kwargs)
    except ValueError as e:
        raise ValueError(f"config.model.name: {e}") from e
    except TypeError as e:
        plain = models.create_model(name, num_classes=fixed["num_classes"], dtype=fixed["dtype"])
        fields = {f.name for f in dataclasses.fields(plain) if f.init}
        if "remat" in fixed and "remat" not in fields:
            raise ValueError(f"config.remat={remat!r}: model {name!r} has no `remat` field "
                             "(flaxseg's models do); set config.remat='none'.") from e
        takes = sorted(fields - {"parent", "name", *_MODEL_KEYS_SET_BY_PROGRAM})
        unknown = sorted(set(kwargs) - set(takes))
        if not unknown:
            raise
        raise ValueError(
            f"config.model.{unknown[0]}: model {name!r} takes no such key; its keys are "
            f"{', '.join(takes)}."
        ) from e


def backbone_weights(config: ml_collections.ConfigDict) -> str:
    """`config.model.backbone_weights`: a weights file for the model's backbone, or ''."""
    return str(config.model.get("backbone_weights", "") or "")


def resolve_normalization(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `augment.normalize='pretrained'` made concrete, checked against the
    backbone weights' expectation.

    'pretrained' becomes 'custom' with the mean/std that `model.backbone_weights` expect
    (read from the file: torchvision's ImageNet mean/std, Keras's Caffe mean, or what a
    flaxseg .npz records), or ImageNet's without weights. Any other `normalize` must
    agree with the weights'; a mismatch raises ValueError saying which is which. The
    resolved config is the one saved with checkpoints, so evaluation normalises alike.
    """
    path = backbone_weights(config)
    expected = IMAGENET
    if path:
        from flaxseg.models.weights import WeightsError, weights_normalization

        try:
            expected = weights_normalization(path)
        except WeightsError as e:
            raise ValueError(f"config.model.backbone_weights: {e}") from e
    augment = config.augment
    if augment.get("normalize") == "pretrained":
        config = ml_collections.ConfigDict(config.to_dict(), type_safe=config.is_type_safe)
        config.augment.update(normalize="custom", mean=expected.mean, std=expected.std)
        return config
    if path:
        from flaxseg.data.transforms import normalization_stats

        mean, std = normalization_stats(augment, len(expected.mean))
        if not expected.matches(mean, std):
            raise ValueError(
                f"config.augment.normalize={augment.normalize!r} gives mean "
                f"{tuple(round(float(m), 4) for m in mean)} / std "
                f"{tuple(round(float(v), 4) for v in std)}, but the weights in "
                f"config.model.backbone_weights={path!r} expect {expected.description}. Set "
                "--config.augment.normalize=pretrained to use the weights' normalisation.")
    return config


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks a config before anything is compiled; raises ValueError naming the fix.

    `num_devices` is the number of ways the global batch is split; by default the count
    `config.parallel` uses here (every device of every process, or one for 'jit'), over
    `config.spatial_partitions`.
    """
    base = base_config()
    _check_keys(config, base, "config.")
    _check_keys(config.optimizer, base.optimizer, "config.optimizer.")
    for key in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps",
                "log_every_steps", "keep_checkpoints", "num_grid_images"):
        _positive_int(config, key)
    if config.batch_size != "auto":
        _positive_int(config, "batch_size")
    workers = config.get("data_workers", 0)
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int)
                              or workers < 0):
        raise ValueError(f"config.data_workers must be an int >= 0 or 'auto', got {workers!r}.")
    if not isinstance(config.memory_budget_gb, int | float) or config.memory_budget_gb < 0:
        raise ValueError(f"config.memory_budget_gb must be a number >= 0 (0: the device's own "
                         f"memory), got {config.memory_budget_gb!r}.")
    if not isinstance(config.seed, int):
        raise ValueError(f"config.seed must be an integer, got {config.seed!r}.")
    for key, allowed in (("parallel", parallel.MODES), ("dtype", DTYPES),
                         ("remat", REMAT_POLICIES), ("nan_policy", NAN_POLICIES)):
        if config[key] not in allowed:
            raise ValueError(f"config.{key} must be one of {allowed}, got {config[key]!r}.")
    for section in ("model", "dataset", "loss"):
        if "name" not in config[section]:
            raise ValueError(f"config.{section}.name is missing.")
    spatial = parallel.check_spatial_partitions(config.parallel, config.spatial_partitions)

    # The dataset, augmentation, loss and optimizer sections are checked by their owners'
    # factories, which reject unknown names and keys with their own messages; none compiles.
    dataset = config.dataset.to_dict()
    dataset = dataset_config(dataset.pop("name"), **dataset)
    parallel.check_image_height(normalize_image_size(dataset.image_size)[0], spatial)
    config = resolve_normalization(config)
    augment_config(**config.augment.to_dict())
    checkable = _with_stand_ins(config)
    loss_from_config(checkable)
    create_optimizer(config.optimizer, int(config.num_train_steps))
    model = build_model(checkable)
    height, width = normalize_image_size(config.dataset.image_size)
    models.model_geometry(model).output_shape(
        height, width, model=f"Model {config.model.name!r} (config.dataset.image_size)")
    if num_devices is None:
        num_devices = parallel.num_devices(config.parallel) // spatial
    if config.batch_size != "auto":
        parallel.check_divisible(int(config.batch_size), num_devices)


def _with_stand_ins(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy in which what the data decides later holds a stand-in, so the model and the
    loss can be checked without reading the data: an unset `dataset.num_classes` (a folder
    or tfds dataset's classes) and `loss.class_weights='median_frequency'`."""
    values = config.to_dict()
    if values["dataset"].get("num_classes") is None:
        values["dataset"]["num_classes"] = 2  # sizes only the classifier
    if values["loss"].get("class_weights") == MEDIAN_FREQUENCY:
        values["loss"]["class_weights"] = None
    return ml_collections.ConfigDict(values)


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples configs hold, recursively."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def restored_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config a run saved with its checkpoint (JSON), as the run had it.

    JSON turns tuples into lists, int dict keys into strings and typed Nones into plain
    ones; here sequences become tuples again and the dataset section goes through
    `dataset_config`, which gives every value its one form. The run saved its resolved
    dataset (absolute path, layout, classes), so the restored config reads the same data
    the same way.
    """
    values = _tuples(saved)
    dataset = dict(values["dataset"])
    if dataset.get("source") == "folder" and "layout" not in dataset and not dataset.get(
            "void_values"):
        # Saved before layouts, when an empty void_values meant "from dataset.json".
        dataset["void_values"] = None
    values["dataset"] = dataset_config(dataset.pop("name"), **dataset)
    return ml_collections.ConfigDict(values)


def resolve_class_weights(config: ml_collections.ConfigDict, train_source: Any,
                          workdir: str) -> ml_collections.ConfigDict:
    """`config.loss`, with `class_weights='median_frequency'` replaced by the weights of the
    training split (`flaxseg.data.balance`).

    They are computed once per dataset and cached in `<workdir>/class_weights.json` (with
    the class pixel counts and frequencies, and the resolved dataset config they belong to);
    the config the run saves holds the numbers. Every process computes or reads the same
    numbers; process 0 writes the cache.
    """
    loss = config.loss.to_dict()
    if loss.get("class_weights") != MEDIAN_FREQUENCY:
        return config.loss
    import jax

    from flaxseg.train.reporting import json_safe

    dataset = json.loads(json.dumps(json_safe(config.dataset.to_dict())))
    path = Path(workdir) / CLASS_WEIGHTS_FILE
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("dataset") == dataset:
        weights = cached["weights"]
    else:
        balance = class_balance(train_source)
        weights = [float(w) for w in balance.median_frequency_weights()]
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "dataset": dataset, "class_pixels": balance.pixels.tolist(),
                "frequencies": balance.frequencies().tolist(), "weights": weights}, indent=1))
    loss["class_weights"] = tuple(weights)
    return ml_collections.ConfigDict(loss)


def loss_from_config(config: ml_collections.ConfigDict) -> losses.LossFn:
    """`config.loss` as a loss function (`fn(logits, labels) -> (loss_sum, weight_sum)`),
    ignoring `config.dataset.ignore_index`."""
    kwargs = config.loss.to_dict()
    try:
        return losses.get_loss_fn(kwargs.pop("name"),
                                  ignore_index=int(config.dataset.ignore_index), **kwargs)
    except TypeError as e:
        raise ValueError(f"config.loss has a key the loss does not take: {e}.") from e
