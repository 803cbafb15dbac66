"""Training: state, pure steps (jit | pmap), optimisers, and the training loop.

Light at import: `train_and_evaluate` (the loop, `flaxseg.train.loop`) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from flaxseg.train.optim import create_learning_rate_schedule, create_optimizer
from flaxseg.train.state import TrainState, abstract_train_state, create_train_state
from flaxseg.train.steps import (
    NonFiniteGuard,
    NonFiniteLossError,
    make_eval_step,
    make_train_step,
)

_LAZY = {"train_and_evaluate": "flaxseg.train.loop"}

__all__ = [
    "NonFiniteGuard",
    "NonFiniteLossError",
    "TrainState",
    "abstract_train_state",
    "create_learning_rate_schedule",
    "create_optimizer",
    "create_train_state",
    "make_eval_step",
    "make_train_step",
    "train_and_evaluate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flaxseg.train' has no attribute {name!r}")
