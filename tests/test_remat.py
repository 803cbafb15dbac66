"""Rematerialisation (`config.remat`): the same outputs and gradients, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import models
from flaxseg.models import logits_of
from flaxseg.models.backbones import create_backbone
from flaxseg.train.memory import residual_bytes

# Every kind of remat unit: U-Net conv blocks with BatchNorm (both policies), VGG
# conv+ReLU layers (FCN's backbone) and ResNet bottlenecks (FCN-ResNet's), the backbones
# tiny and on their own to keep the compiles cheap.
CASES = [
    ("unet", lambda remat: models.create_model("unet", num_classes=3, features=4, depth=2,
                                               norm="batch", remat=remat),
     ("block", "save_convs")),
    ("vgg16", lambda remat: create_backbone("vgg16", widths=(4, 4, 8, 8, 8), fc=False,
                                            remat=remat), ("block",)),
    ("resnet50", lambda remat: create_backbone("resnet50", blocks=(1, 1, 1, 1), base_width=4,
                                               max_stride=8, remat=remat), ("block",)),
]


def _loss_and_grads(build, remat):
    model = build(remat)
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
        maps = out.values() if isinstance(out, dict) else [logits_of(out)]
        return sum(jnp.mean(m**2) for m in maps)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name, build, policies", CASES, ids=[c[0] for c in CASES])
def test_remat_policies_give_the_same_loss_and_gradients(name, build, policies):
    loss, grads = _loss_and_grads(build, "none")
    for remat in policies:
        loss_r, grads_r = _loss_and_grads(build, remat)
        assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
        # The recomputed forward is the same program; XLA may fuse it differently, so
        # float rounding is all that may differ.
        for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
            scale = float(jnp.max(jnp.abs(g))) or 1.0
            np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=0,
                                       atol=1e-5 * scale)


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
