"""The train step on a tiny U-Net: README script, determinism, jit == mesh == pmap, HLO,
NaN guard.

conftest.py gives this process 4 CPU devices. Compiling dominates the run time, so steps
are built once per module, and `donate=False` wherever a test reuses a state.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from flaxseg import losses
from flaxseg.models import UNet, unet_output_size
from flaxseg.train import (
    DataParallel,
    NonFiniteGuard,
    NonFiniteLossError,
    TrainState,
    abstract_train_state,
    create_optimizer,
    create_train_state,
    make_eval_step,
    make_train_step,
    train_step_fn,
)
from flaxseg.train.steps import variables_of

NUM_CLASSES = 3
SIZE = 32
DEVICES = 4
SHAPE = (8, SIZE, SIZE, 1)
# The README's model: create_train_state compiles its initialiser once for all tests here.
MODEL = UNet(num_classes=NUM_CLASSES, features=4, depth=2, norm="batch", dropout_rate=0.1)
NO_DROPOUT = MODEL.clone(dropout_rate=0.0)
ADAM = create_optimizer({"name": "adam", "learning_rate": 1e-2}, 10)
SGD = create_optimizer({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, 10)


def _batch(seed: int, batch_size: int = 8, size: int = SIZE) -> dict[str, np.ndarray]:
    """Discs of class 1 or 2 (brightness says which) on class 0, a void (255) rim."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((batch_size, size, size, 1), np.float32)
    labels = np.zeros((batch_size, size, size), np.int32)
    for b in range(batch_size):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        dist = np.hypot(yy - cy, xx - cx)
        cls = 1 + b % 2
        labels[b][dist < size / 4] = cls
        labels[b][np.abs(dist - size / 4) < 0.7] = 255
        images[b, ..., 0] = (dist < size / 4) * 0.5 * cls + rng.normal(0, 0.05, (size, size))
    return {"image": images, "label": labels}


def _max_rel(a, b) -> float:
    """max |a - b| / max |b| over a whole pytree."""
    a, b = jax.device_get((a, b))  # NumPy: the trees may live on different devices
    diff = max(
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    return diff / max(float(np.abs(y).max()) for y in jax.tree.leaves(b))


def _assert_bitwise_equal(a: TrainState, b: TrainState) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def loss_fn():
    return losses.get_loss_fn("cross_entropy")


@pytest.fixture(scope="module")
def sgd_state():
    """The README model's initial state, with SGD (its update is linear in the gradient)."""
    return create_train_state(MODEL, SGD, jax.random.key(1), SHAPE)  # dropout adds no params


@pytest.fixture(scope="module")
def jit_step(loss_fn):
    """No dropout, not donating (tests reuse their states)."""
    return make_train_step(NO_DROPOUT, loss_fn, NUM_CLASSES, donate=False)


def test_readme_script(capsys):
    # --- README quick start (keep in sync with README.md) ---
    import jax
    import numpy as np

    from flaxseg import losses
    from flaxseg.models import UNet
    from flaxseg.train import DataParallel, create_optimizer, create_train_state, make_train_step

    model = UNet(num_classes=3, features=4, depth=2, norm="batch", dropout_rate=0.1)
    tx = create_optimizer({"name": "adam", "learning_rate": 1e-2}, num_train_steps=10)
    state = create_train_state(model, tx, jax.random.key(0), input_shape=(8, 32, 32, 1))
    loss_fn = losses.get_loss_fn("cross_entropy")  # -> (loss_sum, weight_sum)
    images = np.random.default_rng(0).random((8, 32, 32, 1), dtype=np.float32)
    batch = {"image": images, "label": (images[..., 0] > 0.5).astype(np.int32)}

    history = []
    for mode in ("mesh", "pmap"):  # jit over a device mesh (the default), or pmap + psum
        par = DataParallel(mode)  # all devices; 4 on a CPU after jax_num_cpu_devices=4
        step = make_train_step(model, loss_fn, num_classes=3, parallel=par)
        state = par.put_state(state)
        for _ in range(5):
            state, metrics = step(state, par.put_batch(batch))
            history.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
    print(" ".join(f"{loss:.3f}" for loss in history))
    # --- end of the README script ---

    assert int(state.step) == 10
    assert len(capsys.readouterr().out.split()) == 10
    assert history[-1] < 0.7 * history[0], history
    assert history[-1] < history[4] < history[0], history


def test_state_is_shape_first_with_typed_key_and_float32_params(sgd_state):
    state = sgd_state
    assert isinstance(state, TrainState) and int(state.step) == 0
    assert jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    assert jax.tree.leaves(state.batch_stats), "BatchNorm statistics missing"
    abstract = abstract_train_state(NO_DROPOUT, SGD, SHAPE)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="NHWC"):
        create_train_state(MODEL, SGD, jax.random.key(0), (SIZE, SIZE, 1))
    with pytest.raises(TypeError, match="jax.random.key"):
        create_train_state(MODEL, SGD, 0, SHAPE)


def test_same_seed_same_device_count_is_bitwise_identical(loss_fn):
    """5 steps of the U-Net with dropout and BatchNorm, twice from the same seed."""
    step = make_train_step(MODEL, loss_fn, NUM_CLASSES)

    def run(seed):
        state = create_train_state(MODEL, ADAM, jax.random.key(seed), SHAPE)
        for i in range(5):
            state, _ = step(state, _batch(i))
        return state

    a, b, c = run(0), run(0), run(1)
    _assert_bitwise_equal(a, b)
    assert int(a.step) == 5
    assert _max_rel(a.params, c.params) > 1e-3  # the seed matters


class _DropoutProbe(nn.Module):
    """Keeps its last dropout mask in 'batch_stats', so a test sees each program's key."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        mask = nn.Dropout(0.5, deterministic=not train)(jnp.ones((64,)))
        seen = self.variable("batch_stats", "mask", jnp.zeros, (64,))
        if train:
            seen.value = mask
        return nn.Conv(self.num_classes, (1, 1))(x)


def test_no_dropout_key_is_used_twice(loss_fn):
    probe = _DropoutProbe()
    state = create_train_state(probe, ADAM, jax.random.key(0), SHAPE)
    same = {k: np.concatenate([v[:2]] * DEVICES) for k, v in _batch(0).items()}
    # Under 'pmap' every device folds in its index: the per-device step (as
    # DataParallel('pmap') runs it), with each device's mask returned as its own row.
    par = DataParallel("pmap")
    step = train_step_fn(probe, loss_fn, NUM_CLASSES, axis_name=par.axis_name)

    def with_masks(state, batch):
        new_state, _ = step(state, batch)
        return new_state, new_state.batch_stats["mask"][None]

    per_device = jax.jit(jax.shard_map(with_masks, mesh=par.mesh, in_specs=(P(), P("data")),
                                       out_specs=(P(), P("data")), check_vma=False))
    masks = []
    for _ in range(2):  # the same examples on every device, twice
        state, device_masks = per_device(state, par.put_batch(same))  # device 0's state
        masks.extend(np.asarray(device_masks))  # one mask per device
    assert len({m.tobytes() for m in masks}) == 2 * DEVICES


def test_mesh_dropout_masks_are_the_one_device_masks(loss_fn):
    """Partitionable random bits: the sharded step draws what one device draws.

    With JAX's default (conftest turns it off elsewhere to compile faster), as users run."""
    model = UNet(num_classes=NUM_CLASSES, features=4, depth=2, norm=None, dropout_rate=0.5)
    state = create_train_state(model, SGD, jax.random.key(2), SHAPE)
    with jax.threefry_partitionable(True):
        outs = {mode: make_train_step(model, loss_fn, NUM_CLASSES, parallel=mode,
                                      donate=False)(state, _batch(1))
                for mode in ("jit", "mesh")}
    (jit_state, jit_metrics), (mesh_state, mesh_metrics) = outs["jit"], outs["mesh"]
    np.testing.assert_array_equal(jit_metrics["confusion"], mesh_metrics["confusion"])
    assert _max_rel(mesh_state.params, jit_state.params) < 1e-5
    # Without dropout the step is deterministic; with it the masks decide the update.
    other = make_train_step(model.clone(dropout_rate=0.0), loss_fn, NUM_CLASSES,
                            parallel="jit", donate=False)(state, _batch(1))[0]
    assert _max_rel(other.params, jit_state.params) > 100 * _max_rel(mesh_state.params,
                                                                      jit_state.params)


def _run_steps(mode: str, model: nn.Module, state: TrainState, loss_fn, steps: int,
               dtype=np.float32) -> tuple[TrainState, list]:
    """`steps` steps on batches of 4 images of 16x16 (float64 convolutions are slow on
    XLA:CPU: ~0.6 s per image of 32x32 per step)."""
    par = DataParallel(mode)
    step = make_train_step(model, loss_fn, NUM_CLASSES, parallel=par, donate=False)
    state, history = par.put_state(state), []
    for i in range(steps):
        batch = _batch(10 + i, batch_size=DEVICES, size=16)
        batch["image"] = batch["image"].astype(dtype)
        batch["label"][: 1 + i % 3] = 255  # uneven ignore counts per device
        state, metrics = step(state, par.put_batch(batch))
        history.append(par.to_host(metrics))
    return par.to_host(state), history


def test_four_devices_equal_one_device_after_five_steps(loss_fn):
    """jit on 1 device, mesh on 4, pmap on 4: the same params, compared in float64.

    5 SGD steps of the BatchNorm U-Net on the same global batches (4 images of 16x16, one
    per device; float64 runs slowly on XLA:CPU). The modes differ only
    in the order of the floating-point sums (a device's partial sums, then the all-reduce).
    Why float64: the step is continuous only between the kinks of ReLU and the max pool.
    In float32 the modes' activations differ by up to ~5e-6; with this seed one of the
    32,768 pre-activations of `decoder_0.norm2` lies at |z| = 4.3e-7, so on an AMD EPYC
    its ReLU gate flips between the modes: one pixel's gradient appears or vanishes,
    BatchNorm's backward spreads it over every earlier layer (all gradients 1% apart) and
    the params end 2e-4 apart, where a CPU that rounds the other way measured 9e-7. No
    float32 tolerance bounds a flip. In float64 the activations differ by ~1e-14, eight
    orders below the nearest kink, so no gate flips; the params then agree to 2.1e-16 of
    the largest (measured; 1.1e-10 with 8 images of 32x32). The bounds keep three
    orders of margin for another CPU's rounding and still fail for a real difference
    (per-device BatchNorm statistics: ~1e-2; a missing all-reduce: ~1).
    """
    with jax.enable_x64(True):
        model = NO_DROPOUT.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        initial = create_train_state(model, SGD, jax.random.key(1), SHAPE)
        # Started in the dtype the step returns them in: each program compiles once.
        assert {x.dtype for x in jax.tree.leaves(initial.batch_stats)} == {jnp.dtype("float64")}
        jit_state, jit_history = _run_steps("jit", model, initial, loss_fn, 5, np.float64)
        update = jax.tree.map(jnp.subtract, jit_state.params, initial.params)
        for mode in ("mesh", "pmap"):
            state, history = _run_steps(mode, model, initial, loss_fn, 5, np.float64)
            assert int(state.step) == int(jit_state.step) == 5
            print(f"{mode}: params differ by {_max_rel(state.params, jit_state.params):.1e}")
            assert _max_rel(state.params, jit_state.params) < 1e-7, mode
            assert _max_rel(jax.tree.map(jnp.subtract, state.params, initial.params),
                            update) < 1e-6, mode
            # BatchNorm statistics are the global batch's in every mode.
            assert _max_rel(state.batch_stats, jit_state.batch_stats) < 1e-7, mode
            for got, want in zip(history, jit_history, strict=True):
                np.testing.assert_array_equal(got["confusion"], want["confusion"])
                # The loss is summed in float32 (losses.py): its rounding is not amplified.
                np.testing.assert_allclose(got["loss_sum"], want["loss_sum"], rtol=1e-5)
                assert float(got["weight_sum"]) == float(want["weight_sum"])


def test_pool_gradient_does_not_lower_to_select_and_scatter(sgd_state, jit_step):
    """select_and_scatter has no deterministic GPU kernel (--xla_gpu_deterministic_ops)."""
    hlo = jit_step.lower(sgd_state, _batch(0)).as_text()
    assert "select_and_scatter" not in hlo

    def pooled(x):  # control: the check does see nn.max_pool's gradient
        return nn.max_pool(x, (2, 2), (2, 2)).sum()

    assert "select_and_scatter" in jax.jit(jax.grad(pooled)).lower(jnp.ones((1, 4, 4, 1))).as_text()


def test_nan_guard_keeps_the_state_and_raises_naming_the_step(sgd_state, jit_step):
    guard = NonFiniteGuard("raise")
    state, metrics = jit_step(sgd_state, _batch(0))
    assert guard(1, metrics) and guard.last_finite_loss > 0
    bad = _batch(1)
    bad["image"][0, 3, 3, 0] = np.nan
    new_state, metrics = jit_step(state, bad)
    assert int(metrics["nonfinite"]) == 1
    _assert_bitwise_equal(new_state, state)  # params, statistics, optimiser, step: all kept
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(last finite loss [0-9.]+ at step 1\)"):
        guard(2, metrics)


def test_nan_skip_policy_advances_the_step_and_counts(loss_fn):
    probe = _DropoutProbe()
    state = create_train_state(probe, ADAM, jax.random.key(0), SHAPE)
    step = make_train_step(probe, loss_fn, NUM_CLASSES, nan_policy="skip", donate=False)
    bad = _batch(1)
    bad["image"][:] = np.inf
    new_state, metrics = step(state, bad)
    guard = NonFiniteGuard("skip")
    assert guard(1, metrics) is False and guard.skipped == 1
    assert int(new_state.step) == 1
    _assert_bitwise_equal(new_state.replace(step=state.step), state)


def test_a_run_may_skip_up_to_its_skipped_fraction_and_no_more():
    finite = {"nonfinite": 0, "loss_sum": 1.0, "weight_sum": 2.0}
    guard = NonFiniteGuard("skip", max_skipped_fraction=0.1)
    for step in range(1, 21):
        guard(step, {**finite, "nonfinite": int(step in (5, 12))})
    guard.check_run(20, 20)  # 2 of 20: exactly 10%
    guard(21, {**finite, "nonfinite": 1})
    with pytest.raises(NonFiniteLossError, match=r"^3 of the 21 steps up to step 21 were "
                                                 r"non-finite and skipped \(more than 10%; "
                                                 r"last finite loss 0.5 at step 20\)"):
        guard.check_run(21, 21)


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_eval_step_modes_agree_and_padding_adds_nothing(sgd_state, loss_fn, mode):
    padded = _batch(5)
    padded["label"][6:] = 255  # the eval loader pads the last batch with ignore labels
    variables = variables_of(sgd_state)
    jit_metrics = make_eval_step(NO_DROPOUT, loss_fn, NUM_CLASSES, parallel="jit")(
        variables, padded)
    par = DataParallel(mode)
    metrics = make_eval_step(NO_DROPOUT, loss_fn, NUM_CLASSES, parallel=par)(
        par.put_state(variables), par.put_batch(padded))
    assert set(jit_metrics) == set(metrics) == {"loss_sum", "weight_sum", "confusion"}
    np.testing.assert_array_equal(metrics["confusion"], jit_metrics["confusion"])
    np.testing.assert_allclose(metrics["loss_sum"], jit_metrics["loss_sum"], rtol=1e-5)
    counted = int((padded["label"][:6] != 255).sum())
    assert int(jit_metrics["confusion"].sum()) == counted == float(jit_metrics["weight_sum"])


def test_valid_unet_labels_are_centre_cropped(sgd_state, loss_fn):
    model = NO_DROPOUT.clone(padding="VALID")  # same parameter shapes as SAME
    size = 44
    out = unet_output_size(size, depth=2)
    assert out < size
    batch = _batch(0, batch_size=2, size=size)
    metrics = make_eval_step(model, loss_fn, NUM_CLASSES, parallel="jit")(
        variables_of(sgd_state), batch)
    top = (size - out) // 2
    centre = batch["label"][:, top : top + out, top : top + out]
    assert int(metrics["confusion"].sum()) == int((centre != 255).sum())


def test_bfloat16_compute_keeps_float32_params_and_metrics(sgd_state, loss_fn):
    model = NO_DROPOUT.clone(dtype=jnp.bfloat16)
    new_state, metrics = make_train_step(model, loss_fn, NUM_CLASSES, donate=False)(
        sgd_state, _batch(0)
    )
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss_sum"].dtype == jnp.float32 and np.isfinite(float(metrics["loss_sum"]))
    assert int(metrics["nonfinite"]) == 0 and _max_rel(new_state.params, sgd_state.params) > 0


def test_bad_inputs_raise_clear_errors(sgd_state, jit_step, loss_fn):
    batch = _batch(0)
    with pytest.raises(ValueError, match=r"parallel must be one of \('mesh', 'jit', 'pmap'\)"):
        make_train_step(MODEL, loss_fn, NUM_CLASSES, parallel="pjit")
    with pytest.raises(ValueError, match="nan_policy"):
        make_train_step(MODEL, loss_fn, NUM_CLASSES, nan_policy="ignore")
    with pytest.raises(ValueError, match="nan_policy"):
        NonFiniteGuard("warn")
    with pytest.raises(ValueError, match="num_classes=5"):
        make_eval_step(MODEL, loss_fn, 5)(variables_of(sgd_state), batch)
    with pytest.raises(TypeError, match="floating point"):
        jit_step(sgd_state, {"image": batch["image"].astype(np.uint8), "label": batch["label"]})
    with pytest.raises(ValueError, match="'image' and 'label'"):
        jit_step(sgd_state, {"images": batch["image"]})
    with pytest.raises(ValueError, match="cannot be split over its 4 devices"):
        DataParallel("pmap").put_batch(_batch(0, batch_size=6))
    with pytest.raises(ValueError, match="multiple of 4"):
        DataParallel("mesh").process_rows(6)


def test_put_state_replicates_and_keeps_typed_keys(sgd_state, num_devices):
    for mode, devices in (("mesh", num_devices), ("pmap", num_devices), ("jit", 1)):
        par = DataParallel(mode)
        placed = par.put_state(sgd_state)
        leaf = jax.tree.leaves(placed.params)[0]
        assert len(leaf.sharding.device_set) == devices and leaf.sharding.is_fully_replicated
        _assert_bitwise_equal(par.to_host(placed), sgd_state)
        _assert_bitwise_equal(par.local_copy(placed), sgd_state)
    for mode in ("mesh", "pmap"):  # one layout: the global batch, its rows over 'data'
        image = DataParallel(mode).put_batch(_batch(0))["image"]
        assert image.shape == (8, SIZE, SIZE, 1) and len(image.sharding.device_set) == DEVICES
        assert {s.data.shape for s in image.addressable_shards} == {(2, SIZE, SIZE, 1)}


class _TwoHeads(nn.Module):
    """A model with an auxiliary head: `{'out', 'aux'}` logits, as DeepLabV3 and FCN-ResNet
    return with `aux_loss=True`."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool = False):
        return {"out": nn.Conv(self.num_classes, (3, 3), name="out")(x),
                "aux": nn.Conv(self.num_classes, (1, 1), name="aux")(x)}


def test_an_auxiliary_head_adds_half_its_loss_to_the_gradient():
    # torchvision's references: loss = loss(out) + 0.5 * loss(aux), both means over the
    # labelled pixels. One SGD step of rate 1 moves the params by minus that gradient.
    model = _TwoHeads()
    state = create_train_state(model, optax.sgd(1.0), jax.random.key(0), (2, 8, 8, 1))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, (2, 8, 8)).astype(np.int32)
    labels[0, :2] = 255  # ignored pixels count in neither mean
    batch = {"image": rng.standard_normal((2, 8, 8, 1)).astype(np.float32), "label": labels}
    new_state, metrics = jax.jit(train_step_fn(model, losses.cross_entropy_sum,
                                               NUM_CLASSES))(state, batch)
    keep = labels != 255

    def mean_ce(logits):  # optax's cross-entropy over the labelled pixels
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(keep, labels, 0))
        return jnp.sum(ce * keep) / keep.sum()

    def reference(params):
        outputs = model.apply({"params": params}, batch["image"])
        return mean_ce(outputs["out"]) + 0.5 * mean_ce(outputs["aux"])

    grads = jax.jit(jax.grad(reference))(state.params)
    for head in ("out", "aux"):
        for name in ("kernel", "bias"):
            step = state.params[head][name] - new_state.params[head][name]
            want = grads[head][name]
            # Float32 sums of 116 pixels' terms in two orders, and the subtraction p - g:
            # each a few ulp of the largest magnitude (2e-8 of 0.9 measured). A wrong aux
            # weight moves the aux head's gradient by all of itself.
            scale = float(np.abs(want).max()) + float(np.abs(state.params[head][name]).max())
            print(f"{head}/{name}: max difference {float(np.abs(step - want).max()):.1e} "
                  f"of {scale:.1e}")
            np.testing.assert_allclose(step, want, rtol=0, atol=1e-5 * scale)
    # The reported loss is the one minimised, as torchvision's references log it.
    assert float(metrics["loss_sum"] / metrics["weight_sum"]) == pytest.approx(
        float(reference(state.params)), rel=1e-5)
