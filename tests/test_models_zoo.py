"""The model zoo through its registrations: every model at an odd size, jitted, in bfloat16 and
through serialisation; FCN-AlexNet and FCN-ResNet parameter counts; the pretrained-encoder
U-Net; models by module path; a user's model trained from the CLI."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import out_shape, random_variables, tiny_model, tiny_size, uniform_images

from flaxseg import models
from flaxseg.models import (
    FCN,
    EncoderDecoder,
    FCNResNet,
    UNet,
    create_model,
    model_geometry,
    model_spec,
    param_count,
)
from flaxseg.models.fcn import head_plan


@pytest.mark.parametrize("name", models.available_models())
def test_every_model_at_an_odd_size_jit_bfloat16_and_serialization(name):
    # Every registration at its tiny width: the geometry's output size at an odd input
    # size (the nearest one a VALID net takes), float32 logits from bfloat16 compute,
    # and a flax.serialization round trip giving the same logits.
    model = tiny_model(name, norm="batch") if name.startswith("unet") else tiny_model(name)
    size = tiny_size(name, at_least=37)
    width = model_geometry(model).smallest_input(size + 1)
    x = uniform_images(5, (2, size, width, 3))
    variables = random_variables(model, x.shape)
    apply = jax.jit(model.apply)
    logits = apply(variables, x)
    geometry = model_geometry(model)
    assert logits.shape == (2, *geometry.output_shape(size, width), 3)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    half = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, logits, atol=0.1 * float(jnp.abs(logits).max()))
    data = flax.serialization.to_bytes(variables)
    template = jax.tree.map(jnp.zeros_like, variables)
    restored = flax.serialization.from_bytes(template, data)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(apply(restored, x), logits)  # traced and compiled once



def test_fcn_head_offsets_are_the_references():
    # Derived from the layers' geometry, as Caffe's coord_map does: voc-fcn{32,16,8}s's
    # crops and voc-fcn-alexnet's 63-pixel upscore with its crop at 18.
    def plan(variant, backbone="vgg16"):
        b = FCN(2, variant=variant, backbone=backbone).backbone_module()
        return [(u.name, u.kernel, u.crop) for u in head_plan(b.coords(), b.stages(), variant)]

    assert plan("32s") == [("upscore32", 64, 19)]
    assert plan("16s") == [("upscore2", 4, 5), ("upscore16", 32, 27)]
    assert plan("8s") == [("upscore2", 4, 5), ("upscore_pool4", 4, 9), ("upscore8", 16, 31)]
    assert plan("32s", "alexnet") == [("upscore32", 63, 18)]



def test_fcn_alexnet_parameter_count_and_layers():
    # The FCN paper's Table 1: FCN-AlexNet, 57M parameters. On torchvision's AlexNet
    # (no grouped convolutions) with 21 classes: 57,089,877 without the upsampling
    # (Caffe's grouped AlexNet: 56,954,261), 58,840,206 with the 63x63 upscore.
    model = create_model("fcn_alexnet", num_classes=21)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    assert set(params) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7",
                           "score_fr", "upscore32"}
    total = param_count(model, (1, 64, 64, 3))
    assert total == 58_840_206
    assert total - params["upscore32"]["kernel"].size == 57_089_877
    assert round((total - params["upscore32"]["kernel"].size) / 1e6) == 57
    for h, w in [(1, 1), (37, 61)]:  # the 100-pixel pad lets any size through
        assert out_shape(tiny_model("fcn_alexnet"), (1, h, w, 3)).shape == (1, h, w, 3)



def test_fcn_resnet_parameter_counts_and_aux_head():
    # torchvision's num_params for fcn_resnet50 / fcn_resnet101 (auxiliary head included).
    for depth, count in ((50, 35_322_218), (101, 54_314_346)):
        model = FCNResNet(21, depth=depth, aux_loss=True)
        assert param_count(model, (1, 32, 32, 3)) == count
    model = tiny_model("fcn_resnet50", aux_loss=True)
    x = uniform_images(9, (2, 33, 35, 3))
    variables = random_variables(model, x.shape)
    assert set(variables["params"]) == {"backbone", "classifier", "aux_classifier"}
    out = jax.jit(model.apply, static_argnames="train")(variables, x, train=False)
    assert set(out) == {"out", "aux"} and out["aux"].shape == out["out"].shape == (2, 33, 35, 3)
    np.testing.assert_array_equal(models.logits_of(out), out["out"])



def test_unet_on_a_pretrained_encoder():
    # encoder=None is the paper's U-Net; an encoder's maps replace the contracting path.
    assert "encoder" not in jax.eval_shape(UNet(2).init, jax.random.key(0),
                                           jnp.zeros((1, 32, 32, 1)))["params"]
    for encoder, skips in (("vgg16", 64 + 128), ("resnet50", 64)):
        model = UNet(3, features=4, depth=2, encoder=encoder)
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[
            "params"]
        assert set(params) == {"encoder", "upconv_1", "decoder_1", "upconv_0", "decoder_0",
                               "classifier"}
        # decoder_1 sees the stride-2 skip, decoder_0 the stride-1 one (none for ResNet).
        inputs = (params["decoder_1"]["conv1"]["kernel"].shape[2]
                  + params["decoder_0"]["conv1"]["kernel"].shape[2])
        assert inputs == skips + 8 + 4
    with pytest.raises(ValueError, match="needs padding='SAME' and depth 1 to 5"):
        out_shape(UNet(2, depth=6, encoder="resnet50"), (1, 64, 64, 3))



def test_registry_reads_one_registration_per_model():
    names = models.available_models()
    assert {"unet", "unet_valid", "fcn8s", "fcn_alexnet", "fcn_resnet50"} <= set(names)
    for name in names:
        spec = model_spec(name)
        assert spec.name == name and spec.paper
        model = create_model(name, num_classes=2)
        assert all(hasattr(model, f) for f in models.registry.CONTRACT_FIELDS)
    assert create_model("unet_valid", num_classes=2).padding == "VALID"
    assert create_model("fcn16s", num_classes=2).variant == "16s"
    assert isinstance(create_model("encoder_decoder", num_classes=2), EncoderDecoder)
    with pytest.raises(ValueError, match="Unknown model 'segnet'; available models: "
                                         "deeplabv3_mobilenet_v3_large, deeplabv3_resnet101, "):
        create_model("segnet", num_classes=2)
    with pytest.raises(TypeError):
        create_model("unet", num_classes=2, widths=3)
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("unet", UNet, paper="again")



def test_models_by_module_path_follow_the_contract():
    # `package.module:Attr`: a class of the user's own (here flaxseg's, by path).
    model = create_model("flaxseg.models.unet:UNet", num_classes=2, features=4)
    assert isinstance(model, UNet) and model_spec("flaxseg.models.unet:UNet").paper
    with pytest.raises(ValueError, match="Cannot import module 'no_such_package.nets'"):
        create_model("no_such_package.nets:Net", num_classes=2)
    with pytest.raises(ValueError, match="has no model class or registered model 'Nope'"):
        create_model("flaxseg.models.unet:Nope", num_classes=2)
    with pytest.raises(ValueError, match="does not follow the model contract: no field"):
        create_model("flax.linen:Dense", features=2)




USER_MODEL = """
import flax.linen as nn
import jax.numpy as jnp

from flaxseg.models import register_model


class TinyNet(nn.Module):
    \"\"\"Two 3x3 convolutions: a user's own model, following the model contract.\"\"\"

    num_classes: int
    features: int = 8
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(self.features, (3, 3), dtype=self.dtype,
                            param_dtype=self.param_dtype)(x))
        x = nn.Conv(self.num_classes, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x.astype(jnp.float32)


register_model("tiny_net", TinyNet, paper="a user's tiny net", tiny={"features": 4})
"""

USER_CONFIG = """
import ml_collections

from flaxseg import configs


def get_config():
    config = configs.get_config("test")
    config.model = ml_collections.ConfigDict({"name": "unet", "features": 4})
    config.num_train_steps = 3
    return config
"""


def test_a_registered_user_model_trains_from_the_cli(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import child_env

    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(USER_MODEL)
    (package / "config.py").write_text(USER_CONFIG)
    env = child_env(1)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.train", f"--config={package / 'config.py'}",
         "--config.model.name=my_package.nets:tiny_net", "--config.model.features=6",
         f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training my_package.nets:tiny_net" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 3 and 0.0 <= summary["mean_iou"] <= 1.0
