"""grain pipelines: determinism, per-epoch reshuffle, process rows, exact resume, eval padding."""

import json

import jax
import numpy as np
import pytest

from flaxseg.data import (
    SourceInfo,
    augment,
    augment_config,
    create_source,
    dataset_config,
    transforms,
)
from flaxseg.data.pipeline import (
    create_eval_iterator,
    create_train_iterator,
    epoch_permutation,
)

SIZE = 8


class IndexSource:
    """In-memory source whose example i is an image filled with i (so batches name themselves)."""

    def __init__(self, length, num_classes=3):
        self.length = length
        self.info = SourceInfo(num_classes, tuple("abc"[:num_classes]), 1)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        image = np.full((SIZE, SIZE, 1), i, np.uint8)
        label = np.full((SIZE, SIZE), i % self.info.num_classes, np.uint8)
        return {"image": image, "label": label}


def indices(batch):
    """The source indices of the examples in a batch built without augmentation."""
    return batch["image"][:, 0, 0, 0].astype(int).tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_format():
    # The host sends uint8 canvases of the images' size, and metadata.
    source = create_source(dataset_config("synthetic", image_size=32), "train")
    iterator = create_train_iterator(
        source, batch_size=8, seed=0, augment=augment_config(), image_size=(24, 16)
    )
    batch = next(iterator)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8, 32, 32) and batch["label"].dtype == np.uint8
    assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, 255}
    np.testing.assert_array_equal(batch["valid"], np.full((8, 2), 32))
    np.testing.assert_array_equal(batch["size"], np.full((8, 2), 32))
    assert batch["epoch"].dtype == batch["index"].dtype == np.int32
    assert sorted(batch["index"]) == sorted(set(batch["index"]))  # 8 distinct examples
    out = jax.jit(augment.train_fn(augment_config(), seed=0, image_size=(24, 16),
                                   ignore_index=255))(batch)
    assert out["image"].shape == (8, 24, 16, 3) and out["image"].dtype == np.float32
    assert out["label"].shape == (8, 24, 16) and out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) <= {0, 1, 2, 3, 255}


def test_larger_images_are_shrunk_onto_the_canvas():
    # A 40x20 image on a 16x16 canvas is shrunk to 16x8; smaller ones are padded.
    source = create_source(dataset_config("synthetic", image_size=(40, 20)), "train")
    batch = next(create_train_iterator(source, batch_size=2, seed=0,
                                       augment=augment_config(canvas_size=(16, 16)),
                                       image_size=8))
    assert batch["image"].shape == (2, 16, 16, 3)
    assert np.all(batch["label"][:, :, 8:] == 255) and np.all(batch["image"][:, :, 8:] == 0)
    np.testing.assert_array_equal(batch["valid"], [[16, 8]] * 2)
    np.testing.assert_array_equal(batch["size"], [[40, 20]] * 2)


def test_labels_travel_in_the_smallest_integer_type():
    assert transforms.label_dtype(21, 255) == np.uint8
    assert transforms.label_dtype(300, 255) == np.int16
    assert transforms.label_dtype(3, -1) == np.int16
    assert transforms.label_dtype(40000, 255) == np.int32


def test_each_epoch_is_a_fresh_permutation():
    iterator = create_train_iterator(
        IndexSource(12), batch_size=4, seed=3, augment=None, image_size=SIZE
    )
    seen = [i for batch in take(iterator, 9) for i in indices(batch)]
    epochs = [seen[0:12], seen[12:24], seen[24:36]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def _splitmix_order(seed, epoch, length):
    """`epoch_permutation` from its definition, in Python integers (mod 2**64)."""
    mask = 2**64 - 1

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    start = mix(mix(seed) ^ epoch)
    keys = [mix((start + i * 0x9E3779B97F4A7C15) & mask) for i in range(length)]
    return sorted(range(length), key=keys.__getitem__)


@pytest.mark.parametrize("seed, epoch, length", [(0, 0, 1), (3, 1, 12), (2**32 - 1, 7, 367)])
def test_epoch_permutation_is_its_definition(seed, epoch, length):
    """Exact integer arithmetic: the same order on every machine and NumPy version."""
    order = epoch_permutation(seed, epoch, length)
    assert order.tolist() == _splitmix_order(seed, epoch, length)
    assert sorted(order.tolist()) == list(range(length))


def test_epoch_permutations_look_uniform():
    """Where example 0 lands over 4000 epochs of 5: every slot about equally often (chi2
    with 4 degrees of freedom below its 0.1% tail, 18.5), and the epochs differ."""
    slots = np.bincount([int(np.argmax(epoch_permutation(1, e, 5) == 0)) for e in range(4000)],
                        minlength=5)
    chi2 = float(((slots - 800) ** 2 / 800).sum())
    assert chi2 < 18.5, slots
    assert len({tuple(epoch_permutation(1, e, 5)) for e in range(20)}) > 10


def test_same_seed_same_batches_other_seed_differs():
    source = create_source(dataset_config("synthetic", num_train=16, image_size=16), "train")
    kwargs = dict(batch_size=4, augment=augment_config(), image_size=16)
    a = take(create_train_iterator(source, seed=5, **kwargs), 6)
    b = take(create_train_iterator(source, seed=5, **kwargs), 6)
    c = take(create_train_iterator(source, seed=6, **kwargs), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize("stop_after", [1, 5])
def test_restored_state_resumes_exactly(stop_after):
    # 10 examples, batch 4: the resume point also crosses an epoch boundary.
    source = create_source(dataset_config("synthetic", num_train=10, image_size=16), "train")
    kwargs = dict(batch_size=4, seed=1, augment=augment_config(), image_size=16)
    uninterrupted = take(create_train_iterator(source, **kwargs), stop_after + 3)
    first = create_train_iterator(source, **kwargs)
    take(first, stop_after)
    state = json.loads(json.dumps(first.get_state()))  # what an orbax JsonSave round trip keeps
    resumed = create_train_iterator(source, **kwargs)
    resumed.set_state(state)
    for expected, got in zip(uninterrupted[stop_after:], take(resumed, 3), strict=True):
        np.testing.assert_array_equal(expected["image"], got["image"])
        np.testing.assert_array_equal(expected["label"], got["label"])


def test_state_from_another_pipeline_is_rejected():
    source = IndexSource(12)
    state = create_train_iterator(
        source, batch_size=4, seed=0, augment=None, image_size=SIZE
    ).get_state()
    other = create_train_iterator(source, batch_size=2, seed=0, augment=None, image_size=SIZE)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)
    with pytest.raises(ValueError, match="Not a flaxseg train-iterator state"):
        other.set_state({"next_index": 3})


def _process_batches(process_rows, steps=7, **kwargs):
    iterator = create_train_iterator(IndexSource(10), batch_size=6, seed=4, augment=None,
                                     image_size=SIZE, process_rows=process_rows, **kwargs)
    return [indices(b) for b in take(iterator, steps)]


def test_processes_load_their_rows_of_the_same_global_batches():
    # One process loading all 6 rows, or 3 processes loading 2 rows each: the same batches.
    whole = _process_batches(slice(0, 6))
    parts = [_process_batches(slice(2 * p, 2 * p + 2)) for p in range(3)]
    assert [sum((part[t] for part in parts), []) for t in range(7)] == whole
    assert _process_batches(None) == whole  # one process: all rows by default


def test_data_position_resumes_on_another_process_count():
    uninterrupted = _process_batches(slice(0, 6))
    one = create_train_iterator(IndexSource(10), batch_size=6, seed=4, augment=None,
                                image_size=SIZE)
    take(one, 3)
    state = json.loads(json.dumps(one.get_state()))
    resumed = []
    for p in range(2):  # the same position, read by two processes of 3 rows each
        iterator = create_train_iterator(IndexSource(10), batch_size=6, seed=4, augment=None,
                                         image_size=SIZE, process_rows=slice(3 * p, 3 * p + 3))
        iterator.set_state(state)
        resumed.append([indices(b) for b in take(iterator, 4)])
    assert [a + b for a, b in zip(*resumed, strict=True)] == uninterrupted[3:]


def test_num_epochs_stops_and_drops_the_remainder():
    iterator = create_train_iterator(
        IndexSource(10), batch_size=4, seed=0, augment=None, image_size=SIZE, num_epochs=2
    )
    assert len(list(iterator)) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_yield_the_same_batches(workers):
    # The host batch is all the device augmentation reads: equal host batches, equal
    # training batches (bitwise), whatever the worker count.
    source = create_source(dataset_config("synthetic", num_train=8, image_size=16), "train")
    kwargs = dict(batch_size=4, seed=2, augment=augment_config(), image_size=16)
    reference = take(create_train_iterator(source, **kwargs), 3)
    with create_train_iterator(source, worker_count=workers, **kwargs) as iterator:
        batches = [{k: np.array(v) for k, v in b.items()} for b in take(iterator, 3)]
    for expected, got in zip(reference, batches, strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])


@pytest.mark.parametrize("num_processes", [1, 2])
def test_eval_pass_is_padded_with_ignore_labels(num_processes):
    source = IndexSource(7)
    seen, batches_per_process = [], []
    for process in range(num_processes):
        rows = 4 // num_processes
        iterator = create_eval_iterator(
            source, batch_size=4, image_size=SIZE,
            process_rows=slice(process * rows, (process + 1) * rows))
        batches = list(iterator)
        assert len(batches) == len(iterator)
        batches_per_process.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (rows, SIZE, SIZE, 1)
            assert batch["image"].dtype == np.uint8
            assert batch["label"].shape == (rows, SIZE, SIZE) and batch["label"].dtype == np.uint8
            for image, label, valid in zip(batch["image"], batch["label"], batch["valid"],
                                           strict=True):
                if np.all(label == 255):  # padding
                    assert np.all(image == 0) and np.all(valid == 0)
                else:
                    index = int(image[0, 0, 0])
                    assert np.all(label == index % 3)
                    seen.append(index)
    assert sorted(seen) == list(range(7))  # every example exactly once
    # Every process runs the same number of eval steps: ceil(7 / 4).
    assert batches_per_process == [2] * num_processes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(process_rows=slice(1, 3, 2)), "contiguous"),
        (dict(process_rows=slice(2, 2)), "non-empty"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(batch_size=30, num_epochs=1), "cannot fill one batch"),
        (dict(augment=augment_config(scale_range=(2.0, 1.0))), "scale_range"),
    ],
)
def test_train_iterator_errors(kwargs, message):
    args = dict(batch_size=2, seed=0, augment=None, image_size=SIZE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        create_train_iterator(IndexSource(12), **args)


def test_data_workers_auto_shares_the_cores_between_the_hosts_processes(monkeypatch):
    from flaxseg.data import pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)),
                        raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pipeline.worker_count("auto") == 14
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pipeline.worker_count("auto") == 2
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert pipeline.worker_count("auto") == 0
    assert pipeline.worker_count(3) == 3
    for bad in (-1, "two", True, 1.5):
        with pytest.raises(ValueError, match="data_workers"):
            pipeline.worker_count(bad)
