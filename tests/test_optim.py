"""Optimisers and schedules from config: values from the formulas, decay masks, clipping, errors."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flaxseg.optim import create_learning_rate_schedule, create_optimizer, decay_mask

PARAMS = {
    "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones((4,))},
    "bn": {"scale": jnp.ones((4,))},
}


def _grads(value):
    return {
        "conv": {"kernel": jnp.full((3, 3, 2, 4), value), "bias": jnp.full((4,), value)},
        "bn": {"scale": jnp.full((4,), value)},
    }


def _step(tx, grads, params=PARAMS):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_poly_schedule_matches_formula_with_warmup():
    cfg = {
        "schedule": "poly",
        "learning_rate": 0.01,
        "warmup_steps": 10,
        "poly_power": 0.9,
        "end_learning_rate": 0.0,
    }
    sched = create_learning_rate_schedule(cfg, 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.005)
    for t in (10, 40, 109):
        assert float(sched(t)) == pytest.approx(0.01 * (1 - (t - 10) / 100) ** 0.9, rel=1e-5)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-9)


def test_warmup_cosine_and_constant():
    cfg = ml_collections.ConfigDict(
        {
            "schedule": "warmup_cosine",
            "learning_rate": 1.0,
            "warmup_steps": 4,
            "end_learning_rate": 0.1,
        }
    )
    sched = create_learning_rate_schedule(cfg, 104)
    assert float(sched(2)) == pytest.approx(0.5)
    assert float(sched(4)) == pytest.approx(1.0)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert float(sched(54)) == pytest.approx(mid, rel=1e-5)
    assert float(sched(104)) == pytest.approx(0.1, rel=1e-5)
    constant = create_learning_rate_schedule({"learning_rate": 3e-4}, 10)
    assert float(constant(7)) == pytest.approx(3e-4)


def test_adam_default_is_the_seeds_lr_1e3():
    tx = create_optimizer({}, 100)
    updates = _step(tx, _grads(0.5))
    # Adam's first update is -lr * sign(g) (bias-corrected m / sqrt(v) = 1).
    np.testing.assert_allclose(updates["conv"]["kernel"], -1e-3, rtol=1e-4)


def test_fcn_sgd_weight_decay_skips_biases_and_norm_scales():
    cfg = {"name": "sgd", "learning_rate": 1e-4, "momentum": 0.9, "weight_decay": 5e-4}
    updates = _step(create_optimizer(cfg, 100), _grads(0.0))
    np.testing.assert_allclose(updates["conv"]["kernel"], -1e-4 * 5e-4 * 1.0, rtol=1e-5)
    assert float(jnp.abs(updates["conv"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0.0
    assert decay_mask(PARAMS) == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False}}


def test_sgd_momentum_accumulates_like_the_unet_paper():
    tx = create_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.99}, 100)
    state = tx.init(PARAMS)
    for _ in range(2):
        updates, state = tx.update(_grads(1.0), state, PARAMS)
    np.testing.assert_allclose(updates["conv"]["bias"], -0.1 * (1 + 0.99), rtol=1e-6)


def test_adamw_decay_is_decoupled_and_masked():
    tx = create_optimizer({"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.01}, 100)
    updates = _step(tx, _grads(0.0))
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.01, rtol=1e-5)
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0.0


def test_grad_clip_norm_clips_global_norm():
    tx = create_optimizer(
        {"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "grad_clip_norm": 1.0}, 10
    )
    updates = _step(tx, _grads(10.0))
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "cfg, steps, match",
    [
        ({"name": "rmsprop"}, 10, "Unknown optimizer"),
        ({"schedule": "step"}, 10, "Unknown schedule"),
        ({"learning_rate": 0.0}, 10, "learning_rate"),
        ({"lr": 0.1}, 10, "Unknown optimizer config key"),
        ({"schedule": "poly", "warmup_steps": 10}, 10, "warmup_steps"),
        ({"name": "sgd", "momentum": 1.0}, 10, "momentum"),
        ({"weight_decay": -1.0}, 10, "weight_decay"),
        ({"end_learning_rate": 1.0}, 10, "end_learning_rate"),
        ({}, 0, "num_train_steps"),
    ],
)
def test_bad_config_raises(cfg, steps, match):
    with pytest.raises(ValueError, match=match):
        create_optimizer(cfg, steps)
