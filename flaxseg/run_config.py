"""The keys of a training-run config, with neutral defaults: the schema every config has.

A leaf module (it imports only `flaxseg.optim`, itself a leaf): the shipped configs in
`flaxseg/configs/` build on it, and `flaxseg.train.config.validate_config` checks a
config against it, so neither of those two packages imports the other.

    from flaxseg.run_config import base_config, optimizer_config
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name='unet', features=16))
    config.optimizer = optimizer_config(name='sgd', learning_rate=1e-2, momentum=0.99)
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

# The optimizer section: the keys `flaxseg.optim.create_optimizer` reads (documented there).
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "name": "adam",
    "learning_rate": 1e-3,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup_steps": 0,
    "end_learning_rate": 0.0,
    "poly_power": 0.9,
    "grad_clip_norm": None,
}


def _update_known(cfg: ml_collections.ConfigDict, overrides: dict, section: str) -> None:
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise ValueError(
            f"Unknown {section} key(s) {unknown}; known keys: {sorted(cfg.keys())}."
        )
    cfg.update(overrides)


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The optimizer section with every key of `flaxseg.optim` (documented there);
    `overrides` replace its defaults."""
    # 0.0 rather than None disables clipping, so `--config.optimizer.grad_clip_norm=1`
    # can override it from the command line (ConfigDict keeps a field's type).
    cfg = ml_collections.ConfigDict({**OPTIMIZER_DEFAULTS, "grad_clip_norm": 0.0})
    _update_known(cfg, overrides, "optimizer")
    return cfg


def loss_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The loss section: `name` plus keyword arguments of `flaxseg.losses.get_loss_fn`."""
    # class_weights: None, one weight per class, or 'median_frequency' (computed from the
    # training split by the training program); a typed None keeps it overridable from
    # the command line (--config.loss.class_weights=median_frequency).
    cfg = ml_collections.ConfigDict({"name": "cross_entropy",
                                     "class_weights": config_dict.placeholder(object),
                                     "label_smoothing": 0.0})
    # Loss-specific keywords (e.g. a focal gamma) may be added; get_loss_fn checks them.
    cfg.update(overrides)
    return cfg


def base_config() -> ml_collections.ConfigDict:
    """The keys every config has, with neutral defaults; sections are filled per config.

    Top-level keys:
      seed: int, the one root of every PRNG key and every data shuffle.
      batch_size: global batch (all devices, all processes), or 'auto': the largest that
        fits the memory budget, asked of the compiler (`flaxseg.train.memory`).
      memory_budget_gb: the device memory a run may use, for batch_size='auto' (0: what
        the device reports; CPUs report none).
      num_train_steps, eval_every_steps, checkpoint_every_steps, log_every_steps: ints
        (eval / checkpoint / log also happen at the last step).
      keep_checkpoints: how many of the latest checkpoints to keep; the best by mIoU
        is kept in addition.
      parallel: 'mesh' (data parallel: `jax.jit` over a device mesh spanning every
        process, the default), 'jit' (one device) or 'pmap' (`jax.pmap` over every
        device, explicit `psum`); see `flaxseg.train.parallel`.
      spatial_partitions: devices each image is split over along H ('mesh' only; 1 = no
        split): for images too large for one device's memory.
      dtype: compute dtype, 'float32' or 'bfloat16' (params stay float32).
      remat: what the backward pass recomputes instead of storing: 'none', 'block' (each
        conv block / bottleneck keeps only its input) or 'save_convs' (only norms and
        ReLUs recomputed); same numbers, less memory, slower steps. Passed to the model
        as its `remat` field (`flaxseg.models.layers.REMAT_POLICIES`).
      nan_policy: 'raise' (stop, naming the step) or 'skip' (drop the update, count it).
      init_from: '' or a workdir whose latest checkpoint initialises matching parameters
        (FCN-16s from FCN-32s, FCN-8s from FCN-16s).
      eval_split: the split evaluated every `eval_every_steps`.
      num_grid_images: examples drawn in the prediction grid at each evaluation.
      data_workers: grain worker processes that read and decode the training data (an
        int >= 0; 0: threads in the training process), or 'auto': the host's cores
        shared by its training processes, less two for each
        (`flaxseg.data.pipeline.auto_worker_count`).
    """
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    # Any type, so that --config.batch_size=auto parses as well as --config.batch_size=16.
    cfg.batch_size = config_dict.FieldReference(8, field_type=object)
    cfg.memory_budget_gb = 0.0
    cfg.num_train_steps = 1000
    cfg.eval_every_steps = 500
    cfg.checkpoint_every_steps = 500
    cfg.log_every_steps = 50
    cfg.keep_checkpoints = 3
    cfg.parallel = "mesh"
    cfg.spatial_partitions = 1
    cfg.dtype = "float32"
    cfg.remat = "none"
    cfg.nan_policy = "raise"
    cfg.init_from = ""
    cfg.eval_split = "val"
    cfg.num_grid_images = 4
    # Any type, so that --config.data_workers=auto parses as well as --config.data_workers=2.
    cfg.data_workers = config_dict.FieldReference("auto", field_type=object)
    cfg.model = ml_collections.ConfigDict({"name": "unet"})
    cfg.dataset = ml_collections.ConfigDict({"name": "synthetic"})
    cfg.augment = ml_collections.ConfigDict()
    cfg.loss = loss_config()
    cfg.optimizer = optimizer_config()
    return cfg
