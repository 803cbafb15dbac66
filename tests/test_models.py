"""flaxseg.models: shapes, paper parameter counts, alignment, dropout, dtypes, round trips.

Models are tiny (features 4-8, 32-64 px); variables mostly come from conftest's
`random_variables`. Every registered model's shapes, jit, bfloat16 and serialisation:
test_models_zoo.py.
"""

import math

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
    UNet,
    create_model,
    forward_flops,
    param_count,
    unet_output_size,
    unet_valid_input_sizes,
)
from flaxseg.models.__main__ import main as zoo_main
from flaxseg.models.layers import bilinear_init

TINY_FCN = {"widths": (4, 4, 8, 8, 8), "fc_features": 16}


# ----------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("cls", [UNet, EncoderDecoder])
def test_same_padding_takes_any_size(cls):
    model = cls(num_classes=3, features=4, depth=3)
    variables = random_variables(model, (1, 16, 16, 2))  # parameters do not depend on H, W
    apply = jax.jit(model.apply)
    for h, w in [(37, 53), (5, 7), (1, 1)]:
        logits = apply(variables, uniform_images(h, (2, h, w, 2)))
        assert logits.shape == (2, h, w, 3)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))


def test_valid_unet_572_to_388():
    assert unet_output_size(572) == 388
    out = out_shape(UNet(num_classes=2, padding="VALID"), (1, 572, 572, 1))
    assert out.shape == (1, 388, 388, 2) and out.dtype == jnp.float32
    out = out_shape(create_model("unet_valid", num_classes=2), (1, 572, 588, 1))
    assert out.shape == (1, 388, 404, 2)


def test_valid_input_sizes():
    sizes = unet_valid_input_sizes(150, 600)
    assert sizes[0] == 188 and 572 in sizes
    assert set(np.diff(sizes)) == {16}
    small = unet_valid_input_sizes(1, 60, depth=2)
    for size in range(1, 61):
        if size in small:
            out = out_shape(UNet(2, features=4, depth=2, padding="VALID"), (1, size, size, 1))
            assert out.shape[1] == unet_output_size(size, depth=2) > 0
        else:
            with pytest.raises(ValueError, match="Nearest valid sizes"):
                unet_output_size(size, depth=2)


def test_invalid_valid_size_names_nearest_sizes():
    model = UNet(2, features=4, padding="VALID")
    with pytest.raises(ValueError, match=r"size 570.*Nearest valid sizes: 556 or 572"):
        out_shape(model, (1, 572, 570, 1))
    with pytest.raises(ValueError, match=r"Nearest valid sizes: 188 \("):
        unet_output_size(100)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        unet_output_size(572, depth=0)


def test_valid_unet_is_translation_equivariant():
    # No padding anywhere: shifting the input by a multiple of the total stride (4 at
    # depth 2) shifts the output by as much, exactly.
    model = UNet(2, features=4, depth=2, padding="VALID", dropout_rate=0.0)
    size = unet_valid_input_sizes(40, 60, depth=2)[0]
    variables = random_variables(model, (1, size, size, 1))
    big = uniform_images(0, (1, size + 8, size + 8, 1))
    apply = jax.jit(model.apply)  # one program for both views, not op by op
    out_a = apply(variables, big[:, :size, :size])
    out_b = apply(variables, big[:, 8 : 8 + size, 4 : 4 + size])
    assert out_a.shape[1] == unet_output_size(size, depth=2)
    np.testing.assert_allclose(out_a[:, 8:, 4:], out_b[:, :-8, :-4], rtol=1e-5, atol=1e-5)


def test_unet_paper_parameter_counts():
    assert param_count(UNet(2, norm=None), (1, 572, 572, 1)) == 31_030_658
    assert param_count(UNet(2, norm=None, padding="VALID"), (1, 572, 572, 3)) == 31_031_810


def test_encoder_decoder_is_unet_without_skips():
    # Without the concatenated skip, each decoder's first conv loses C_i * C_i * 9 weights.
    unet = param_count(UNet(21), (1, 64, 64, 3))
    plain = param_count(EncoderDecoder(21), (1, 64, 64, 3))
    assert unet - plain == sum(9 * (64 * 2**i) ** 2 for i in range(4))
    assert plain == 27_899_605


def test_unet_init_is_he_normal_with_zero_bias():
    model = UNet(2, features=8, depth=1)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    kernel = np.asarray(params["bottleneck"]["conv2"]["kernel"])  # fan_in 3*3*16
    assert kernel.shape == (3, 3, 16, 16) and kernel.dtype == np.float32
    assert abs(kernel.std() / math.sqrt(2 / 144) - 1) < 0.15
    assert not np.any(params["bottleneck"]["conv2"]["bias"])
    assert params["upconv_0"]["kernel"].shape == (2, 2, 16, 8)


@pytest.mark.parametrize("name", ["unet", "fcn8s"])
def test_dropout_only_in_training_and_keyed(name):
    model = tiny_model(name, dropout_rate=0.5)
    size = tiny_size(name)
    variables = random_variables(model, (2, size, size, 1))
    x = uniform_images(1, (2, size, size, 1))
    apply = jax.jit(model.apply, static_argnames="train")
    k1, k2 = jax.random.split(jax.random.key(7))
    evaluated = apply(variables, x)
    np.testing.assert_array_equal(evaluated, apply(variables, x, train=False))
    first = apply(variables, x, train=True, rngs={"dropout": k1})
    np.testing.assert_array_equal(first, apply(variables, x, train=True, rngs={"dropout": k1}))
    assert not np.allclose(first, apply(variables, x, train=True, rngs={"dropout": k2}))
    assert not np.allclose(first, evaluated)
    with pytest.raises(flax.errors.InvalidRngError):
        apply(variables, x, train=True)
    no_dropout = jax.jit(tiny_model(name, dropout_rate=0.0).apply, static_argnames="train")
    np.testing.assert_allclose(
        no_dropout(variables, x, train=True), evaluated, rtol=1e-6, atol=1e-6
    )


def test_batch_norm_under_pmap_matches_the_global_batch(num_devices):
    model = UNet(3, features=4, depth=1, norm="batch", dropout_rate=0.0)
    variables = random_variables(model, (1, 16, 16, 1))
    x = uniform_images(3, (2 * num_devices, 16, 16, 1))

    def step(model, variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    logits, stats = jax.jit(lambda v, x: step(model, v, x))(variables, x)
    pmapped = jax.pmap(
        lambda v, x: step(model.clone(axis_name="batch"), v, x),
        axis_name="batch",
        in_axes=(None, 0),
    )
    p_logits, p_stats = pmapped(variables, x.reshape(num_devices, 2, 16, 16, 1))
    np.testing.assert_allclose(p_logits.reshape(logits.shape), logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(jax.tree.leaves(p_stats), jax.tree.leaves(stats), strict=True):
        for device in range(num_devices):
            np.testing.assert_allclose(got[device], want, rtol=1e-4, atol=1e-5)
    # Running statistics moved away from their initial (0, 1).
    assert float(jnp.abs(stats["batch_stats"]["encoder_0"]["norm1"]["mean"]).max()) > 0


def test_group_norm_and_bilinear_upsampling():
    for padding, size, out in [("SAME", 21, 21), ("VALID", 44, 4)]:
        model = UNet(2, features=8, depth=2, norm="group", upsample="bilinear", padding=padding)
        variables = random_variables(model, (1, size, size, 1))
        params = variables["params"]
        assert set(params["encoder_0"]) == {"conv1", "norm1", "conv2", "norm2"}
        assert "bias" not in params["encoder_0"]["conv1"]  # the norm's shift replaces it
        assert params["upconv_0"]["kernel"].shape == (1, 1, 16, 8)
        logits = jax.jit(model.apply)(variables, uniform_images(4, (1, size, size, 1)))
        assert logits.shape == (1, out, out, 2)
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"padding": "same"}, "padding must be one of"),
        ({"norm": "layer"}, "norm must be one of"),
        ({"upsample": "nearest"}, "upsample must be one of"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"features": 0}, "features must be a positive integer"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ],
)
def test_unet_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        out_shape(UNet(2, **kwargs), (1, 32, 32, 1))


@pytest.mark.parametrize("name", models.available_models())
def test_every_model_rejects_bad_rank_and_channels(name):
    model = tiny_model(name)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]; got an array of rank 3"):
        out_shape(model, (32, 32, 1))
    with pytest.raises(ValueError, match="C of at least 1"):
        out_shape(model, (1, 32, 32, 0))


# ----------------------------------------------------------------------------- FCN


def test_fcn_paper_parameter_counts():
    shape = (1, 64, 64, 3)
    counts = {v: param_count(FCN(21, variant=v), shape) for v in ("32s", "16s", "8s")}
    assert counts == {"32s": 136_152_917, "16s": 134_815_994, "8s": 134_489_759}
    params = jax.eval_shape(FCN(21).init, jax.random.key(0), jnp.zeros(shape))["params"]

    def size(names):
        return sum(leaf.size for n in names for leaf in jax.tree.leaves(params[n]))

    assert size([n for n in params if n.startswith("conv")]) == 14_714_688
    upscores = [n for n in params if n.startswith("upscore")]
    assert size(set(params) - set(upscores)) == 134_362_751


LAYERS = [f"conv{s}_{j}" for s, n in enumerate((2, 2, 3, 3, 3), 1) for j in range(1, n + 1)]
LAYERS += ["fc6", "fc7", "score_fr"]
VARIANT_LAYERS = {
    "32s": {"upscore32"},
    "16s": {"upscore2", "score_pool4", "upscore16"},
    "8s": {"upscore2", "score_pool4", "upscore_pool4", "score_pool3", "upscore8"},
}


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_fcn_layer_names_and_kernel_shapes(variant):
    params = jax.eval_shape(
        FCN(21, variant=variant).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )["params"]
    assert set(params) == set(LAYERS) | VARIANT_LAYERS[variant]
    assert params["fc6"]["kernel"].shape == (7, 7, 512, 4096)
    assert params["fc7"]["kernel"].shape == (1, 1, 4096, 4096)
    final = {"32s": 32, "16s": 16, "8s": 8}[variant]
    assert set(params[f"upscore{final}"]) == {"kernel"}  # no bias
    assert params[f"upscore{final}"]["kernel"].shape == (2 * final, 2 * final, 21, 21)


def test_fcn_initialisation_bilinear_and_zero_skips():
    params = jax.jit(FCN(3, **TINY_FCN).init)(jax.random.key(0),
                                              jnp.zeros((1, 32, 32, 3)))["params"]
    for name, k in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        assert set(params[name]) == {"kernel"}
        np.testing.assert_array_equal(params[name]["kernel"], bilinear_init(None, (k, k, 3, 3)))
    for name in ("score_fr", "score_pool4", "score_pool3"):  # the reference's zero start
        assert not np.any(params[name]["kernel"]) and not np.any(params[name]["bias"])


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_fcn_output_has_input_size(variant):
    for h, w in [(32, 32), (37, 61), (50, 33)]:
        out = out_shape(FCN(5, variant=variant, **TINY_FCN), (2, h, w, 3))
        assert out.shape == (2, h, w, 5) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="at least 32x32; got 31x40"):
        out_shape(FCN(5, variant=variant), (1, 31, 40, 3))


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_fcn_shifted_input_gives_shifted_output(variant):
    # Shifting the image down by 32 rows (the total stride) shifts the logits by 32
    # rows wherever neither view's receptive field (~400 px) reaches an image border.
    model = FCN(4, variant=variant, dropout_rate=0.0, **TINY_FCN)
    size = 640
    tall = uniform_images(6, (1, size + 32, 36, 3))
    variables = random_variables(model, tall.shape, seed=1)
    apply = jax.jit(model.apply)
    out = apply(variables, tall[:, :size])
    out_shifted = apply(variables, tall[:, 32 : 32 + size])
    assert out.shape == out_shifted.shape == (1, size, 36, 4)
    rows = slice(224, 384)  # interior rows of `out_shifted`, a 32-row multiple
    scale = float(jnp.abs(out).max())
    np.testing.assert_allclose(
        out_shifted[:, rows], out[:, 224 + 32 : 384 + 32], rtol=0, atol=1e-5 * scale
    )


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
def test_fcn_crops_are_centred(variant):
    # With mirror-symmetric kernels the net commutes with flipping the image iff every
    # crop takes the centre. At H, W = 58, 90 every pooled map is even (H + 198 is a
    # multiple of 32), so only the crop offsets could break the symmetry.
    model = FCN(4, variant=variant, dropout_rate=0.0, **TINY_FCN)
    image = uniform_images(7, (1, 58, 90, 3))

    def symmetric(path, leaf):
        if path[-1].key == "kernel":
            leaf = (leaf + leaf[::-1]) / 2
            leaf = (leaf + leaf[:, ::-1]) / 2
        return leaf

    variables = jax.tree_util.tree_map_with_path(
        symmetric, random_variables(model, image.shape, seed=2)
    )
    apply = jax.jit(model.apply)
    out = apply(variables, image)
    flipped = apply(variables, image[:, ::-1, ::-1])[:, ::-1, ::-1]
    scale = float(jnp.abs(out).max())
    assert scale > 1e-3
    np.testing.assert_allclose(flipped, out, rtol=0, atol=1e-5 * scale)


def test_fcn_rejects_bad_fields():
    with pytest.raises(ValueError, match="variant must be one of"):
        out_shape(FCN(2, variant="4s"), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="widths must be 5 positive channel counts"):
        out_shape(FCN(2, widths=(4, 4)), (1, 32, 32, 3))


# ----------------------------------------------------------------------------- registry


def _valid_unet_flops(size: int, features: int, depth: int, c_in: int, classes: int) -> int:
    """Multiply-adds x 2 of the VALID U-Net's convolutions, counted by hand."""
    flops, channels, skips = 0, c_in, []

    def conv(size, c_in, c_out, k=3):
        out = size - (k - 1)
        return out, 2 * out * out * k * k * c_in * c_out

    for i in range(depth + 1):
        width = features * 2**i
        for _ in range(2):
            size, f = conv(size, channels, width)
            flops, channels = flops + f, width
        skips.append(width)
        size //= 2
    size *= 2  # undo the bottleneck's pool
    for i in reversed(range(depth)):
        width = features * 2**i
        size *= 2
        flops += 2 * (size // 2) ** 2 * channels * 4 * width  # 2x2/2 transposed conv
        channels = width + skips[i]
        for _ in range(2):
            size, f = conv(size, channels, width)
            flops, channels = flops + f, width
    return flops + 2 * size * size * channels * classes


def test_forward_flops_matches_a_hand_count():
    size = unet_valid_input_sizes(60, 80, depth=2)[0]
    model = UNet(2, features=8, depth=2, padding="VALID")
    xla = forward_flops(model, (1, size, size, 1))
    hand = _valid_unet_flops(size, 8, 2, 1, 2)
    # XLA also counts the elementwise ops (bias, ReLU, pool): a few per cent more.
    assert hand <= xla <= 1.05 * hand


def test_zoo_cli_prints_the_table(capsys):
    zoo_main(["--size", "32", "--num-classes", "2", "--in-channels", "1",
              "--models", "unet,encoder_decoder"])
    out = capsys.readouterr().out
    assert "| unet | Ronneberger et al. 2015, SAME padding | 32x32 | 32x32 | 31,030,658 |" in out
    assert "| encoder_decoder |" in out
    with pytest.raises(SystemExit):
        zoo_main(["--models", "segnet"])
