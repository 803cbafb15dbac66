"""Checkpointer: keep-latest + keep-best, corrupt checkpoints, model mismatch, load errors."""

import errno
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import file_mtimes, save_tiny_run

from flaxseg.train.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    CheckpointWriteError,
    load_for_inference,
)
from flaxseg.train.checksums import CHECKSUM_FILE, CorruptCheckpoint, file_crc32


def _state(value: float, shape=(3, 4)) -> dict:
    return {
        "params": {"conv": {"kernel": jnp.full(shape, value, jnp.float32)}},
        "batch_stats": {},
        "step": jnp.array(int(value), jnp.int32),
        "rng": jax.random.key(7),
    }


def _abstract(shape=(3, 4)) -> dict:
    return jax.eval_shape(lambda: _state(0.0, shape))


def _save_all(workdir, steps_metrics, keep=2):
    ckpt = Checkpointer(workdir, keep=keep)
    for step, miou in steps_metrics:
        ckpt.save(step, _state(step), loop={"data_iterator": {"pos": step}},
                  config=SAVED_CONFIG, metrics=None if miou is None else {"mean_iou": miou})
    ckpt.wait()
    return ckpt


def test_keeps_the_latest_and_the_best_never_deleting_the_newest(tmp_path):
    # The orbax pitfall: best_fn + max_to_keep would keep 2 and 3 and delete 5.
    ckpt = _save_all(tmp_path, [(1, 0.3), (2, 0.9), (3, 0.5), (4, 0.2), (5, None)], keep=2)
    assert ckpt.all_steps() == [2, 4, 5]
    restored = ckpt.restore(_abstract())
    ckpt.close()
    assert restored.step == 5
    np.testing.assert_array_equal(restored.state["params"]["conv"]["kernel"], np.full((3, 4), 5.0))
    assert restored.loop == {"data_iterator": {"pos": 5}}
    assert restored.config["model"] == {"name": "unet"}
    # The typed key survives the round trip (not as its raw uint32 data).
    assert jax.dtypes.issubdtype(restored.state["rng"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_data(restored.state["rng"]).tolist() == jax.random.key_data(
        jax.random.key(7)).tolist()


def test_arrays_replicated_over_devices_save_and_restore_exactly(tmp_path):
    # Over 4 devices orbax writes a small array whole from one replica and splits one of
    # REPLICA_PARALLEL_MIN_BYTES per replica over the replicas; both read back to the same
    # values, on the devices the target asks for.
    from jax.sharding import NamedSharding, PartitionSpec

    from flaxseg.train.checkpoint import REPLICA_PARALLEL_MIN_BYTES

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    replicated = NamedSharding(mesh, PartitionSpec())
    large = REPLICA_PARALLEL_MIN_BYTES  # float32 values: 4 MiB, 1 MiB per replica
    values = {"small": np.arange(12, dtype=np.float32).reshape(3, 4),
              "large": np.random.default_rng(0).normal(size=(large // 256, 256)).astype(
                  np.float32)}
    state = {"params": {k: jax.device_put(v, replicated) for k, v in values.items()},
             "batch_stats": {}, "step": jnp.array(3, jnp.int32), "rng": jax.random.key(7)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state, loop={}, config=SAVED_CONFIG)
    ckpt.wait()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    restored = ckpt.restore(abstract).state
    ckpt.close()
    for name, value in values.items():
        assert restored["params"][name].sharding == replicated
        np.testing.assert_array_equal(np.asarray(restored["params"][name]), value)


def test_restore_target_is_on_one_device_whatever_wrote_it(tmp_path):
    ckpt = _save_all(tmp_path, [(1, None)])
    restored = ckpt.restore(_abstract())
    ckpt.close()
    leaf = restored.state["params"]["conv"]["kernel"]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_corrupt_latest_checkpoint_warns_and_uses_the_previous(tmp_path):
    _save_all(tmp_path, [(1, None), (2, None)], keep=3).close()
    data_dir = tmp_path / "checkpoints" / "2" / "state"
    chunks = [p for p in data_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert chunks, "expected orbax data files to corrupt"
    for chunk in chunks:
        chunk.write_bytes(b"garbage")
    warnings = []
    ckpt = Checkpointer(tmp_path, keep=3)
    restored = ckpt.restore(_abstract(), on_corrupt=warnings.append)
    assert restored.step == 1
    assert len(warnings) == 1 and "step 2" in warnings[0] and "checkpoints_corrupt" in warnings[0]
    # Moved aside, so a resumed run can save step 2 again.
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
    ckpt.save(2, _state(2.0), loop={}, config={})
    ckpt.close()


def _flip_mid_file(step_dir) -> str:
    """Flips 4 bytes in the middle of the largest data file of `step_dir/state`."""
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    largest.write_bytes(bytes(data))
    return str(largest.relative_to(step_dir))


def test_checksums_are_written_and_a_flipped_file_falls_back_to_the_previous(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    big = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    for step in (1, 2):
        ckpt.save(step, {**_state(step), "params": {"conv": {"kernel": jnp.asarray(big)}}},
                  loop={}, config=SAVED_CONFIG)
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "2"
    listed = (step_dir / CHECKSUM_FILE).read_text().splitlines()
    digest, rel = listed[0].split("  ")
    assert digest == file_crc32(step_dir / rel)  # its CRC-32
    flipped = _flip_mid_file(step_dir)
    before = file_mtimes(tmp_path / "checkpoints" / "1")
    warnings = []
    ckpt = Checkpointer(tmp_path, keep=3)
    restored = ckpt.restore(_abstract((256, 256)), on_corrupt=warnings.append)
    ckpt.close()
    assert restored.step == 1 and np.array_equal(restored.state["params"]["conv"]["kernel"], big)
    assert len(warnings) == 1
    assert re.fullmatch(rf"Checkpoint step 2 in .* is unreadable \(CorruptCheckpoint: "
                        rf"checkpoint 2 is corrupt: {flipped} does not match its checksum "
                        rf"\({CHECKSUM_FILE} saved with it\)\); moved it to "
                        rf".*checkpoints_corrupt/2 and resumed from step 1\.", warnings[0])
    assert file_mtimes(tmp_path / "checkpoints" / "1") == before


def test_evaluate_and_predict_refuse_a_corrupt_checkpoint_in_one_line(tmp_path):
    from flaxseg import cli

    save_tiny_run(tmp_path, steps=(3, 6))
    flipped = _flip_mid_file(tmp_path / "checkpoints" / "6")
    before = file_mtimes(tmp_path)
    with pytest.raises(CorruptCheckpoint) as error:  # what evaluate / predict / export load
        load_for_inference(tmp_path)
    line, status = cli.describe(error.value)
    assert status == 2 and line == (
        f"{tmp_path / 'checkpoints'}: checkpoint 6 is corrupt: {flipped} does not match its "
        f"checksum ({CHECKSUM_FILE} saved with it); refusing it. Pass --step with another "
        "of the steps [3, 6], or train it again.")
    assert file_mtimes(tmp_path) == before  # nothing moved or written
    assert load_for_inference(tmp_path, step=3)[2].model.name == "unet"


def test_half_written_checkpoint_is_ignored(tmp_path):
    _save_all(tmp_path, [(1, None)]).close()
    # What a save killed mid-way leaves: a temporary directory that never got renamed.
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"x")
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1]
    assert ckpt.restore(_abstract()).step == 1
    ckpt.close()


SAVED_CONFIG = {"model": {"name": "unet"}, "dataset": {"num_classes": 2}}


@pytest.mark.parametrize("config, message", [
    ({"model": {"name": "fcn8s"}, "dataset": {"num_classes": 2}},
     r"config.model.name was 'unet' when step 1 was saved; this run asks for 'fcn8s'"),
    ({**SAVED_CONFIG, "optimizer": {"name": "sgd"}},
     r"config.optimizer was None when step 1 .*asks for \{'name': 'sgd'\}"),
    (SAVED_CONFIG,  # the same config, other shapes (the code of the model changed)
     r"parameter 'params/conv/kernel' has shape \(3, 4\) in step 1 and \(3, 5\)"),
])
def test_another_run_is_named_by_its_first_difference_and_nothing_is_written(
        tmp_path, config, message):
    _save_all(tmp_path, [(1, None)]).close()
    before = file_mtimes(tmp_path)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatch, match=message) as error:
        ckpt.restore(_abstract((3, 5)), config=config)
    ckpt.close()
    assert "init_from" in str(error.value) and "delete" not in str(error.value)
    assert file_mtimes(tmp_path) == before


def test_a_tuple_saved_as_a_json_list_is_the_same_run(tmp_path):
    _save_all(tmp_path, [(1, None)]).close()
    ckpt = Checkpointer(tmp_path)
    config = {"model": {"name": "unet", "widths": (4, 8)}, "dataset": {"num_classes": 2}}
    ckpt.save(2, _state(2.0), loop={}, config=config)
    ckpt.wait()
    assert ckpt.restore(_abstract(), config=config).step == 2  # tuple vs saved list: equal
    ckpt.close()


def test_missing_state_metadata_is_set_aside_not_called_another_model(tmp_path):
    _save_all(tmp_path, [(1, None), (2, None)], keep=3).close()
    (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    warnings = []
    ckpt = Checkpointer(tmp_path, keep=3)
    restored = ckpt.restore(_abstract(), config=SAVED_CONFIG, on_corrupt=warnings.append)
    ckpt.close()
    assert restored.step == 1
    assert len(warnings) == 1 and "step 2" in warnings[0] and "metadata" in warnings[0]
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()


def test_a_failed_write_names_the_intact_checkpoints_and_leaves_no_partial_save(
        tmp_path, monkeypatch):
    ckpt = _save_all(tmp_path, [(1, None), (2, None)], keep=3)

    def full_disk(*args, **kwargs):  # what tensorstore reports on a full disk (seen here)
        (ckpt.directory / "3.orbax-checkpoint-tmp").mkdir()
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 132490 bytes "
                         "to file 19: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt._manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device while saving "
                                                   r"checkpoint 3 in .*; checkpoints 1, 2 are "
                                                   r"intact\.$"):
        ckpt.save(3, _state(3.0), loop={}, config=SAVED_CONFIG)
    ckpt.close()  # the failure is reported once, not again on close
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["1", "2"]


def test_a_full_disk_in_the_background_save_names_its_step_in_one_line(
        tmp_path, monkeypatch, caplog):
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    ckpt = _save_all(tmp_path, [(1, None), (2, None)], keep=3)
    before = file_mtimes(tmp_path)
    real_commit = async_checkpointer._background_wait_for_commit_futures

    def commit(directory, futures, *args, **kwargs):  # the arrays written, then ENOSPC
        if not str(directory).endswith("/3"):
            return real_commit(directory, futures, *args, **kwargs)
        for f in futures:
            f.result()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", commit)
    ckpt.save(3, _state(3.0), loop={}, config=SAVED_CONFIG)  # fails in the background
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device while saving "
                                                   r"checkpoint 3 in .*; checkpoints 1, 2 are "
                                                   r"intact\.$"):
        ckpt.save(4, _state(4.0), loop={}, config=SAVED_CONFIG)  # orbax waits for 3 first
    ckpt.close()
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["1", "2"]  # no 3.*-tmp
    assert file_mtimes(tmp_path) == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no orbax traceback


def test_save_rejects_metrics_without_mean_iou(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="mean_iou"):
        ckpt.save(1, _state(1.0), loop={}, config={}, metrics={"loss": 0.1})
    ckpt.close()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path, keep=0)


def test_load_for_inference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_inference(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        load_for_inference(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="No finished checkpoint"):
        load_for_inference(tmp_path)
