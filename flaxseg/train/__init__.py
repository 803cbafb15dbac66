"""Training: state, pure steps (mesh | jit | pmap), and the training program.

Light at import: every name loads on first use, so `python -m flaxseg.train` checks its
flags and config (a mistake is one line, at once) before JAX is imported.
`create_optimizer` / `create_learning_rate_schedule` live in `flaxseg.optim` and are
re-exported here.
"""

from __future__ import annotations

from typing import Any

from flaxseg.api import load_lazily

_LAZY = {
    "create_learning_rate_schedule": "flaxseg.optim",
    "create_optimizer": "flaxseg.optim",
    "DataParallel": "flaxseg.train.parallel",
    "TrainState": "flaxseg.train.state",
    "abstract_train_state": "flaxseg.train.state",
    "create_train_state": "flaxseg.train.state",
    **dict.fromkeys(("NonFiniteGuard", "NonFiniteLossError", "TrainMetrics", "eval_step_fn",
                     "make_eval_step", "make_train_step", "train_step_fn"),
                    "flaxseg.train.steps"),
    "train_and_evaluate": "flaxseg.train.loop",
}

__all__ = [
    "DataParallel",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "TrainMetrics",
    "TrainState",
    "abstract_train_state",
    "create_learning_rate_schedule",
    "create_optimizer",
    "create_train_state",
    "eval_step_fn",
    "make_eval_step",
    "make_train_step",
    "train_and_evaluate",
    "train_step_fn",
]


def __getattr__(name: str) -> Any:
    return load_lazily(globals(), name, _LAZY)
