"""The exported artifact computes what in-process inference computes, runs without flaxseg
or flax, and refuses what it cannot take with a clear error."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import child_env, random_variables, tiny_model

from flaxseg import export, exported, inference
from flaxseg import models as models_registry
from flaxseg.models import model_geometry
from flaxseg.normalization import Normalization

NORMALIZATION = Normalization((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
TTA = {"flip": True, "scales": (0.75,)}  # one resized scale: the multi-scale path

# (mode, model, options, [(height, width, batch), ...]): two image sizes and two batch
# sizes per export; 'whole' takes multiples of the net's stride (4).
CASES = {
    "whole": ("unet", {}, [(32, 32, 1), (40, 24, 2)]),
    "pad": ("unet", {}, [(30, 27, 1), (37, 41, 2)]),
    "sliding": ("unet", {"tile_size": 16}, [(30, 27, 1), (37, 41, 2)]),
    "gaussian": ("unet", {"tile_size": 16, "overlap": 0.5}, [(30, 27, 1), (37, 41, 2)]),
    "overlap_tile": ("unet_valid", {}, [(30, 27, 1), (37, 41, 2)]),
}


@pytest.fixture(scope="module")
def models():
    """The tiny SAME and VALID U-Nets (width 4, depth 2) with random variables."""
    out = {}
    for name in ("unet", "unet_valid"):
        model = tiny_model(name)
        size = model_geometry(model).smallest_input(48)
        out[name] = (model, random_variables(model, (1, size, size, 3), seed=1), size)
    return out


def _uint8(height, width, batch, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, channels),
                                                dtype=np.uint8)


def _export(models, mode, tta, outputs="both", **kwargs):
    name, options, sizes = CASES[mode]
    model, variables, size = models[name]
    options = {**options, **(TTA if tta else {})}
    if mode == "overlap_tile":
        options["tile_size"] = size
    plan = inference.make_plan(model, variables, 3, mode=mode, **options)
    exp, rule = export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                        channels=3, outputs=outputs, **kwargs)
    exp = jax.export.deserialize(exp.serialize())  # what a user gets from the file
    return exp, rule, (model, variables, options), sizes


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "flip+scales"])
@pytest.mark.parametrize("mode", list(CASES))
def test_artifact_equals_in_process_inference(models, mode, tta):
    exp, rule, (model, variables, options), sizes = _export(models, mode, tta)
    assert rule["symbolic"] and exp.in_avals[0].dtype == np.uint8
    assert str(exp.in_avals[0].shape) == ("(b, 4*h, 4*w, 3)" if mode == "whole"
                                          else "(b, h, w, 3)")
    for seed, (height, width, batch) in enumerate(sizes):
        images = _uint8(height, width, batch, seed)
        labels, probabilities = exp.call(images)
        logits = inference.predict_logits(model, variables, NORMALIZATION(images), mode=mode,
                                          batch_size=batch, **options)
        assert labels.shape == (batch, height, width) and labels.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(labels), logits.argmax(-1))
        np.testing.assert_allclose(probabilities, jax.nn.softmax(logits, axis=-1),
                                   rtol=1e-5, atol=1e-5)


def test_a_mode_without_symbolic_sizes_exports_for_the_given_size(models):
    model, variables, size = models["unet_valid"]
    plan = inference.make_plan(model, variables, 3, mode="whole")
    with pytest.raises(ValueError, match="Give --image_size"):
        export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                channels=3)
    exp, rule = export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                        channels=3, image_size=(size, size))
    assert not rule["symbolic"] and "exactly" in export.size_rule_text(rule)
    images = _uint8(size, size, 2)
    logits = inference.predict_logits(model, variables, NORMALIZATION(images), batch_size=2)
    np.testing.assert_array_equal(np.asarray(exp.call(images)), logits.argmax(-1))
    with pytest.raises(ValueError, match="cannot take an input of 45x45"):
        export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                channels=3, image_size=(45, 45))


@pytest.fixture(scope="module")
def artifact_file(models, tmp_path_factory):
    """A pad-mode artifact (labels) with its sidecar, written as the command writes it."""
    model, variables, _ = models["unet"]
    plan = inference.make_plan(model, variables, 3, mode="pad", flip=True)
    exp, rule = export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                        channels=3, platforms=("cpu", "cuda", "tpu"))
    data = exp.serialize()
    info = export.sidecar(exp, data, plan=plan, rule=rule, normalization=NORMALIZATION,
                          outputs="labels", class_names=("a", "b", "c"), palette=None)
    path = str(tmp_path_factory.mktemp("artifact") / "model.jax")
    export.write(path, data, info)
    images = _uint8(21, 19, 2, seed=5)
    want = inference.predict_logits(model, variables, NORMALIZATION(images), mode="pad",
                                    flip=True, batch_size=2).argmax(-1)
    return path, images, want


def test_the_artifact_runs_where_flaxseg_and_flax_cannot_be_imported(artifact_file, tmp_path):
    path, images, want = artifact_file
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys\n"
        "for name in ('flaxseg', 'flax', 'optax', 'orbax'):\n"
        "    sys.modules[name] = None  # import flaxseg -> ImportError\n"
        "import jax, numpy as np\n"
        f"exp = jax.export.deserialize(open({path!r}, 'rb').read())\n"
        f"np.save({str(tmp_path / 'labels.npy')!r}, np.asarray(exp.call(np.load("
        f"{str(tmp_path / 'images.npy')!r}))))\n"
        "try:\n    import flaxseg\nexcept ImportError:\n    print('no flaxseg')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=child_env(1),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no flaxseg" in result.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), want)


def test_the_sidecar_describes_the_contract(artifact_file):
    path, images, want = artifact_file
    info = json.loads(open(path + ".json").read())
    assert info["bytes"] == os.path.getsize(path) and info["input"]["channels"] == 3
    assert info["class_names"] == ["a", "b", "c"] and len(info["palette"]) == 3
    assert info["palette_source"] == "generated"  # none given: not VOC's colours
    assert info["platforms"] == ["cpu", "cuda", "tpu"] and info["outputs"] == ["labels"]
    assert info["procedure"]["mode"] == "pad" and info["versions"]["jax"] == jax.__version__
    assert info["input"]["size_rule_text"] == "images of any height and width"
    np.testing.assert_array_equal(exported.load(path)(images), want)


def test_bad_artifacts_and_bad_images_get_clear_errors(artifact_file, tmp_path):
    path, images, _ = artifact_file
    data = open(path, "rb").read()
    sidecar = open(path + ".json").read()

    def copy(name, content, with_sidecar=True):
        target = tmp_path / name
        target.write_bytes(content)
        if with_sidecar:
            (tmp_path / (name + ".json")).write_text(sidecar)
        return target

    with pytest.raises(ValueError, match="truncated"):
        exported.load(copy("short.jax", data[: len(data) // 2]))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="corrupt"):
        exported.load(copy("flipped.jax", bytes(flipped)))
    with pytest.raises(ValueError, match="not a readable jax.export artifact"):
        exported.load(copy("bare.jax", data[: len(data) // 2], with_sidecar=False))
    with pytest.raises(ValueError, match="not a readable jax.export artifact"):
        exported.load(copy("text.jax", b"not an artifact", with_sidecar=False))
    artifact = exported.load(path)
    with pytest.raises(ValueError, match="takes images with 3 channel"):
        artifact(images[..., :1])
    with pytest.raises(ValueError, match="takes uint8 images"):
        artifact(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"batch \[B, H, W, C\]"):
        artifact(images[0])


# Every registered SAME net but those exported elsewhere: the U-Net above, the DeepLab
# and LR-ASPP nets through the command line (tests/test_models_deeplab.py), and the
# 101-layer twins of the ResNet-50 ones (the same code).
OTHER_MODELS = sorted(set(models_registry.available_models()) - {
    "unet", "unet_valid", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "deeplabv3plus",
    "fcn_resnet101"})


@pytest.mark.parametrize("name", OTHER_MODELS)
def test_every_same_size_model_exports_for_any_image_size(name):
    # The models' own size arithmetic and bilinear resizes trace with symbolic H, W, so
    # 'pad' exports one program for every size (the VALID U-Net: overlap_tile, above).
    model = tiny_model(name)
    variables = random_variables(model, (1, 32, 32, 3), seed=2)
    plan = inference.make_plan(model, variables, 3, mode="pad")
    exp, rule = export.export_procedure(model, variables, plan, normalization=NORMALIZATION,
                                        channels=3, outputs="both")
    assert rule == {"symbolic": True, "multiple": [1, 1]}
    exp = jax.export.deserialize(exp.serialize())
    images = _uint8(37, 45, 1, seed=3)
    labels, probabilities = exp.call(images)
    logits = inference.predict_logits(model, variables, NORMALIZATION(images), mode="pad")
    np.testing.assert_array_equal(np.asarray(labels), logits.argmax(-1))
    np.testing.assert_allclose(probabilities, jax.nn.softmax(logits, axis=-1), rtol=1e-5,
                               atol=1e-5)
