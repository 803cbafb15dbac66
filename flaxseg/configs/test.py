"""A tiny config for tests and smoke runs: 32 px synthetic scenes, a 1-stage U-Net of
width 4, a handful of steps. Seconds on a CPU; it learns little."""

import ml_collections

from flaxseg.data.config import augment_config, dataset_config
from flaxseg.run_config import base_config, optimizer_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    # No BatchNorm or dropout and one stage: the smallest program to trace and compile, for
    # the many short runs of the loop and resume tests (tests/test_train_core.py covers
    # both; a 1-stage U-Net still pools, upsamples and concatenates its skip).
    config.model = ml_collections.ConfigDict(
        dict(name="unet", features=4, depth=1, norm=None, dropout_rate=0.0)
    )
    config.dataset = dataset_config(
        "synthetic", image_size=(32, 32), num_train=64, num_val=8, num_test=8
    )
    config.augment = augment_config(scale_range=(0.75, 1.25))
    config.optimizer = optimizer_config(name="adam", learning_rate=3e-3)
    config.batch_size = 8
    config.num_train_steps = 6
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
    config.keep_checkpoints = 2
    config.num_grid_images = 2
    config.data_workers = 0  # worker processes would only add start-up time here
    return config
