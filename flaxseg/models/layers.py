"""Building blocks shared by the segmentation models.

All arrays are NHWC (`[B, H, W, C]`). The pooling and upsampling here are written
so that their gradients stay cheap on every backend:

- `max_pool_2x2` is a reshape and a max, so its gradient is a plain elementwise
  select, never XLA's `select_and_scatter` (slow on CPU, no deterministic GPU kernel);
  `max_pool_3x3` (stride 2, AlexNet's and ResNet's) is the maximum of strided views.
- `ConvTranspose` keeps the usual `[kh, kw, C_in, C_out]` kernel but computes the
  stride-`s` transposed convolution with kernel size `m * s` as an ordinary
  `m x m` convolution to `s * s * C_out` channels followed by depth-to-space
  (for the U-Net's 2x2/stride-2 kernel, `m = 1`: a single matmul). It equals
  `nn.ConvTranspose(..., padding='VALID', transpose_kernel=False)` with the same
  weights, at a fraction of the lax transposed convolution's cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxseg import tiling

Dtype = Any
Initializer = Callable[..., jax.Array]

NORMS = (None, "batch", "group")
# Rematerialisation policies (`remat` of every model): what the backward pass recomputes.
#   'none': every activation is stored.
#   'block': each block (U-Net conv block, VGG / AlexNet conv+ReLU, ResNet bottleneck)
#     keeps only its input; its inner activations are recomputed in the backward pass.
#   'save_convs': as 'block', but convolution outputs are kept (named `CONV_OUTPUT`):
#     only the cheap norms and ReLUs are recomputed.
REMAT_POLICIES = ("none", "block", "save_convs")
CONV_OUTPUT = "conv_output"


def check_image_batch(x: jax.Array, model: str) -> None:
    """Raises ValueError unless `x` is a float `[B, H, W, C]` batch with C >= 1."""
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects an NHWC image batch [B, H, W, C]; got an array of rank "
            f"{x.ndim} with shape {tuple(x.shape)}. Add a batch axis (x[None]) or a "
            "channel axis (x[..., None]) as needed."
        )
    if any(size < 1 for size in x.shape[1:]):  # per axis: symbolic sizes (jax.export) compare
        raise ValueError(
            f"{model} expects H, W and C of at least 1; got shape {tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model} expects floating-point images; got dtype {x.dtype}. Convert with "
            "x.astype(jnp.float32) / 255."
        )


def center_crop(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Crops the centre `size = (h, w)` out of axes 1 and 2 of `x`.

    Works for any rank >= 3 whose axes 1, 2 are H, W: labels `[B, H, W]` and
    features `[B, H, W, C]`. When `H - h` is odd the extra row goes to the bottom
    (and the extra column to the right), as in the U-Net reference's crops.
    """
    if x.ndim < 3:
        raise ValueError(
            f"center_crop expects an array [B, H, W, ...] of rank >= 3; got shape {x.shape}."
        )
    h, w = size  # ints, or symbolic sizes under jax.export
    height, width = x.shape[1], x.shape[2]
    if not (0 < h <= height and 0 < w <= width):
        raise ValueError(
            f"center_crop cannot take {h}x{w} out of {height}x{width}; the crop must be "
            "positive and no larger than the array's H, W."
        )
    top, left = (height - h) // 2, (width - w) // 2
    return x[:, top : top + h, left : left + w]


def resize_bilinear(x: jax.Array, size: Sequence[Any]) -> jax.Array:
    """`[B, h, w, C]` -> `[B, H, W, C]` for `size` (H, W), which may be symbolic:
    PyTorch's `interpolate(mode='bilinear', align_corners=False)` (half-pixel centres,
    edges clamped, no antialiasing), as interpolation-matrix contractions (see
    `flaxseg.tiling.resize_bilinear`)."""
    return tiling.resize_bilinear(x, *size, dense=True)


def max_pool_2x2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
    """2x2 max pooling with stride 2 on `[B, H, W, C]`, as reshape + max.

    With `ceil_mode=False` H and W must be even (the VALID U-Net guarantees it,
    the SAME models pad first); with `ceil_mode=True` an odd trailing row/column is
    pooled on its own, like Caffe's pooling in the FCN reference. Returns
    `[B, ceil(H/2), ceil(W/2), C]` in `x`'s dtype.
    """
    b, h, w, c = x.shape
    if ceil_mode:
        pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
        x = jnp.pad(x, pad, constant_values=-jnp.inf)
        h, w = h + h % 2, w + w % 2
    elif h % 2 or w % 2:
        raise ValueError(
            f"max_pool_2x2 needs even H and W without ceil_mode; got {h}x{w}."
        )
    return _pool_2x2(x)


@jax.custom_vjp
def _pool_2x2(x: jax.Array) -> jax.Array:
    # The elementwise maximum of each window's four pixels, not a max-reduction: XLA:CPU
    # in jax 0.11.2 returns NaN for a bfloat16 max-reduction (reduce and reduce_window
    # alike) fed by conv + ReLU under jit. Both are exact, so the results are equal.
    b, h, w, c = x.shape
    q = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return jnp.maximum(jnp.maximum(q[:, :, 0, :, 0], q[:, :, 0, :, 1]),
                       jnp.maximum(q[:, :, 1, :, 0], q[:, :, 1, :, 1]))


def _pool_2x2_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _pool_2x2(x), x


def _pool_2x2_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    """The gradient goes to one winner per window: the first maximum in row-major order.

    JAX's own `reduce_max` gradient divides by the number of inputs equal to the maximum.
    When XLA recomputes the pooled input inside the backward pass (e.g. a fused BatchNorm)
    and the recomputation differs in the last bit, that number is 0 and the gradient NaN
    (seen with XLA CPU at --xla_backend_optimization_level=0). An argmax always picks
    exactly one input, like PyTorch's and cuDNN's max-pool gradients.
    """
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    winner = jnp.argmax(windows.reshape(b, h // 2, w // 2, 4, c), axis=3)
    mask = jax.nn.one_hot(winner, 4, axis=3, dtype=g.dtype)
    dx = (mask * g[:, :, :, None, :]).reshape(b, h // 2, w // 2, 2, 2, c)
    return (dx.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c),)


_pool_2x2.defvjp(_pool_2x2_fwd, _pool_2x2_bwd)


def max_pool_3x3(x: jax.Array, padding: int = 0, ceil_mode: bool = False) -> jax.Array:
    """3x3 max pooling with stride 2 on `[B, H, W, C]`: AlexNet's and ResNet's pool.

    `padding` pixels of -inf on each side (ResNet: 1), then windows every 2 pixels:
    `floor((H + 2p - 3) / 2) + 1` of them per axis (PyTorch's default), or with
    `ceil_mode=True` `ceil(...) + 1` (Caffe's, the FCN reference's), the last window
    overhanging the edge. Written as the maximum of nine strided views, so its gradient
    is elementwise selects, never `select_and_scatter` (ties share the gradient).
    """
    _, h, w, _ = x.shape
    # Integer arithmetic, so that H and W may be symbolic (jax.export).
    ceil = 1 if ceil_mode else 0
    out_h, out_w = ((n + 2 * padding - 3 + ceil) // 2 + 1 for n in (h, w))
    if not any(map(jax.export.is_symbolic_dim, (h, w))) and min(out_h, out_w) < 1:
        raise ValueError(f"max_pool_3x3 needs H, W + 2 * padding >= 3; got {h}x{w}.")
    # The windows read 2 * (out - 1) + 3 rows and columns: pad up to that (floor mode
    # may leave the last ones unread).
    pad = ((0, 0), (padding, tiling.dim_max(0, 2 * out_h + 1 - h - padding)),
           (padding, tiling.dim_max(0, 2 * out_w + 1 - w - padding)), (0, 0))
    x = jnp.pad(x, pad, constant_values=-jnp.inf)
    views = [x[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2]
             for i in range(3) for j in range(3)]
    return functools.reduce(jnp.maximum, views)


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
    """`[B, H, W, s*s*C]` (channels ordered `(row, col, C)`) -> `[B, s*H, s*W, C]`."""
    b, h, w, c = x.shape
    out = c // (block * block)
    x = x.reshape(b, h, w, block, block, out)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * block, w * block, out)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Stride-`stride` transposed convolution, 'VALID' (output `(H - 1) * s + k`).

    `x` is `[B, H, W, C_in]`, `kernel` `[k, k, C_in, C_out]` (a `k` that is not a multiple
    of `stride`, like FCN-AlexNet's 63 at stride 32, is zero-padded in front); the result
    `[B, (H-1)*s + k, (W-1)*s + k, C_out]` equals
    `nn.ConvTranspose(C_out, (k, k), (s, s), padding='VALID')` with that kernel.

    Why it is the same: flax's transposed conv adds `x[i] * kernel[k-1-q]` to output
    `s*i + q`. Writing `q = s*t + p`, output block `j` (rows `s*j .. s*j+s-1`) receives
    `x[j - t]` for `t < m = k // s`, i.e. an `m x m` correlation over the input padded
    by `m - 1`, with `s*s*C_out` output channels that depth-to-space lays out.
    """
    k = kernel.shape[0]
    if kernel.shape[1] != k:
        raise ValueError(f"conv_transpose needs a square kernel; got {kernel.shape[:2]}.")
    if k % stride:
        # Zero rows/columns in front of the kernel add nothing to the first
        # (H-1)*s + k outputs and only extend the output: pad, then crop back.
        extra = -k % stride
        padded = jnp.pad(kernel, ((extra, 0), (extra, 0), (0, 0), (0, 0)))
        size = (x.shape[1] - 1) * stride + k, (x.shape[2] - 1) * stride + k
        return conv_transpose(x, padded, stride)[:, : size[0], : size[1]]
    m = k // stride
    c_in, c_out = kernel.shape[2], kernel.shape[3]
    # [m, s, m, s, C_in, C_out] -> flip the within-block offsets -> [m, m, C_in, s*s*C_out].
    sub = kernel.reshape(m, stride, m, stride, c_in, c_out)[:, ::-1, :, ::-1]
    sub = sub.transpose(0, 2, 4, 1, 3, 5).reshape(m, m, c_in, stride * stride * c_out)
    if m == 1:
        y = pointwise_conv(x, sub)
    else:
        y = jax.lax.conv_general_dilated(
            x,
            sub,
            window_strides=(1, 1),
            padding=((m - 1, m - 1), (m - 1, m - 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    return depth_to_space(y, stride)


def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution of `[B, H, W, C_in]` with kernel `[1, 1, C_in, C_out]` -> `[B, H, W, C_out]`.

    One 2-D matmul `[B*H*W, C_in] @ [C_in, C_out]`. The same sum as `lax.conv` or a
    4-D `einsum`, but XLA:CPU runs its gradient several times faster: the kernel
    gradient of a 2-D matmul is one plain GEMM, while a 1x1 conv's is a full
    backward-filter convolution and the einsum's a three-axis contraction.
    """
    if kernel.shape[:2] != (1, 1) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"pointwise_conv needs a [1, 1, {x.shape[-1]}, C_out] kernel for input "
            f"{tuple(x.shape)}; got {tuple(kernel.shape)}."
        )
    b, h, w, c = x.shape
    y = x.reshape(b * h * w, c) @ kernel.reshape(kernel.shape[2:])
    return y.reshape(b, h, w, kernel.shape[3])


class Conv1x1(nn.Module):
    """`nn.Conv(features, (1, 1))` with the same params (`kernel [1, 1, C_in, features]`,
    `bias [features]`, same default inits) computed by `pointwise_conv`."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = pointwise_conv(x, kernel)
        return y if bias is None else y + bias


def bilinear_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    """Kernel `[k, k, C, C]` that upsamples each channel by bilinear interpolation.

    The FCN reference's `upsample_filt`: a separable tent of half-width
    `f = ceil(k / 2)`, centred at `f - 1` (k odd) or `f - 0.5` (k even), on the
    channel diagonal; zero across channels. `key` is unused (deterministic).
    """
    del key
    k, k2, c_in, c_out = shape
    if k != k2 or c_in != c_out:
        raise ValueError(
            f"bilinear_init needs a square kernel mapping C channels to C; got shape {shape}."
        )
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = np.arange(k)
    tent = 1 - np.abs(og - center) / factor
    kernel = np.zeros((k, k, c_in, c_out), np.float64)
    kernel[:, :, np.arange(c_in), np.arange(c_out)] = np.outer(tent, tent)[:, :, None]
    return jnp.asarray(kernel, dtype)


class ConvTranspose(nn.Module):
    """Transposed convolution, kernel `k x k`, stride `s`, 'VALID'.

    Parameters `kernel [k, k, C_in, features]` (and `bias [features]`) are laid out as
    `nn.ConvTranspose(transpose_kernel=False)`'s, and the output is the same
    `[B, (H-1)*s + k, (W-1)*s + k, features]`; see `conv_transpose` for the fast form.
    """

    features: int
    kernel_size: int = 2
    stride: int = 2
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.he_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_transpose(x, kernel, self.stride)
        return y if bias is None else y + bias


def check_remat(remat: str, model: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{model}.remat must be one of {REMAT_POLICIES}; got {remat!r}.")


def rematerialized(module: type[nn.Module], remat: str,
                   static_argnums: tuple[int, ...] = (2,)) -> type[nn.Module]:
    """`module`, or `module` under `flax.linen.remat` with the policy `remat` names.

    `static_argnums` count `self` as 0: the default (2,) is `__call__(self, x, train)`'s
    Python bool. Parameter names are unchanged, so weights load the same either way.
    """
    check_remat(remat, module.__name__)
    if remat == "none":
        return module
    policy = (jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
              if remat == "save_convs" else None)
    return nn.remat(module, policy=policy, static_argnums=static_argnums)


def conv_output(x: jax.Array) -> jax.Array:
    """Names a convolution's output for the 'save_convs' policy (identity otherwise)."""
    return checkpoint_name(x, CONV_OUTPUT)


def group_count(features: int, max_groups: int = 32) -> int:
    """GroupNorm's group count: the largest divisor of `features` up to `max_groups`."""
    return math.gcd(features, max_groups)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by an optional norm and ReLU.

    `[B, H, W, C]` -> `[B, H', W', features]` with `H' = H` ('SAME') or `H - 4`
    ('VALID'). He-normal kernels (the U-Net paper's `sqrt(2 / N)`); convolutions
    followed by a norm have no bias (the norm's shift replaces it).
    """

    features: int
    padding: str = "SAME"
    norm: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in (1, 2):
            x = nn.Conv(
                self.features,
                (3, 3),
                padding=self.padding,
                use_bias=self.norm is None,
                kernel_init=nn.initializers.he_normal(),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x)
            x = conv_output(x)
            if self.norm == "batch":
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"norm{i}",
                )(x)
            elif self.norm == "group":
                x = nn.GroupNorm(
                    num_groups=group_count(self.features),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"norm{i}",
                )(x)
            x = nn.relu(x)
        return x
