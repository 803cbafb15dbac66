"""flaxseg.models.layers against NumPy / flax references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg.models import layers


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(2, 9, 8), (2, 9, 8, 3)])
def test_center_crop_rank3_and_rank4(shape):
    x = np.arange(np.prod(shape)).reshape(shape)
    out = np.asarray(layers.center_crop(jnp.asarray(x), (4, 5)))
    # 9 -> 4 leaves 5 rows: 2 above, 3 below; 8 -> 5 leaves 3 columns: 1 left, 2 right.
    np.testing.assert_array_equal(out, x[:, 2:6, 1:6])
    np.testing.assert_array_equal(layers.center_crop(jnp.asarray(x), shape[1:3]), x)


def test_center_crop_errors():
    with pytest.raises(ValueError, match="rank >= 3"):
        layers.center_crop(jnp.zeros((4, 4)), (2, 2))
    with pytest.raises(ValueError, match="cannot take 5x2 out of 4x4"):
        layers.center_crop(jnp.zeros((1, 4, 4)), (5, 2))


def test_max_pool_matches_nn_max_pool_and_avoids_select_and_scatter():
    x = jnp.asarray(_normal(0, (2, 6, 10, 3)))
    np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))

    def grad_hlo(pool):
        return jax.jit(jax.grad(lambda v: pool(v).sum())).lower(x).as_text()

    assert "select_and_scatter" in grad_hlo(lambda v: nn.max_pool(v, (2, 2), (2, 2)))
    assert "select_and_scatter" not in grad_hlo(layers.max_pool_2x2)
    # The gradient routes each window's upstream gradient to its maximum.
    g = jax.grad(lambda v: layers.max_pool_2x2(v).sum())(x)
    np.testing.assert_array_equal(g, jax.grad(lambda v: nn.max_pool(v, (2, 2), (2, 2)).sum())(x))


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
    # Ties: jax's reduce_max gradient would split 1/4 each; one winner (row-major first,
    # as PyTorch picks) never divides, so it cannot turn 0/0 = NaN.
    x = jnp.zeros((1, 4, 4, 1)).at[0, 3, 3, 0].set(1.0)
    g = np.asarray(jax.grad(lambda v: (layers.max_pool_2x2(v) * jnp.arange(1.0, 5.0).reshape(
        1, 2, 2, 1)).sum())(x))[0, :, :, 0]
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[3, 3] = 1, 2, 3, 4
    np.testing.assert_array_equal(g, expected)
    # NumPy oracle on random data (no ties): each window's gradient lands on its argmax.
    x = _normal(3, (2, 6, 8, 3))
    up = _normal(4, (2, 3, 4, 3))
    g = np.asarray(jax.grad(lambda v: (layers.max_pool_2x2(v) * up).sum())(jnp.asarray(x)))
    windows = x.reshape(2, 3, 2, 4, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 3, 4, 3, 4)
    winner = windows.argmax(-1)
    oracle = np.zeros_like(windows)
    np.put_along_axis(oracle, winner[..., None], up[..., None], axis=-1)
    oracle = oracle.reshape(2, 3, 4, 3, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(x.shape)
    np.testing.assert_array_equal(g, oracle)


def test_max_pool_ceil_mode_pools_the_odd_edge_alone():
    x = jnp.asarray(_normal(1, (1, 5, 7, 2)))
    ref = nn.max_pool(x, (2, 2), (2, 2), padding=((0, 1), (0, 1)))
    np.testing.assert_array_equal(layers.max_pool_2x2(x, ceil_mode=True), ref)
    with pytest.raises(ValueError, match="even H and W"):
        layers.max_pool_2x2(x)


def test_depth_to_space_numpy_oracle():
    x = _normal(2, (2, 3, 4, 2 * 2 * 5))
    out = np.asarray(layers.depth_to_space(jnp.asarray(x), 2))
    ref = np.zeros((2, 6, 8, 5), np.float32)
    for a in range(2):
        for b in range(2):
            ref[:, a::2, b::2] = x[..., (2 * a + b) * 5 : (2 * a + b + 1) * 5]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (4, 2), (16, 8), (6, 3)])
def test_fast_conv_transpose_equals_nn_conv_transpose(kernel, stride):
    x = jnp.asarray(_normal(3, (2, 5, 7, 3)))
    params = {"kernel": jnp.asarray(_normal(4, (kernel, kernel, 3, 4))),
              "bias": jnp.asarray(_normal(5, (4,)))}
    ref = nn.ConvTranspose(4, (kernel, kernel), (stride, stride), padding="VALID")
    fast = layers.ConvTranspose(4, kernel, stride)
    want = ref.apply({"params": params}, x)
    got = fast.apply({"params": params}, x)
    assert got.shape == want.shape == (2, 4 * stride + kernel, 6 * stride + kernel, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Same parameter layout as flax's module.
    shapes = jax.eval_shape(fast.init, jax.random.key(0), x)["params"]
    assert shapes["kernel"].shape == (kernel, kernel, 3, 4)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (7, 4), (15, 8)])
def test_conv_transpose_kernel_not_multiple_of_stride(kernel, stride):
    # FCN-AlexNet's upsampling kernels are 2s - 1 (63 at stride 32).
    x = jnp.asarray(_normal(5, (2, 3, 4, 2)))
    weights = jnp.asarray(_normal(6, (kernel, kernel, 2, 3)))
    want = nn.ConvTranspose(3, (kernel, kernel), (stride, stride), padding="VALID",
                            use_bias=False).apply({"params": {"kernel": weights}}, x)
    got = layers.conv_transpose(x, weights, stride)
    assert got.shape == want.shape == (2, 2 * stride + kernel, 3 * stride + kernel, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,padding,ceil_mode", [(9, 0, False), (10, 0, False),
                                                   (10, 0, True), (11, 1, False), (8, 1, True)])
def test_max_pool_3x3_matches_lax_reduce_window(size, padding, ceil_mode):
    x = jnp.asarray(_normal(7, (2, size, size + 3, 3)))
    out = layers.max_pool_3x3(x, padding=padding, ceil_mode=ceil_mode)
    rows = [(size + 2 * padding - 3) / 2, (size + 3 + 2 * padding - 3) / 2]
    rounding = np.ceil if ceil_mode else np.floor
    expect_h, expect_w = (int(rounding(r)) + 1 for r in rows)
    # The reference: reduce_window over -inf padding wide enough for every window.
    padded = np.pad(x, ((0, 0), (padding, 3), (padding, 3), (0, 0)), constant_values=-np.inf)
    padded = padded[:, : 2 * expect_h + 1, : 2 * expect_w + 1]
    want = jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 "VALID")
    assert out.shape == want.shape == (2, expect_h, expect_w, 3)
    np.testing.assert_array_equal(out, want)
    hlo = jax.jit(jax.grad(lambda v: layers.max_pool_3x3(v, padding).sum())).lower(x).as_text()
    assert "select_and_scatter" not in hlo


def test_bilinear_init_matches_reference_filter():
    kernel = np.asarray(layers.bilinear_init(None, (4, 4, 2, 2)))
    tent = np.array([0.25, 0.75, 0.75, 0.25])  # FCN's upsample_filt(4)
    np.testing.assert_allclose(kernel[:, :, 0, 0], np.outer(tent, tent))
    np.testing.assert_array_equal(kernel[:, :, 0, 1], 0.0)
    with pytest.raises(ValueError, match="C channels to C"):
        layers.bilinear_init(None, (4, 4, 2, 3))


@pytest.mark.parametrize("factor", [2, 8])
def test_bilinear_upsampling_of_a_ramp(factor):
    # Kernel 2f, stride f, cropped by f/2 (Caffe's pad): bilinear interpolation with
    # half-pixel centres, so a linear ramp maps to a linear ramp away from the border.
    h, w = 6, 5
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    ramp = (yy + 2 * xx)[None, :, :, None]
    module = layers.ConvTranspose(1, 2 * factor, factor, use_bias=False,
                                  kernel_init=layers.bilinear_init)
    variables = module.init(jax.random.key(0), jnp.asarray(ramp))
    up = np.asarray(module.apply(variables, jnp.asarray(ramp)))
    crop = factor // 2
    up = up[0, crop : crop + h * factor, crop : crop + w * factor, 0]
    oy, ox = np.mgrid[: h * factor, : w * factor]
    want = ((oy + 0.5) / factor - 0.5) + 2 * ((ox + 0.5) / factor - 0.5)
    inner = (slice(factor, -factor), slice(factor, -factor))
    np.testing.assert_allclose(up[inner], want[inner], atol=1e-5)
    resized = jax.image.resize(jnp.asarray(ramp[0, :, :, 0]), (h * factor, w * factor), "linear")
    np.testing.assert_allclose(up[inner], np.asarray(resized)[inner], atol=1e-5)


def test_check_image_batch_errors():
    with pytest.raises(ValueError, match=r"rank 3 .*x\[None\]"):
        layers.check_image_batch(jnp.zeros((4, 4, 1)), "UNet")
    with pytest.raises(ValueError, match="C of at least 1"):
        layers.check_image_batch(jnp.zeros((1, 4, 4, 0)), "UNet")
    with pytest.raises(ValueError, match="floating-point"):
        layers.check_image_batch(jnp.zeros((1, 4, 4, 1), jnp.uint8), "UNet")


def test_group_count_divides_features():
    assert [layers.group_count(f) for f in (4, 48, 64, 1024)] == [4, 16, 32, 32]


def test_max_pool_after_bfloat16_conv_relu_under_jit_is_exact():
    # XLA:CPU in jax 0.11.2 gave NaN for a bfloat16 max-reduction fed by conv + ReLU under
    # jit (this very chain); the pool is written as elementwise maxima to avoid it.
    def chain(x, k1, k2):
        for k in (k1, k2):
            x = jax.nn.relu(jax.lax.conv_general_dilated(
                x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return layers.max_pool_2x2(x)

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(keys[0], (2, 40, 40, 3)).astype(jnp.bfloat16)
    k1 = (jax.random.normal(keys[1], (3, 3, 3, 64)) * 0.3).astype(jnp.bfloat16)
    k2 = (jax.random.normal(keys[2], (3, 3, 64, 64)) * 0.06).astype(jnp.bfloat16)
    jitted = jax.jit(chain)(x, k1, k2)
    assert bool(jnp.all(jnp.isfinite(jitted)))
    np.testing.assert_array_equal(np.asarray(jitted, np.float32),
                                  np.asarray(chain(x, k1, k2), np.float32))
