"""Configs as code: every shipped config is complete and valid; every mistake is caught early."""

import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import pytest

from flaxseg import configs
from flaxseg.data.classes import VOC_CLASS_NAMES
from flaxseg.train.__main__ import default_workdir
from flaxseg.train.config import build_model, validate_config

SCHEMA_KEYS = {
    "seed", "batch_size", "num_train_steps", "eval_every_steps", "checkpoint_every_steps",
    "log_every_steps", "keep_checkpoints", "parallel", "spatial_partitions", "memory_budget_gb",
    "dtype", "remat", "nan_policy", "init_from",
    "eval_split", "num_grid_images", "data_workers", "model", "dataset", "augment", "loss",
    "optimizer",
}  # fmt: skip
OPTIMIZER_KEYS = {
    "name", "learning_rate", "momentum", "nesterov", "weight_decay", "schedule",
    "warmup_steps", "end_learning_rate", "poly_power", "grad_clip_norm",
}  # fmt: skip


@pytest.mark.parametrize("name", configs.available_configs())
def test_shipped_config_has_the_schema_and_validates(name):
    config = configs.get_config(name)
    assert set(config.keys()) == SCHEMA_KEYS
    assert set(config.optimizer.keys()) == OPTIMIZER_KEYS
    assert {"name", "num_classes", "ignore_index", "image_size"} <= set(config.dataset.keys())
    # The shipped batch sizes split over one device; the FCN/ISBI ones need not split by 4.
    validate_config(config, num_devices=1)


def test_fcn_configs_follow_the_paper():
    for name, model in (("fcn32s_voc", "fcn32s"), ("fcn16s_voc", "fcn16s"),
                        ("fcn8s_voc", "fcn8s")):
        config = configs.get_config(name)
        opt = config.optimizer
        assert config.model.name == model
        assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay, opt.schedule) == (
            "sgd", 1e-4, 0.9, 5e-4, "constant")
        assert config.batch_size == 20
        assert config.dataset.num_classes == 21 == len(VOC_CLASS_NAMES)
        assert config.dataset.ignore_index == 255
    assert configs.get_config("fcn16s_voc").init_from == "runs/fcn32s"
    assert configs.get_config("fcn8s_voc").init_from == "runs/fcn16s"


def test_unet_isbi_follows_the_paper():
    config = configs.get_config("unet_isbi")
    model, augment = config.model, config.augment
    assert (model.name, model.features, model.depth, config.dataset.image_size) == (
        "unet_valid", 64, 4, (572, 572))
    # Section 3.1: elastic deformations on a 3x3 grid of 10 px standard deviation.
    assert (augment.elastic, augment.elastic_grid, augment.elastic_sigma) == (True, 3, 10.0)


def test_default_config_is_small_synthetic_unet():
    config = configs.get_config("default")
    assert (config.model.name, config.dataset.name, config.parallel) == (
        "unet", "synthetic", "mesh")
    validate_config(config, num_devices=4)


def _check_raises(config, match, num_devices=1):
    with pytest.raises(ValueError, match=match):
        validate_config(config, num_devices=num_devices)


def test_unknown_and_missing_keys_are_errors():
    config = configs.get_config("test")
    config.num_train_step = 5  # typo
    _check_raises(config, r"Unknown config key.*config\.num_train_step")

    config = configs.get_config("test")
    del config["eval_split"]
    _check_raises(config, r"missing key.*config\.eval_split")

    config = configs.get_config("test")
    config.optimizer.lr = 0.1
    _check_raises(config, r"config\.optimizer\.lr")

    config = configs.get_config("test")
    config.dataset.imagesize = 32
    _check_raises(config, r"imagesize")

    config = configs.get_config("test")
    config.augment.flip = True
    _check_raises(config, r"flip")


def test_unknown_names_are_errors():
    config = configs.get_config("test")
    config.model.name = "unet3d"
    _check_raises(config, r"Unknown model 'unet3d'.*unet")

    config = configs.get_config("test")
    config.model.widht = 4
    _check_raises(config, r"config\.model.*widht")

    config = configs.get_config("test")
    config.model.num_classes = 3
    _check_raises(config, r"config\.model\.num_classes is set by the training program")

    config = configs.get_config("test")
    config.loss.name = "hinge"
    _check_raises(config, r"hinge")

    config = configs.get_config("test")
    config.optimizer.name = "lamb"
    _check_raises(config, r"lamb")

    config = configs.get_config("test")
    config.dataset.name = "synthetik"  # unknown names are taken as tfds datasets
    _check_raises(config, r"synthetik")


@pytest.mark.parametrize("key, value", [("parallel", "pjit"), ("dtype", "float16"),
                                        ("nan_policy", "ignore"), ("remat", "all"),
                                        ("num_train_steps", 0),
                                        ("log_every_steps", -1), ("keep_checkpoints", 0),
                                        ("data_workers", -1), ("data_workers", "many")])
def test_bad_values_are_errors(key, value):
    config = configs.get_config("test")
    config[key] = value
    _check_raises(config, f"config.{key}")


def test_batch_size_the_devices_cannot_split():
    config = configs.get_config("test")
    config.batch_size = 6
    _check_raises(config, r"Batch size 6 cannot be split evenly over 4 devices.*4 or 8",
                  num_devices=4)
    validate_config(config, num_devices=2)


def test_get_config_unknown_name():
    with pytest.raises(ValueError, match="Unknown config 'defualt'.*default"):
        configs.get_config("defualt")


def test_build_model_takes_classes_and_dtype_from_the_config():
    config = configs.get_config("test")
    config.dtype = "bfloat16"
    model = build_model(config)
    assert model.num_classes == config.dataset.num_classes
    assert jnp.dtype(model.dtype) == jnp.bfloat16
    assert model.axis_name is None  # the pmap step sets BatchNorm's axis itself
    assert model.remat == "none"
    config.remat = "block"
    assert build_model(config).remat == "block"


class ContractOnly(nn.Module):
    """A user's model with the contract's fields and no `remat`."""

    num_classes: int
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    axis_name: str | None = None

    def __call__(self, x, train: bool = False):
        return x


def test_remat_on_a_model_without_the_field_says_so():
    config = configs.get_config("test")
    config.model = {"name": "test_configs:ContractOnly"}
    build_model(config)  # remat 'none': not passed, the model builds
    config.remat = "block"
    with pytest.raises(ValueError, match=r"config.remat='block': model 'test_configs:"
                                         r"ContractOnly' has no `remat` field.*'none'"):
        build_model(config)


def test_configs_and_the_training_program_do_not_import_each_other():
    """configs are data (flaxseg.run_config, flaxseg.data.config); train reads no configs."""
    import ast
    import pathlib

    root = pathlib.Path(configs.__file__).parents[1]

    def imported(path):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names

    for path in (root / "configs").glob("*.py"):
        assert not {m for m in imported(path) if m.startswith("flaxseg.train")}, path
    for path in (root / "train").glob("*.py"):
        assert not {m for m in imported(path) if m.startswith("flaxseg.configs")}, path


def test_default_workdir_is_named_after_the_config_file():
    assert default_workdir("flaxseg/configs/default.py") == "runs/default"
    assert default_workdir("/x/unet_isbi.py:extra") == "runs/unet_isbi"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.batch_sise=3", "no key 'batch_sise'; did you mean 'batch_size'?"),
        ("--config.model.featurs=3", "no key 'featurs'; did you mean 'features'?"),
    ],
)
def test_cli_unknown_config_key_is_one_line_exit_2_and_writes_nothing(tmp_path, override, expected):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.train", override, f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()
