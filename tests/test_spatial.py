"""One image split over several devices: `spatial_partitions` on 4 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flaxseg import configs, inference, losses
from flaxseg.models import UNet
from flaxseg.train import DataParallel, create_optimizer, create_train_state, make_train_step
from flaxseg.train.config import validate_config
from flaxseg.train.loop import train_and_evaluate
from flaxseg.train.parallel import SPACE_AXIS
from flaxseg.train.reporting import read_metrics

MODEL = UNet(num_classes=3, features=4, depth=2, norm="batch", dropout_rate=0.0)
SGD = create_optimizer({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}, 10)


def _batches(steps: int, size: int = 32, dtype=np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"image": rng.random((4, size, size, 1)).astype(dtype),
             "label": rng.integers(0, 3, (4, size, size)).astype(np.int32)}
            for _ in range(steps)]


def _train(spatial_partitions: int, batches, model: UNet = MODEL) -> tuple:
    par = DataParallel("mesh", spatial_partitions=spatial_partitions)
    state = par.put_state(create_train_state(model, SGD, jax.random.key(0), (1, 32, 32, 1)))
    step = make_train_step(model, losses.get_loss_fn("cross_entropy"), 3, parallel=par)
    loss = []
    for batch in batches:
        state, metrics = step(state, par.put_batch(batch))
        loss.append(float(metrics["loss_sum"] / metrics["weight_sum"]))
        assert state.params["encoder_0"]["conv1"]["kernel"].sharding.is_fully_replicated
    return jax.device_get(state.params), loss


def test_split_images_train_like_whole_ones(num_devices):
    """5 SGD steps of a BatchNorm U-Net on the same batches: each image on one device (the
    batch over 4), split over 2 devices, and split over 4 devices.

    In float64, as tests/test_train_core.py's four-devices test explains: in float32 a
    pre-activation within rounding of a ReLU kink can flip its gate between the layouts,
    and that CPU-dependent jump has no tolerance. Measured here (images of 16x16): params
    equal to 4.4e-16 of the largest (the layouts reduce in nearly the same order); 1e-7 as
    there.
    """
    with jax.enable_x64(True):
        model = MODEL.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        batches = _batches(5, size=16, dtype=np.float64)  # float64 convolutions are slow
        params, loss = _train(1, batches, model)
        for spatial in (2, 4):
            other, other_loss = _train(spatial, batches, model)
            np.testing.assert_allclose(other_loss, loss, rtol=1e-5)  # summed in float32
            diff = max(float(np.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(other), jax.tree.leaves(params), strict=True))
            rel = diff / max(float(np.abs(b).max()) for b in jax.tree.leaves(params))
            print(f"{spatial} partitions: params differ by {rel:.1e} of the largest")
            assert rel < 1e-7


def test_a_large_image_in_one_pass_equals_the_unsplit_logits():
    model = UNet(num_classes=3, features=4, depth=3, norm="batch")
    image = np.random.default_rng(1).random((512, 768, 3), np.float32)
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), image[None, :64, :64], train=False)
    whole = inference.predict_logits(model, variables, image)
    par = DataParallel("mesh", spatial_partitions=4)
    split = NamedSharding(par.mesh, PartitionSpec(None, SPACE_AXIS))
    np.testing.assert_array_equal(
        inference.predict_logits(model, par.put_state(variables), image, sharding=split), whole)
    # 'pad' pads the rows to a multiple of the devices too: 509 -> 512.
    np.testing.assert_array_equal(
        inference.predict_logits(model, par.put_state(variables), image[:509], mode="pad",
                                 sharding=split),
        inference.predict_logits(model, variables, image[:509], mode="pad"))
    with pytest.raises(ValueError, match="mode 'sliding' predicts tiles"):
        inference.predict_logits(model, variables, image, mode="sliding", tile_size=64,
                                 sharding=split)


def test_the_training_program_splits_images(tmp_path, capsys):
    config = configs.get_config("test")
    config.update_from_flattened_dict({"num_train_steps": 2, "spatial_partitions": 2})
    summary = train_and_evaluate(config, str(tmp_path))
    assert "over 4 device(s), each image split over 2 (mesh)" in capsys.readouterr().out
    assert summary["steps"] == 2 and [r["step"] for r in read_metrics(tmp_path)
                                      if r["split"] == "train"] == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    ({"spatial_partitions": 3}, r"must divide the 4 devices of each process .*; use one "
                                r"of \[1, 2, 4\]"),
    ({"spatial_partitions": 2, "parallel": "pmap"}, "needs parallel='mesh', not 'pmap'"),
    ({"spatial_partitions": 4, "dataset.image_size": (30, 32)},
     r"height 30 cannot be split over spatial_partitions=4 .*e.g. 28, 32"),
    ({"spatial_partitions": 2, "batch_size": 3}, r"Batch size 3 cannot be split evenly over 2"),
    ({"spatial_partitions": 0}, "must be a positive integer"),
])
def test_bad_partitions_are_refused_before_compiling(overrides, message):
    config = configs.get_config("test")
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=message):
        validate_config(config)
