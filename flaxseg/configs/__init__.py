"""Configs as code: every shipped config is a module with `get_config() -> ConfigDict`.

    from flaxseg import configs
    config = configs.get_config('default')       # or 'unet_isbi', 'fcn8s_voc', ...
    config.batch_size = 16
    configs.validate_config(config)              # raises ValueError on any mistake

`base_config()` holds the keys every config has (the schema of docs/architecture.md);
each config module starts from it and fills in `model`, `dataset`, `augment`, `loss`
and `optimizer`. `validate_config` checks a config before anything is compiled: unknown
keys, unknown model / dataset / loss / optimizer names, values out of range, and a batch
size the devices cannot split.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

SHIPPED_CONFIGS = (
    "default",
    "unet_isbi",
    "fcn32s_voc",
    "fcn16s_voc",
    "fcn8s_voc",
    "unet_pets",
    "encoder_decoder",
    "test",
)

PARALLEL_MODES = ("pmap", "jit")
DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("raise", "skip")

# Keys of the model section that the loop sets itself (from the dataset and the run).
_MODEL_KEYS_SET_BY_LOOP = ("num_classes", "dtype", "axis_name")


def available_configs() -> tuple[str, ...]:
    """Names accepted by `get_config`."""
    return SHIPPED_CONFIGS


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    """Returns the shipped config `name` (a fresh, unlocked ConfigDict)."""
    if name not in SHIPPED_CONFIGS:
        raise ValueError(
            f"Unknown config {name!r}; shipped configs are {', '.join(SHIPPED_CONFIGS)}. "
            "For your own config, write a file with get_config() and pass --config=path.py."
        )
    return importlib.import_module(f"{__name__}.{name}").get_config()


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The optimizer section with every key of `flaxseg.train.optim` (documented there);
    `overrides` replace its defaults."""
    from flaxseg.train.optim import DEFAULTS

    # 0.0 rather than None disables clipping, so `--config.optimizer.grad_clip_norm=1`
    # can override it from the command line (ConfigDict keeps a field's type).
    cfg = ml_collections.ConfigDict({**DEFAULTS, "grad_clip_norm": 0.0})
    _update_known(cfg, overrides, "optimizer")
    return cfg


def loss_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The loss section: `name` plus keyword arguments of `flaxseg.losses.get_loss_fn`."""
    cfg = ml_collections.ConfigDict(
        {"name": "cross_entropy", "class_weights": None, "label_smoothing": 0.0}
    )
    # Loss-specific keywords (e.g. a focal gamma) may be added; get_loss_fn checks them.
    cfg.update(overrides)
    return cfg


def base_config() -> ml_collections.ConfigDict:
    """The keys every config has, with neutral defaults; sections are filled per config.

    Top-level keys:
      seed: int, the one root of every PRNG key and every data shuffle.
      batch_size: global batch (all devices, all processes).
      num_train_steps, eval_every_steps, checkpoint_every_steps, log_every_steps: ints
        (eval / checkpoint / log also happen at the last step).
      keep_checkpoints: how many of the latest checkpoints to keep; the best by mIoU
        is kept in addition.
      parallel: 'pmap' (data parallel over all local devices) or 'jit' (one device).
      dtype: compute dtype, 'float32' or 'bfloat16' (params stay float32).
      nan_policy: 'raise' (stop, naming the step) or 'skip' (drop the update, count it).
      init_from: '' or a workdir whose latest checkpoint initialises matching parameters
        (FCN-16s from FCN-32s, FCN-8s from FCN-16s).
      eval_split: the split evaluated every `eval_every_steps`.
      num_grid_images: examples drawn in the prediction grid at each evaluation.
    """
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.batch_size = 8
    cfg.num_train_steps = 1000
    cfg.eval_every_steps = 500
    cfg.checkpoint_every_steps = 500
    cfg.log_every_steps = 50
    cfg.keep_checkpoints = 3
    cfg.parallel = "pmap"
    cfg.dtype = "float32"
    cfg.nan_policy = "raise"
    cfg.init_from = ""
    cfg.eval_split = "val"
    cfg.num_grid_images = 4
    cfg.model = ml_collections.ConfigDict({"name": "unet"})
    cfg.dataset = ml_collections.ConfigDict({"name": "synthetic"})
    cfg.augment = ml_collections.ConfigDict()
    cfg.loss = loss_config()
    cfg.optimizer = optimizer_config()
    return cfg


def _update_known(cfg: ml_collections.ConfigDict, overrides: dict, section: str) -> None:
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(
            f"Unknown {section} key(s) {unknown}; known keys: {sorted(cfg.keys())}."
        )
    cfg.update(overrides)


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
            "from flaxseg.configs.base_config() so every documented key exists."
        )


def _positive_int(config: ml_collections.ConfigDict, key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{key} must be a positive integer, got {value!r}.")


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments for `create_model`, less `name` and the keys the loop sets."""
    kwargs = config.model.to_dict()
    kwargs.pop("name")
    for key in _MODEL_KEYS_SET_BY_LOOP:
        if key in kwargs:
            raise ValueError(
                f"config.model.{key} is set by the training program (num_classes from "
                f"config.dataset.num_classes, dtype from config.dtype, axis_name from "
                f"config.parallel); remove config.model.{key}."
            )
    return kwargs


def build_model(config: ml_collections.ConfigDict, *, parallel: str | None = None):
    """Creates the Linen module a config describes.

    `num_classes` comes from `config.dataset.num_classes`, the compute dtype from
    `config.dtype`, and BatchNorm's cross-replica `axis_name` is 'batch' under pmap
    (`parallel` defaults to `config.parallel`; pass 'jit' for inference). Unknown model
    names or keyword arguments raise ValueError.
    """
    import jax.numpy as jnp

    from flaxseg import models

    parallel = config.parallel if parallel is None else parallel
    name = config.model.name
    if name not in models.available_models():
        raise ValueError(
            f"Unknown model {name!r} in config.model.name; available models: "
            f"{', '.join(models.available_models())}."
        )
    kwargs = model_kwargs(config)
    try:
        return models.create_model(
            name,
            num_classes=int(config.dataset.num_classes),
            dtype=jnp.dtype(config.dtype),
            axis_name="batch" if parallel == "pmap" else None,
            **kwargs,
        )
    except TypeError as e:
        raise ValueError(
            f"config.model has a key model {name!r} does not take ({e}); "
            f"model keys given: {sorted(kwargs)}."
        ) from e


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks a config before anything is compiled; raises ValueError naming the fix.

    `num_devices` is the number of devices the global batch is split over (all devices
    of all processes for 'pmap', the process count for 'jit'); by default it is taken
    from JAX.
    """
    from flaxseg import losses
    from flaxseg.data.config import augment_config, dataset_config
    from flaxseg.parallel import check_divisible
    from flaxseg.train.optim import create_optimizer

    base = base_config()
    _check_keys(config, base, "config.")
    _check_keys(config.optimizer, base.optimizer, "config.optimizer.")
    for key in ("batch_size", "num_train_steps", "eval_every_steps", "checkpoint_every_steps",
                "log_every_steps", "keep_checkpoints", "num_grid_images"):
        _positive_int(config, key)
    if not isinstance(config.seed, int):
        raise ValueError(f"config.seed must be an integer, got {config.seed!r}.")
    for key, allowed in (("parallel", PARALLEL_MODES), ("dtype", DTYPES),
                         ("nan_policy", NAN_POLICIES)):
        if config[key] not in allowed:
            raise ValueError(f"config.{key} must be one of {allowed}, got {config[key]!r}.")
    for section in ("model", "dataset", "loss"):
        if "name" not in config[section]:
            raise ValueError(f"config.{section}.name is missing.")

    # The dataset, augmentation, loss and optimizer sections are checked by their owners'
    # factories, which reject unknown names and keys with their own messages; none compiles.
    dataset = config.dataset.to_dict()
    dataset_config(dataset.pop("name"), **dataset)
    augment_config(**config.augment.to_dict())
    loss = config.loss.to_dict()
    try:
        losses.get_loss_fn(loss.pop("name"), ignore_index=int(config.dataset.ignore_index),
                           **loss)
    except TypeError as e:
        raise ValueError(f"config.loss has a key the loss does not take: {e}.") from e
    create_optimizer(config.optimizer, int(config.num_train_steps))
    build_model(config)

    if num_devices is None:
        import jax

        num_devices = jax.device_count() if config.parallel == "pmap" else jax.process_count()
    check_divisible(int(config.batch_size), num_devices)
