"""Rematerialisation (`config.remat`): the same outputs and gradients, less memory."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import models
from flaxseg.models import logits_of
from flaxseg.models.backbones import create_backbone
from flaxseg.models.backbones.mobilenet_v3 import InvertedResidual
from flaxseg.models.layers import rematerialized
from flaxseg.train.memory import residual_bytes


class _InvertedResiduals(nn.Module):
    """Two of MobileNetV3-Large's remat units as its last stage builds them (5x5
    depthwise, squeeze-excitation, hard-swish; strided, then dilated with the residual):
    the whole backbone's 15 units would only repeat them at 6x the compile time."""

    remat: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block = rematerialized(InvertedResidual, self.remat)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = block(16, 8, 5, 2, 1, True, "hard_swish", name="1", **kw)(x, train)
        return block(24, 8, 5, 1, 2, True, "hard_swish", residual=True, name="2", **kw)(
            x, train)


# Every kind of remat unit: U-Net conv blocks with BatchNorm (both policies), VGG
# conv+ReLU layers (FCN's backbone), ResNet bottlenecks (FCN-ResNet's, DeepLab's) and
# MobileNetV3's inverted residuals (DeepLabV3's and LR-ASPP's), the backbones tiny and
# on their own to keep the compiles cheap. Each builder takes (remat, **dtypes).
CASES = [
    ("unet", lambda remat, **dt: models.create_model("unet", num_classes=3, features=4,
                                                     depth=1, norm="batch", remat=remat, **dt),
     ("block", "save_convs")),
    ("vgg16", lambda remat, **dt: create_backbone("vgg16", widths=(4, 4, 8, 8, 8), fc=False,
                                                  remat=remat, **dt), ("block",)),
    ("resnet50", lambda remat, **dt: create_backbone("resnet50", blocks=(1, 1, 1, 1),
                                                     base_width=4, max_stride=8, remat=remat,
                                                     **dt), ("block",)),
    ("mobilenet_v3_large", lambda remat, **dt: _InvertedResiduals(remat, **dt), ("block",)),
]


def _loss_and_grads(build, remat, variables=None):
    """(loss, grads, variables) of the `remat` model at `variables` (default: initialised;
    remat changes no variable, so the policies share the plain model's)."""
    # In float64: train-mode BatchNorm over MobileNetV3's 2x2 last maps (the whole
    # backbone on 32x32) amplified the rounding of a differently fused recomputation to
    # 7e-4 of a float32 gradient (measured); in float64 the same leaves agreed to 1.5e-13.
    model = build(remat, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3), jnp.float64)
    if variables is None:
        variables = jax.jit(model.init)(jax.random.key(1), x)  # one program, not op by op

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
        maps = out.values() if isinstance(out, dict) else [logits_of(out)]
        return sum(jnp.mean(m**2) for m in maps)

    return *jax.jit(jax.value_and_grad(loss))(variables["params"]), variables


@pytest.mark.parametrize("name, build, policies", CASES, ids=[c[0] for c in CASES])
def test_remat_policies_give_the_same_loss_and_gradients(name, build, policies):
    with jax.enable_x64(True):
        loss, grads, variables = _loss_and_grads(build, "none")
        # The recomputed forward is the same program; XLA may fuse it differently, so
        # float64 rounding (amplified as above, ~1e-13) is all that may differ. Leaves
        # whose true gradient is zero (a bias before BatchNorm) hold only that rounding,
        # so the bound is of the largest gradient.
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
        for remat in policies:
            loss_r, grads_r, _ = _loss_and_grads(build, remat, variables)
            assert float(loss_r) == pytest.approx(float(loss), rel=1e-12)
            for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
                np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=0,
                                           atol=1e-9 * scale)


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    kept = {}
    for remat in ("none", "block", "save_convs"):
        model = models.create_model("unet", num_classes=3, remat=remat, features=8, depth=3,
                                    norm="batch")
        variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
        kept[remat] = residual_bytes(model, variables, (2, 64, 64, 3))
    # Measured: 9.4 / 2.6 / 4.4 MiB (none / block / save_convs). 'block' keeps each
    # block's input only; 'save_convs' adds the convolutions' outputs.
    assert kept["block"] < kept["save_convs"] < kept["none"], kept
    assert kept["block"] < 0.4 * kept["none"], kept


def test_an_unknown_policy_is_refused_naming_the_choices():
    model = models.create_model("unet", num_classes=2, remat="everything",
                                **models.model_spec("unet").tiny)
    with pytest.raises(ValueError, match=r"UNet.remat must be one of \('none', 'block'"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize("name", ["unet", "fcn8s", "fcn_resnet50", "deeplabv3plus",
                                  "lraspp_mobilenet_v3_large"])
def test_weights_keep_their_names_under_remat(name):
    tiny, x = models.model_spec(name).tiny, jnp.zeros((1, 32, 32, 3))
    shapes = [jax.eval_shape(models.create_model(name, num_classes=2, remat=remat, **tiny).init,
                             jax.random.key(0), x) for remat in ("none", "block")]
    assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
    assert jax.tree.leaves(shapes[0]) == jax.tree.leaves(shapes[1])
