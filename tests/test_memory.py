"""batch_size='auto': the largest batch whose compiled train step fits a memory budget."""

import os

import jax
import pytest

from flaxseg import configs, losses
from flaxseg.optim import create_optimizer
from flaxseg.train import DataParallel, abstract_train_state, make_train_step, memory
from flaxseg.train.config import build_model, validate_config


@pytest.mark.parametrize("bytes_for", [
    lambda b: 1000 + 300 * b,                       # linear, as a step's memory is
    lambda b: 1000 + 300 * b + (5000 if b > 20 else 0),  # a jump the line does not see
    lambda b: 1000 + 40 * b * b,                    # faster than linear
])
def test_the_search_returns_the_largest_fitting_multiple(bytes_for):
    budget = 10_000
    batch, why = memory.fit_batch_size(bytes_for, budget, step=4)
    assert batch % 4 == 0 and bytes_for(batch) <= budget < bytes_for(batch + 4)
    assert f"chose {batch}" in why and f"{batch + 4} would need" in why


def test_a_budget_too_small_for_one_image_per_device_is_an_error():
    with pytest.raises(ValueError, match="even a batch of 4 .* over the"):
        memory.fit_batch_size(lambda b: 10_000 * b, 1_000, step=4)


def test_the_compiled_step_of_the_chosen_batch_fits_and_the_next_does_not():
    config = configs.get_config("test")
    model = build_model(config)
    par = DataParallel("mesh")
    step = make_train_step(model, losses.get_loss_fn("cross_entropy"), 4, parallel=par)
    tx = create_optimizer(config.optimizer, 10)
    state = par.abstract(abstract_train_state(model, tx, (1, 32, 32, 3)))
    seen = {}

    def bytes_for(batch):
        seen[batch] = memory.train_step_bytes(step, state, par, batch, (1, 32, 32, 3))
        return seen[batch]

    budget = 3 * 2**20
    batch, _ = memory.fit_batch_size(bytes_for, budget, step=par.batch_splits)
    assert seen[batch] <= budget < seen[batch + par.batch_splits]
    assert len(seen) <= 6  # a handful of compiles


def test_auto_needs_a_budget_on_a_cpu():
    with pytest.raises(ValueError, match="set --config.memory_budget_gb"):
        memory.memory_budget(0.0)
    assert memory.memory_budget(1.5) == (int(1.5 * 2**30), "memory_budget_gb=1.5")
    config = configs.get_config("test")
    config.batch_size = "auto"
    validate_config(config)  # 'auto' passes the config check; the budget is asked later
    config.memory_budget_gb = -1.0
    with pytest.raises(ValueError, match="memory_budget_gb must be a number >= 0"):
        validate_config(config)
    assert jax.devices()[0].memory_stats() is None  # why a CPU run needs the budget
    # predict's --mode=auto falls back on the host's memory, which a CPU device computes in.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget, where = memory.memory_budget(0.0, host_fallback=True)
    assert budget == host // 2 and where == f"half of the host's {memory.format_bytes(host)}"
    assert memory.memory_budget(1.5, host_fallback=True)[0] == int(1.5 * 2**30)


def test_tile_candidates_follow_the_geometry():
    from flaxseg.models import create_model, model_geometry

    same = model_geometry(create_model("unet", num_classes=2, features=4, depth=2))
    assert memory.tile_candidates(same, 20) == [4, 8, 12, 16, 20]
    valid = model_geometry(create_model("unet_valid", num_classes=2, features=4, depth=4))
    assert memory.tile_candidates(valid, 580)[-2:] == [556, 572]  # the paper's 572


def test_the_tile_search_bisects_to_the_largest_fitting_tile():
    calls = []

    def bytes_for(size):
        calls.append(size)
        return 100 * size * size

    sizes = list(range(16, 1025, 16))
    tile, why = memory.fit_tile_size(bytes_for, sizes, budget=100 * 300 * 300)
    assert tile == 288 and "chose 288x288" in why and "304 px would need" in why
    assert len(calls) <= 8  # log2(64) + 1 compiles, not 64
    with pytest.raises(ValueError, match="even a 16 px tile needs .* lower --tile_batch"):
        memory.fit_tile_size(bytes_for, sizes, budget=10)


def test_the_chosen_tile_compiles_within_the_budget_and_the_next_does_not():
    from flaxseg.models import create_model

    model = create_model("unet", num_classes=2, features=4, depth=2)
    variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 16, 16, 3)))
    budget = 2**20
    candidates = memory.tile_candidates(model.geometry(), 256)
    tile, _ = memory.fit_tile_size(
        lambda s: memory.forward_bytes(model, variables, (2, s, s, 3)), candidates, budget)
    assert memory.forward_bytes(model, variables, (2, tile, tile, 3)) <= budget
    assert memory.forward_bytes(model, variables, (2, tile + 4, tile + 4, 3)) > budget
