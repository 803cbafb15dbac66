"""Published weights into flaxseg: torchvision's networks and a Keras-layout file, equal outputs.

The reference networks are torchvision's own model definitions (the `torchvision` fixture
of conftest.py: PyPI's torchvision beside the CPU torch wheel), randomly initialised in
the test and saved to a file with `torch.save(model.state_dict(), path)`; flaxseg reads
the file. Nothing is downloaded. Errors are relative to the largest reference value.
"""

import json

import jax
import numpy as np
import pytest
from conftest import max_rel_error, nhwc, randomise_batch_norm, save_state_dict

from flaxseg.models import FCN, FCNResNet, param_count
from flaxseg.models.__main__ import main as zoo_main
from flaxseg.models.backbones import VGG16, AlexNet, ResNet
from flaxseg.models.pretrained import from_torchvision
from flaxseg.models.weights import WeightsError, load_backbone
from flaxseg.normalization import CAFFE, IMAGENET

torch = pytest.importorskip("torch")

RTOL = 1e-4  # of the largest reference value
SIZE = 224


def _image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)


def test_fcn_resnet50_checkpoint_equals_torchvision(torchvision, tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=True).eval()
    randomise_batch_norm(reference, 1)
    path = save_state_dict(reference, tmp_path / "fcn.pth")
    model, variables = from_torchvision("fcn_resnet50", path)
    assert (model.num_classes, model.aux_loss) == (21, True)
    # torchvision's FCN_ResNet50_Weights meta num_params, auxiliary head included.
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 35_322_218
    image = _image()
    with torch.no_grad():
        want = reference(torch.from_numpy(image))
    got = jax.jit(model.apply, static_argnames="train")(variables, nhwc(image), train=False)
    errors = {k: max_rel_error(got[k], nhwc(want[k])) for k in ("out", "aux")}
    print(f"fcn_resnet50 max relative error: {errors}")
    assert max(errors.values()) < RTOL


def test_resnet50_features_equal_torchvision_at_every_stride(torchvision, tmp_path):
    torch.manual_seed(2)
    reference = torchvision.models.resnet50().eval()
    randomise_batch_norm(reference, 3)
    path = save_state_dict(reference, tmp_path / "resnet50.pth")
    backbone = ResNet(depth=50)
    pretrained = load_backbone(path, backbone)
    assert pretrained.normalization == IMAGENET
    image = _image(4)
    maps = jax.jit(backbone.apply)(pretrained.variables, nhwc(image))
    x, want = torch.from_numpy(image), {}
    with torch.no_grad():
        x = want["stem"] = reference.relu(reference.bn1(reference.conv1(x)))
        x = reference.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = want[name] = getattr(reference, name)(x)
    errors = {name: max_rel_error(maps[name], nhwc(want[name])) for name in want}
    print(f"resnet50 max relative error per stride: {errors}")
    assert max(errors.values()) < RTOL
    # The ImageNet file is also FCN-ResNet-50's backbone: torchvision's count less fc.
    assert param_count(backbone, (1, 32, 32, 3)) == 25_557_032 - (2048 * 1000 + 1000)


def _classifier_features(reference, image: np.ndarray, hidden: int):
    """torchvision's pool output and the classifier's activations after `hidden` modules
    (fc7 after its ReLU), in eval mode."""
    with torch.no_grad():
        pooled = reference.features(torch.from_numpy(image))
        x = torch.flatten(reference.avgpool(pooled), 1)
        return pooled, reference.classifier[:hidden](x)


def test_alexnet_convolutions_equal_torchvision(torchvision, tmp_path):
    torch.manual_seed(5)
    reference = torchvision.models.alexnet().eval()
    path = save_state_dict(reference, tmp_path / "alexnet.pth")
    backbone = AlexNet()  # torchvision's geometry: conv1 pad 2, floor-mode pools
    variables = load_backbone(path, backbone).variables
    image = _image(6)
    maps = jax.jit(backbone.apply)(variables, nhwc(image))
    pool5, fc7 = _classifier_features(reference, image, hidden=6)
    errors = {"pool5": max_rel_error(maps["pool5"], nhwc(pool5)),
              "fc7": max_rel_error(maps["fc7"][:, 0, 0], fc7)}
    print(f"alexnet max relative error: {errors}")
    assert max(errors.values()) < RTOL
    # torchvision's AlexNet has 61,100,840 parameters; FCN-AlexNet drops fc8 (4096x1000).
    assert param_count(backbone, (1, SIZE, SIZE, 3)) == 61_100_840 - 4_097_000


def _keras_vgg16(path, reference) -> None:
    """Writes `reference`'s weights as Keras 2 stores VGG-16 (`save_weights` HDF5): HWIO
    kernels, fc1 flattened NHWC, the first layer reading BGR."""
    h5py = pytest.importorskip("h5py")
    convs = [m for m in reference.features if isinstance(m, torch.nn.Conv2d)]
    names = [f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
             for i in range(1, n + 1)]
    layers = {}
    for name, conv in zip(names, convs, strict=True):
        kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
        layers[name] = (kernel[:, :, ::-1] if name == "block1_conv1" else kernel,
                        conv.bias.detach().numpy())
    fc1 = reference.classifier[0].weight.detach().numpy()  # [4096, 512*7*7], NCHW order
    fc1 = fc1.reshape(4096, 512, 7, 7).transpose(2, 3, 1, 0).reshape(-1, 4096)
    layers["fc1"] = (fc1, reference.classifier[0].bias.detach().numpy())
    for name, index in (("fc2", 3), ("predictions", 6)):
        layer = reference.classifier[index]
        layers[name] = (layer.weight.detach().numpy().T, layer.bias.detach().numpy())
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in ["input_1", *layers, "flatten"]]
        for group_name in ("input_1", "flatten"):
            f.create_group(group_name).attrs["weight_names"] = []
        for name, (kernel, bias) in layers.items():
            group = f.create_group(name)
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
            group.create_dataset(f"{name}/kernel:0", data=kernel)
            group.create_dataset(f"{name}/bias:0", data=bias)


@pytest.fixture(scope="module")
def vgg16_files(torchvision, tmp_path_factory):
    """A random torchvision `vgg16()` (eval), its state-dict file and a Keras-layout file."""
    torch.manual_seed(7)
    reference = torchvision.models.vgg16().eval()
    folder = tmp_path_factory.mktemp("vgg16")
    _keras_vgg16(folder / "vgg16_keras.h5", reference)
    torch_path = save_state_dict(reference, folder / "vgg16.pth")
    return reference, torch_path, str(folder / "vgg16_keras.h5")


def test_fcn_vgg16_forward_equals_torchvision_from_torch_and_keras_files(vgg16_files):
    reference, torch_file, keras_file = vgg16_files
    assert sum(p.numel() for p in reference.parameters()) == 138_357_544
    # FCN-8s's VGG-16 in torchvision's geometry (conv1_1 pad 1; every pool even at 224).
    backbone = FCN(21, variant="8s").backbone_module().clone(input_pad=1, ceil_mode=False)
    image = _image(8)
    pool5, fc7 = _classifier_features(reference, image, hidden=5)
    apply = jax.jit(backbone.apply)
    errors = {}
    for fmt, path, normalization in (("torch", torch_file, IMAGENET),
                                     ("keras", keras_file, CAFFE)):
        pretrained = load_backbone(path, backbone)
        assert pretrained.normalization == normalization
        maps = apply(pretrained.variables, nhwc(image))
        errors[fmt] = {"pool5": max_rel_error(maps["pool5"], nhwc(pool5)),
                       "fc7": max_rel_error(maps["fc7"][:, 0, 0], fc7)}
    print(f"vgg16 max relative error: {errors}")
    assert max(e for fmt in errors.values() for e in fmt.values()) < RTOL


def test_from_torchvision_vgg16_starts_fcn8s_as_the_reference(vgg16_files):
    reference, torch_file, _ = vgg16_files
    model, variables = from_torchvision("vgg16", torch_file)
    params = variables["params"]
    assert model.variant == "8s" and param_count(model, (1, 64, 64, 3)) == 134_489_759
    np.testing.assert_array_equal(
        params["conv1_1"]["kernel"],
        reference.features[0].weight.detach().numpy().transpose(2, 3, 1, 0))
    for name in ("score_fr", "score_pool4", "score_pool3"):  # zero, as in the reference
        assert not np.any(params[name]["kernel"]) and not np.any(params[name]["bias"])


def test_convert_vgg16_cli_writes_an_npz_numpy_reads(vgg16_files, tmp_path, capsys):
    _, torch_file, keras_file = vgg16_files
    out = tmp_path / "vgg16_imagenet.npz"
    assert zoo_main(["convert-vgg16", keras_file, "--out", str(out)]) == 0
    assert "134,260,544 VGG-16 parameters" in capsys.readouterr().out
    with np.load(out) as data:  # NumPy alone reads it
        assert data["conv1_1/kernel"].shape == (3, 3, 3, 64)
        assert data["fc6/kernel"].shape == (7, 7, 512, 4096)
        assert data["fc7/kernel"].shape == (1, 1, 4096, 4096)
        assert json.loads(str(data["__normalization__"]))["mean"] == list(CAFFE.mean)
    backbone = FCN(21).backbone_module()
    reloaded = load_backbone(out, backbone)
    assert reloaded.normalization == CAFFE
    direct = load_backbone(keras_file, backbone)
    for got, want in zip(jax.tree.leaves(reloaded.variables),
                         jax.tree.leaves(direct.variables), strict=True):
        np.testing.assert_array_equal(got, want)
    assert zoo_main(["convert-vgg16", torch_file + ".missing", "--out", str(out)]) == 2
    assert "No weights file" in capsys.readouterr().err


def test_bad_files_name_the_first_offending_key(torchvision, tmp_path):
    torch.manual_seed(9)
    alexnet = torchvision.models.alexnet()
    path = save_state_dict(alexnet, tmp_path / "alexnet.pth")
    with pytest.raises(WeightsError, match=r"'features.0.weight' has shape \[64, 3, 11, 11\], "
                       r"which does not fit params/conv1_1/kernel \[3, 3, 3, 64\]"):
        load_backbone(path, VGG16())
    with pytest.raises(WeightsError, match=r"no key 'backbone.bn1.bias' \(for params/backbone"):
        from_torchvision("fcn_resnet50", path)
    state = alexnet.state_dict()
    state["features.3.weight"] = state["features.3.weight"][:, :32]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"'features.3.weight' has shape \[192, 32, 5, 5\]"):
        load_backbone(tmp_path / "bad.pth", AlexNet())
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    with pytest.raises(WeightsError, match=r"unexpected key 'layer3.6.conv1.weight'"):
        torch.save({**state, "layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)},
                   tmp_path / "more.pth")
        load_backbone(tmp_path / "more.pth", ResNet(depth=50))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tmp_path / "alexnet.pth").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="truncated"):
        load_backbone(truncated, AlexNet())
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsError, match="neither a PyTorch state dict"):
        load_backbone(tmp_path / "notes.txt", AlexNet())


def test_fcn_resnet_tiny_checkpoint_round_trip_without_aux(torchvision, tmp_path):
    # A torchvision FCN on a 1-block ResNet (cheap), loaded without its auxiliary head.
    from torchvision.models.resnet import Bottleneck
    from torchvision.models.segmentation.fcn import FCN as TorchFCN
    from torchvision.models.segmentation.fcn import FCNHead

    torch.manual_seed(10)
    resnet = torchvision.models.resnet.ResNet(Bottleneck, [1, 1, 1, 1],
                                              replace_stride_with_dilation=[False, True, True])
    backbone = torchvision.models._utils.IntermediateLayerGetter(resnet, {"layer4": "out"})
    reference = TorchFCN(backbone, FCNHead(2048, 5)).eval()
    randomise_batch_norm(reference, 11)
    path = save_state_dict(reference, tmp_path / "tiny.pth")
    model, variables = from_torchvision("fcn_resnet50", path, aux_loss=False,
                                        blocks=(1, 1, 1, 1))
    assert isinstance(model, FCNResNet) and not model.aux_loss
    image = _image(12, size=37)  # an odd size: the resize is PyTorch's align_corners=False
    with torch.no_grad():
        want = reference(torch.from_numpy(image))["out"]
    got = jax.jit(model.apply)(variables, nhwc(image))
    assert max_rel_error(got, nhwc(want)) < RTOL
