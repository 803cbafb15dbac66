"""flaxseg's models from Flax NNX: equal outputs for the same weights; the docs' example runs."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables, tiny_model, uniform_images
from flax import nnx

from flaxseg.models import linen_variables, to_nnx

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.mark.parametrize("name,kwargs", [("unet", {"norm": "batch", "dropout_rate": 0.0}),
                                         ("fcn_resnet50", {"aux_loss": True})])
def test_nnx_model_equals_the_linen_model(name, kwargs):
    model = tiny_model(name, **kwargs)
    x = uniform_images(0, (2, 33, 35, 3))
    variables = random_variables(model, x.shape)
    nnx_model = to_nnx(model, x, rngs=nnx.Rngs(params=0, dropout=1), variables=variables)
    # Both sides compiled (op by op each op compiles on its own): the same operations in
    # one program each, so the same bits.
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    logits = nnx.jit(lambda m, x: m(x, train=False))(nnx_model, x)
    for got, ref in zip(jax.tree.leaves(logits), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(jax.tree.leaves(linen_variables(nnx_model)),
                        jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(got, ref)
    # Training mode updates the BatchNorm statistics in place, as Linen's mutable apply does.
    _, updates = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))(
        variables, x)
    nnx.jit(lambda m, x: m(x, train=True, mutable=["batch_stats"]))(nnx_model, x)
    for got, ref in zip(jax.tree.leaves(linen_variables(nnx_model)["batch_stats"]),
                        jax.tree.leaves(updates["batch_stats"]), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_docs_nnx_example(capsys):
    text = DOCS.read_text()
    section = text[text.index("## Flax NNX"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - the documented example
    history = [float(v) for v in capsys.readouterr().out.split()]
    assert len(history) == 10 and history[-1] < 0.8 * history[0]
    assert namespace["logits"].shape == (8, 32, 32, 2)
    assert namespace["logits"].dtype == jnp.float32
