"""DeepLabV3, LR-ASPP and DeepLabV3+: torchvision's files load exactly, DeepLabV3+ matches a
PyTorch twin, a split image gives the unsplit forward, and DeepLabV3 with its auxiliary
head trains from the command line.

The references are torchvision's own model definitions (the `torchvision` fixture of
conftest.py), randomly initialised with non-trivial BatchNorm statistics and saved with
`torch.save(model.state_dict(), path)`; flaxseg reads the files. The DeepLabV3+ twin is
written here in PyTorch from torchvision's ResNet and ASPP and the paper's decoder.
Inputs are small (32-64 px): the time goes to compiling the full-width networks. Errors
are relative to the largest reference value.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    child_env,
    max_rel_error,
    nhwc,
    random_variables,
    randomise_batch_norm,
    save_state_dict,
    tiny_model,
    uniform_images,
)
from jax.sharding import NamedSharding, PartitionSpec

from flaxseg.models import param_count
from flaxseg.models.backbones import MobileNetV3, ResNet, backbone_at_stride
from flaxseg.models.backbones.mobilenet_v3 import STAGE_BLOCKS, TINY_BLOCKS
from flaxseg.models.deeplabv3 import DeepLabV3
from flaxseg.models.deeplabv3plus import DeepLabV3Plus
from flaxseg.models.lraspp import LRASPP
from flaxseg.models.pretrained import from_torchvision
from flaxseg.models.weights import (
    WeightsError,
    convert,
    load_backbone,
    load_model_backbone,
    torch_key_fn,
    torch_to_flax,
)
from flaxseg.train import DataParallel
from flaxseg.train.parallel import SPACE_AXIS

RTOL = 1e-4  # of the largest reference value
# torchvision's weights meta num_params (21 classes; the auxiliary head where it has one).
NUM_PARAMS = {"deeplabv3_resnet50": 42_004_074, "deeplabv3_resnet101": 60_996_202,
              "deeplabv3_mobilenet_v3_large": 11_029_328, "lraspp_mobilenet_v3_large": 3_221_538}


def _torch():
    return pytest.importorskip("torch")


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, height, width)).astype(np.float32)


@pytest.mark.parametrize("name, size", [
    ("deeplabv3_resnet50", (33, 40)), ("deeplabv3_resnet101", (32, 32)),
    ("deeplabv3_mobilenet_v3_large", (45, 38)), ("lraspp_mobilenet_v3_large", (37, 45)),
])
def test_torchvision_segmentation_files_give_torchvision_logits(torchvision, tmp_path, name,
                                                                size):
    torch = _torch()
    torch.manual_seed(0)
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}
    reference = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, **aux).eval()
    randomise_batch_norm(reference, 1)
    model, variables = from_torchvision(name, save_state_dict(reference, tmp_path / f"{name}.pth"))
    assert (model.num_classes, getattr(model, "aux_loss", False)) == (21, bool(aux))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == NUM_PARAMS[name]
    image = _image(2, *size)  # odd sizes: the resizes are PyTorch's align_corners=False
    with torch.no_grad():
        want = reference(torch.from_numpy(image))
    got = jax.jit(model.apply)(variables, nhwc(image))
    got = got if isinstance(got, dict) else {"out": got}
    errors = {k: max_rel_error(got[k], nhwc(want[k])) for k in got}
    print(f"{name} max relative error: {errors}")
    assert max(errors.values()) < RTOL


def test_mobilenet_v3_large_imagenet_file_is_a_backbone(torchvision, tmp_path):
    torch = _torch()
    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v3_large().eval()
    randomise_batch_norm(reference, 4)
    path = save_state_dict(reference, tmp_path / "mobilenet_v3_large.pth")
    backbone = MobileNetV3()
    maps = jax.jit(backbone.apply)(load_backbone(path, backbone).variables,
                                   nhwc(image := _image(5, 64, 64)))
    x, errors = torch.from_numpy(image), {}
    with torch.no_grad():
        for i, layer in enumerate(reference.features):
            x = layer(x)
            if str(i) in ("1", "3", "6", "12", "16"):  # the end of each stride
                errors[str(i)] = max_rel_error(maps[str(i)], nhwc(x))
    print(f"mobilenet_v3_large max relative error per stride: {errors}")
    assert max(errors.values()) < RTOL
    # torchvision's count (5,483,032) less the ImageNet classifier (960x1280, 1280x1000).
    assert param_count(backbone, (1, 32, 32, 3)) == 5_483_032 - 1_230_080 - 1_281_000
    # A fresh LR-ASPP (the default would be DeepLabV3) on it, its last stage dilated.
    fresh, variables = from_torchvision("mobilenet_v3_large", path,
                                        model="lraspp_mobilenet_v3_large", num_classes=3)
    assert isinstance(fresh, LRASPP) and fresh.backbone_module().dilated
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["13"]["block"]["1"]["0"]["kernel"],
        reference.features[13].block[1][0].weight.detach().numpy().transpose(2, 3, 1, 0))
    assert set(variables["params"]["classifier"]) == {"cbr", "scale", "low_classifier",
                                                      "high_classifier"}
    with pytest.raises(WeightsError, match=r"'fcn_resnet50' is built on resnet50, not on "
                                           r"mobilenet_v3_large"):
        from_torchvision("mobilenet_v3_large", path, model="fcn_resnet50")
    with pytest.raises(WeightsError, match=r"holds torchvision's deeplabv3_mobilenet_v3_large, "
                                           r"not lraspp_mobilenet_v3_large"):
        deeplab = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=2)
        from_torchvision("lraspp_mobilenet_v3_large", save_state_dict(deeplab, tmp_path / "dl.pth"))


def test_resnet101_imagenet_file_is_a_deeplabv3plus_backbone(torchvision, tmp_path):
    # What from_torchvision('resnet101', path, model='deeplabv3plus', backbone='resnet101')
    # and --config.model.backbone_weights load (the rest of from_torchvision's path is the
    # MobileNetV3 test's).
    torch = _torch()
    torch.manual_seed(6)
    reference = torchvision.models.resnet101()
    path = save_state_dict(reference, tmp_path / "resnet101.pth")
    with pytest.raises(WeightsError, match=r"is built on resnet50, not on resnet101 .*pass "
                                           r"backbone='resnet101'"):
        from_torchvision("resnet101", path, model="deeplabv3plus")
    model = DeepLabV3Plus(21, backbone="resnet101", output_stride=8)
    variables = load_model_backbone(model, path).variables
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["layer3"]["22"]["conv2"]["kernel"],
        reference.layer3[22].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    # Every backbone variable, nothing else: torchvision's count less fc.
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == (
        44_549_160 - (2048 * 1000 + 1000))


def _deeplabv3plus_twin(torchvision, num_classes: int, blocks, output_stride: int):
    """DeepLabV3+ in PyTorch: torchvision's ResNet (layer1 at stride 4, the deepest layers
    dilated to `output_stride`) and ASPP, the paper's decoder, flaxseg's layer names."""
    torch = _torch()
    from torch import nn
    from torch.nn import functional as F
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.models.segmentation.deeplabv3 import ASPP

    def conv_bn_relu(c_in, c_out, kernel):
        return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU()]

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            resnet = ResNet(Bottleneck, list(blocks),
                            replace_stride_with_dilation=[False, output_stride == 8, True])
            self.backbone = torchvision.models._utils.IntermediateLayerGetter(
                resnet, {"layer1": "low", "layer4": "out"})
            self.aspp = ASPP(2048, (6, 12, 18) if output_stride == 16 else (12, 24, 36))
            self.decoder = nn.Module()
            self.decoder.project = nn.Sequential(*conv_bn_relu(256, 48, 1))
            self.decoder.fuse = nn.Sequential(*conv_bn_relu(256 + 48, 256, 3),
                                              *conv_bn_relu(256, 256, 3))
            self.classifier = nn.Conv2d(256, num_classes, 1)

        def forward(self, x):
            maps = self.backbone(x)
            low = self.decoder.project(maps["low"])
            high = F.interpolate(self.aspp(maps["out"]), size=low.shape[-2:],
                                 mode="bilinear", align_corners=False)
            y = self.classifier(self.decoder.fuse(torch.cat([high, low], 1)))
            return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return Twin()


def test_deeplabv3plus_equals_a_pytorch_twin(torchvision):
    # The paper's network at both strides, against the twin: parameter counts at full
    # depth (ResNet-50 / 101), logits on a one-block ResNet.
    for depth, blocks in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))):
        twin = _deeplabv3plus_twin(torchvision, 21, blocks, 16)
        count = param_count(DeepLabV3Plus(21, backbone=f"resnet{depth}"), (1, 32, 32, 3))
        assert count == sum(p.numel() for p in twin.parameters())
        assert count == {50: 40_352_181, 101: 59_344_309}[depth]
    torch = _torch()
    for output_stride in (16, 8):
        torch.manual_seed(output_stride)
        twin = _deeplabv3plus_twin(torchvision, 5, (1, 1, 1, 1), output_stride).eval()
        randomise_batch_norm(twin, 7)
        model = DeepLabV3Plus(5, output_stride=output_stride, blocks=(1, 1, 1, 1))
        source = {k: v.numpy() for k, v in twin.state_dict().items()}
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        variables = convert(abstract, source, torch_key_fn(None), torch_to_flax, "twin")
        image = _image(8, 45, 38)
        with torch.no_grad():
            want = twin(torch.from_numpy(image))
        error = max_rel_error(jax.jit(model.apply)(variables, nhwc(image)), nhwc(want))
        print(f"deeplabv3plus output stride {output_stride}: max relative error {error}")
        assert error < RTOL


def test_deeplabv3plus_backbones_and_strides():
    # MobileNetV3 and VGG-16 give stride-4 and stride-16 maps; stride 8 needs a ResNet.
    for backbone, low in (("mobilenet_v3_large", "3"), ("vgg16", "conv3_3"),
                          ("resnet50", "layer1")):
        net = DeepLabV3Plus(3, backbone=backbone).backbone_module()
        coords = net.coords()
        assert coords[low].stride == 4 and list(coords.values())[-1].stride == 16
    assert param_count(DeepLabV3Plus(21, backbone="vgg16"), (1, 32, 32, 3)) == 20_155_573
    with pytest.raises(ValueError, match=r"'mobilenet_v3_large' has no output stride 8; it "
                                         r"takes \[16, 32\]"):
        DeepLabV3Plus(3, backbone="mobilenet_v3_large", output_stride=8).backbone_module()
    with pytest.raises(ValueError, match="Backbone 'alexnet' cannot be dilated"):
        backbone_at_stride("alexnet", 16)
    with pytest.raises(ValueError, match="DeepLabV3.backbone must be one of"):
        DeepLabV3(3, backbone="vgg16").backbone_module()
    with pytest.raises(TypeError, match="Backbone 'resnet50' has no such field: .*width_mult"):
        DeepLabV3(3, width_mult=0.5).backbone_module()


def test_mobilenet_v3_blocks_keep_the_first_blocks_of_each_stage():
    # The cheap variant's layers are the whole network's, by torchvision's numbers.
    full, tiny = (MobileNetV3(dilated=True, width_mult=0.25, blocks=blocks)
                  for blocks in (None, TINY_BLOCKS))
    assert full.coords() == MobileNetV3(dilated=True, blocks=STAGE_BLOCKS).coords()
    assert len(full.coords()) == 17
    assert {name: c.stride for name, c in tiny.coords().items()} == {
        "0": 2, "1": 2, "2": 4, "4": 8, "7": 16, "13": 16, "14": 16, "16": 16}
    assert MobileNetV3(blocks=TINY_BLOCKS).coords()["14"].stride == 32  # undilated
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    # Each kept layer has the whole network's parameters and output widths (a block after
    # a dropped one reads fewer channels).
    widths = [jax.tree.map(lambda a: a.shape[-1],
                           jax.eval_shape(net.init, jax.random.key(0), x)["params"])
              for net in (full, tiny)]
    for name in tiny.coords():
        assert widths[1][name] == widths[0][name], name
    for blocks in ((1, 3, 1, 1, 1), (1, 1, 1, 1), (1, 0, 1, 1, 1)):
        with pytest.raises(ValueError, match=r"MobileNetV3.blocks must keep 1 to "
                                             r"\(1, 2, 3, 6, 3\) blocks per stage"):
            MobileNetV3(blocks=blocks).coords()


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    # torchvision's zero_init_residual: only each bottleneck's bn3 scale starts at 0, so a
    # block without a downsample returns its (non-negative, post-ReLU) input exactly.
    x = uniform_images(0, (2, 32, 32, 3))

    def init(zero):  # the stem and layer1's two blocks
        net = ResNet(blocks=(2, 1, 1, 1), base_width=4, max_stride=4, zero_init_residual=zero)
        return net, jax.jit(net.init)(jax.random.key(0), x)

    def scales(variables):
        return {"/".join(k.key for k in path): leaf for path, leaf in
                jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                if path[-1].key == "scale"}

    net, variables = init(True)
    zero = {p for p, v in scales(variables).items() if not v.any()}
    assert zero == {"layer1/0/bn3/scale", "layer1/1/bn3/scale"}
    assert all((v == 1).all() for p, v in scales(variables).items() if p not in zero)
    _, captured = net.apply(variables, x, capture_intermediates=True)
    layer1 = captured["intermediates"]["layer1"]
    block0, block1 = layer1["0"]["__call__"][0], layer1["1"]["__call__"][0]
    assert np.asarray(block0).min() >= 0 and np.array_equal(block1, block0)
    # The default is the torchvision-built network's: every scale starts at 1.
    assert all((v == 1).all() for v in scales(init(False)[1]).values())
    # DeepLabV3 and DeepLabV3+ hand it to a ResNet backbone; MobileNetV3 has no such field.
    assert DeepLabV3Plus(3, zero_init_residual=True).backbone_module().zero_init_residual
    assert DeepLabV3(3, zero_init_residual=True).backbone_module().zero_init_residual
    with pytest.raises(TypeError, match="'mobilenet_v3_large' has no such field: .*"
                                        "zero_init_residual"):
        DeepLabV3Plus(3, backbone="mobilenet_v3_large",
                      zero_init_residual=True).backbone_module()


# The global averages: the ASPP's image pooling (ResNet; MobileNetV3 with its squeeze-
# excitation gates) and LR-ASPP's gate branch; DeepLabV3 with its auxiliary head, as the
# command line trains it.
@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv3_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large"])
def test_a_split_image_gives_the_unsplit_forward(num_devices, name):
    # Training mode: BatchNorm's batch statistics and every global average pool are the
    # whole image's, not one device's part of it. In float64: in float32 the layouts'
    # different summation orders, amplified by train-mode BatchNorm, moved logits by
    # 3.2e-5 of the largest on jax 0.12 (1e-5 held on jax 0.10); float64 leaves ~1e-14,
    # and a per-device statistic would be off by ~1e-1.
    with jax.enable_x64(True):
        aux = {"aux_loss": True} if name.startswith("deeplabv3_") else {}
        model = tiny_model(name, dtype=jnp.float64, param_dtype=jnp.float64, **aux)
        x = uniform_images(3, (2, 64, 48, 3)).astype(jnp.float64)
        variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                                 random_variables(model, x.shape))

        def forward(variables, x):
            return model.apply(variables, x, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(0)})

        whole = jax.jit(forward)(variables, x)
        par = DataParallel("mesh", spatial_partitions=num_devices)
        split = jax.device_put(x, NamedSharding(par.mesh, PartitionSpec(None, SPACE_AXIS)))
        parts = jax.jit(forward)(par.put_state(variables), split)
        for got, want in zip(jax.tree.leaves(parts), jax.tree.leaves(whole), strict=True):
            print(f"max difference {float(np.abs(got - want).max()):.1e} "
                  f"of {float(np.abs(want).max()):.1e}")
            np.testing.assert_allclose(got, want, rtol=0,
                                       atol=1e-9 * float(np.abs(want).max()))


# The command line's config: the test config's 32 px scenes with the tiny DeepLabV3-ResNet
# and its auxiliary head, as torchvision's references train it.
CLI_CONFIG = """
import ml_collections

from flaxseg import configs
from flaxseg.models import model_spec


def get_config():
    config = configs.get_config("test")
    config.model = ml_collections.ConfigDict(
        {"name": "deeplabv3_resnet50", **model_spec("deeplabv3_resnet50").tiny, "aux_loss": True})
    config.batch_size = 4
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    return config
"""


# One command-line training, DeepLabV3 with the auxiliary head on ResNet: the config's
# `aux_loss` into the model, the train step adding half the head's loss, the head in the
# checkpoint and back in `load_for_inference`. A child process compiles its own
# initialiser and train step (14-19 CPU-s each on jax 0.12), and the command line builds
# every registered model alike (`model_spec(name).tiny` into the registry's constructor;
# test_models_zoo), so the other models are not trained through it again: their
# training-mode forward (DeepLabV3+, DeepLabV3 with its auxiliary head on MobileNetV3,
# LR-ASPP) is test_a_split_image_gives_the_unsplit_forward's, their backbones' gradients
# test_remat's. Every model's export for any image size is test_export's, and `python -m
# flaxseg.export` of a trained workdir is test_evaluate_predict's.
def test_deeplabv3_with_its_aux_head_trains_from_the_command_line(tmp_path):
    from flaxseg.train.checkpoint import load_for_inference

    (tmp_path / "config.py").write_text(CLI_CONFIG)
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.train", f"--config={tmp_path / 'config.py'}",
         f"--workdir={workdir}"],
        env=child_env(1), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
    model, variables, _ = load_for_inference(workdir)
    assert type(model) is DeepLabV3 and model.aux_loss
    assert "aux_classifier" in variables["params"]
    # The checkpoint holds the whole trained network: every variable of the model, finite.
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
            == jax.tree.map(lambda a: (a.shape, a.dtype), variables))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))
