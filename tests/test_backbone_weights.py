"""config.model.backbone_weights: the backbone loaded at initialisation, the images
normalised as the weights expect, and a clear error when the config says otherwise."""

import jax
import ml_collections
import numpy as np
import pytest
from conftest import random_variables

from flaxseg import configs
from flaxseg.models import FCN
from flaxseg.models.weights import Pretrained, save_npz
from flaxseg.normalization import CAFFE, IMAGENET
from flaxseg.optim import create_optimizer
from flaxseg.train.config import build_model, resolve_normalization, validate_config
from flaxseg.train.parallel import DataParallel
from flaxseg.train.state import create_train_state, init_backbone

TINY = {"widths": (4, 4, 8, 8, 8), "fc_features": 16}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A tiny FCN's VGG-16 backbone saved as flaxseg's .npz, expecting Caffe's mean."""
    backbone = FCN(3, **TINY).backbone_module()
    variables = jax.tree.map(np.asarray, random_variables(backbone, (1, 32, 32, 3)))
    path = tmp_path_factory.mktemp("weights") / "tiny_vgg.npz"
    save_npz(path, Pretrained(variables, CAFFE, "random"), "vgg16")
    return str(path), variables


def _config(path: str, normalize: str) -> ml_collections.ConfigDict:
    config = configs.get_config("test")
    config.model = ml_collections.ConfigDict(
        {"name": "fcn32s", "backbone_weights": path, "dropout_rate": 0.0, **TINY})
    config.augment.normalize = normalize
    config.dataset.num_channels = 3
    return config


def test_pretrained_normalization_comes_with_the_weights(weights_file):
    path, _ = weights_file
    resolved = resolve_normalization(_config(path, "pretrained"))
    assert resolved.augment.normalize == "custom"
    assert CAFFE.matches(resolved.augment.mean, resolved.augment.std)
    without = resolve_normalization(_config("", "pretrained"))
    assert IMAGENET.matches(without.augment.mean, without.augment.std)
    validate_config(_config(path, "pretrained"), num_devices=1)
    with pytest.raises(ValueError, match=r"normalize='imagenet' gives mean \(0\.485.*"
                                         r"expect Keras/Caffe VGG-16.*normalize=pretrained"):
        validate_config(_config(path, "imagenet"), num_devices=1)
    with pytest.raises(ValueError, match="backbone_weights: No weights file"):
        validate_config(_config(path + ".missing", "pretrained"), num_devices=1)


def test_init_backbone_puts_the_file_into_the_state(weights_file):
    path, variables = weights_file
    config = _config(path, "pretrained")
    model = build_model(config)
    tx = create_optimizer(config.optimizer, 10)
    par = DataParallel("mesh")
    state = par.put_state(create_train_state(model, tx, jax.random.key(0), (1, 32, 32, 3)))
    state, message = init_backbone(state, model, path)
    assert "Initialised the backbone" in message and "Caffe" in message
    for name in ("conv1_1", "conv5_3", "fc7"):
        np.testing.assert_array_equal(state.params[name]["kernel"],
                                      variables["params"][name]["kernel"])
    assert not np.any(np.asarray(state.params["score_fr"]["kernel"]))
    wide = FCN(3, widths=(8, 4, 8, 8, 8), fc_features=16)
    wide_state = par.put_state(create_train_state(wide, tx, jax.random.key(0), (1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"key 'conv1_1/bias' has shape \[4\], which does not "
                                         r"fit params/conv1_1/bias \[8\]"):
        init_backbone(wide_state, wide, path)
