"""flaxseg: semantic image segmentation in JAX/Flax.

Submodules load on first use, so `import flaxseg` stays cheap:

    import flaxseg
    model = flaxseg.models.create_model('unet', num_classes=3, features=16)
    tx = flaxseg.train.create_optimizer(config.optimizer, num_train_steps=1000)

Public submodules: `models`, `losses`, `metrics`, `optim`, `data`, `train`, `inference`,
`export` (a run as one jax.export artifact), `exported` (running one: jax only),
`visualize`, `configs`, `run_config`; `api` lists the public names and where moved
ones went.
"""

from __future__ import annotations

from typing import Any

from flaxseg.api import load_lazily  # imports nothing else of flaxseg

__version__ = "0.1.0"

_SUBMODULES = (
    "api",
    "configs",
    "data",
    "export",
    "exported",
    "inference",
    "losses",
    "metrics",
    "models",
    "optim",
    "run_config",
    "train",
    "visualize",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    return load_lazily(globals(), name, {n: f"{__name__}.{n}" for n in _SUBMODULES})


def __dir__() -> list[str]:
    return sorted(__all__)
