"""Optimisers and learning-rate schedules from config, built with optax.

Config keys (`config.optimizer`, a ConfigDict or a dict; missing keys take the defaults):

    name               'adam' (the seed's default, lr 1e-3) | 'adamw' | 'sgd'
    learning_rate      peak learning rate
    momentum           sgd only (FCN paper 0.9, U-Net paper 0.99)
    nesterov           sgd only
    weight_decay       sgd/adam: L2 added to the gradient (Caffe's and the FCN paper's 5e-4);
                       adamw: decoupled. Never applied to biases or norm scales (1-D params).
    schedule           'constant' | 'warmup_cosine' | 'poly' ((1 - t/T)^power, the segmentation
                       standard with power 0.9)
    warmup_steps       linear warmup from 0 to learning_rate, for every schedule
    end_learning_rate  the value warmup_cosine and poly decay to at num_train_steps
    poly_power         poly's exponent
    grad_clip_norm     clip gradients to this global norm first; 0 or None disables

The papers' settings: FCN `sgd`, lr 1e-4, momentum 0.9, weight_decay 5e-4; U-Net `sgd`,
momentum 0.99.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import optax

from flaxseg.run_config import OPTIMIZER_DEFAULTS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "poly")


def _resolve(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Config (ConfigDict or mapping) merged over OPTIMIZER_DEFAULTS (in `flaxseg.run_config`,
    which config files import without JAX); unknown keys are an error."""
    items = dict(config.items()) if hasattr(config, "items") else None
    if items is None:
        raise TypeError(f"optimizer config must be a ConfigDict or a dict; got {type(config)}.")
    unknown = sorted(set(items) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise ValueError(
            f"Unknown optimizer config key(s) {unknown}; known keys: "
            f"{sorted(OPTIMIZER_DEFAULTS)}."
        )
    return {**OPTIMIZER_DEFAULTS, **items}


def create_learning_rate_schedule(
    optimizer_config: Mapping[str, Any] | Any, num_train_steps: int
) -> optax.Schedule:
    """The schedule `step -> learning rate` the optimiser uses (also handy for logging)."""
    cfg = _resolve(optimizer_config)
    if not isinstance(num_train_steps, numbers.Integral) or num_train_steps < 1:
        raise ValueError(f"num_train_steps must be a positive int; got {num_train_steps!r}.")
    lr, end_lr = float(cfg["learning_rate"]), float(cfg["end_learning_rate"])
    warmup, schedule = int(cfg["warmup_steps"]), cfg["schedule"]
    if lr <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0; got {lr}.")
    if not 0 <= end_lr <= lr:
        raise ValueError(
            f"optimizer.end_learning_rate must be in [0, learning_rate={lr}]; got {end_lr}."
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if warmup < 0 or (warmup >= num_train_steps and schedule != "constant"):
        raise ValueError(
            f"optimizer.warmup_steps={warmup} must be >= 0 and, for a decaying schedule, "
            f"< num_train_steps={num_train_steps}."
        )
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "warmup_cosine":
        main = optax.cosine_decay_schedule(lr, num_train_steps - warmup, alpha=end_lr / lr)
    else:
        power = float(cfg["poly_power"])
        if power <= 0:
            raise ValueError(f"optimizer.poly_power must be > 0; got {power}.")
        main = optax.polynomial_schedule(lr, end_lr, power, num_train_steps - warmup)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: kernels (ndim > 1), not biases or scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    optimizer_config: Mapping[str, Any] | Any, num_train_steps: int
) -> optax.GradientTransformation:
    """An optax transformation from `config.optimizer` (keys in this module's docstring).

    Order: clip the global gradient norm, add L2 weight decay (sgd/adam), then the
    optimiser scaled by the schedule. Returns a plain `GradientTransformation`.
    """
    cfg = _resolve(optimizer_config)
    schedule = create_learning_rate_schedule(cfg, num_train_steps)
    name, weight_decay = cfg["name"], float(cfg["weight_decay"])
    momentum, clip = float(cfg["momentum"]), cfg["grad_clip_norm"]
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0; got {weight_decay}.")
    if clip is not None and float(clip) < 0:
        raise ValueError(f"optimizer.grad_clip_norm must be > 0, or 0/None to disable; got {clip}.")

    chain = []
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    if name == "adamw":
        chain.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    else:
        if weight_decay:
            chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        if name == "adam":
            chain.append(optax.adam(schedule))
        else:
            if not 0.0 <= momentum < 1.0:
                raise ValueError(f"optimizer.momentum must be in [0, 1); got {momentum}.")
            chain.append(
                optax.sgd(schedule, momentum=momentum or None, nesterov=bool(cfg["nesterov"]))
            )
    return optax.chain(*chain)
