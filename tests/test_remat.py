"""Rematerialisation (`config.remat`): the same outputs and gradients, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseg import models
from flaxseg.models.layers import REMAT_POLICIES
from flaxseg.train.memory import residual_bytes

# Every kind of remat unit: U-Net conv blocks with BatchNorm (and their encoder-decoder
# twin), VGG conv+ReLU layers (FCN), ResNet bottlenecks (FCN-ResNet).
CASES = [("unet", {"norm": "batch"}, 32), ("encoder_decoder", {}, 32),
         ("fcn8s", {}, 32), ("fcn_resnet50", {}, 32)]


def _loss_and_grads(name, kwargs, size, remat):
    model = models.create_model(name, num_classes=3, remat=remat,
                                **{**models.model_spec(name).tiny, **kwargs})
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, x, train=True,
                             rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
        return jnp.mean(models.logits_of(out) ** 2)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize("name, kwargs, size", CASES, ids=[c[0] for c in CASES])
def test_remat_policies_give_the_same_loss_and_gradients(name, kwargs, size):
    loss, grads = _loss_and_grads(name, kwargs, size, "none")
    for remat in REMAT_POLICIES[1:]:
        loss_r, grads_r = _loss_and_grads(name, kwargs, size, remat)
        assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
        # The recomputed forward is the same program; XLA may fuse it differently, so
        # float rounding (measured <= 1e-6 of the largest element) is all that may differ.
        for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
            scale = float(jnp.max(jnp.abs(g))) or 1.0
            np.testing.assert_allclose(np.asarray(g_r), np.asarray(g), rtol=0,
                                       atol=1e-5 * scale)


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    kept = {}
    for remat in REMAT_POLICIES:
        model = models.create_model("unet", num_classes=3, remat=remat, features=8, depth=3,
                                    norm="batch")
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
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


def test_weights_keep_their_names_under_remat():
    for name in ("unet", "fcn8s", "fcn_resnet50"):
        tiny = models.model_spec(name).tiny
        x = jnp.zeros((1, 32, 32, 3))
        plain = models.create_model(name, num_classes=2, **tiny).init(jax.random.key(0), x)
        remat = models.create_model(name, num_classes=2, remat="block",
                                    **tiny).init(jax.random.key(0), x)
        assert jax.tree.structure(plain) == jax.tree.structure(remat)
