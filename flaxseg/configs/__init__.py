"""Configs as code: every shipped config is a module with `get_config() -> ConfigDict`.

    from flaxseg import configs
    config = configs.get_config('default')       # or 'unet_isbi', 'fcn8s_voc', 'folder', ...
    config.batch_size = 16

Configs are data: each starts from `flaxseg.run_config.base_config()` (the keys every
config has) and fills in `model`, `dataset`, `augment`, `loss` and `optimizer`.
`flaxseg.train.config.validate_config` checks one before anything is compiled.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from flaxseg.api import moved_attribute

SHIPPED_CONFIGS = (
    "default",
    "unet_isbi",
    "fcn32s_voc",
    "fcn16s_voc",
    "fcn8s_voc",
    "unet_pets",
    "folder",
    "encoder_decoder",
    "deeplabv3plus",
    "test",
)


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


def __getattr__(name: str) -> Any:
    """Names that used to live here (`base_config`, `optimizer_config`, ...) still import,
    with a DeprecationWarning naming their new home (`flaxseg.api.MOVED`)."""
    return moved_attribute(__name__, name)
