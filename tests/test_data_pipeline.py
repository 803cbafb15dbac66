"""grain pipelines: determinism, per-epoch reshuffle, sharding, exact resume, eval padding."""

import json

import numpy as np
import pytest

from flaxseg.data import SourceInfo, augment_config, create_source, dataset_config
from flaxseg.data.pipeline import create_eval_iterator, create_train_iterator
from flaxseg.parallel import shard_batch

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
    return np.rint(batch["image"][:, 0, 0, 0] * 255).astype(int).tolist()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_batches_format_and_device_layout():
    source = create_source(dataset_config("synthetic", image_size=32), "train")
    iterator = create_train_iterator(
        source, batch_size=8, seed=0, augment=augment_config(), image_size=(24, 16)
    )
    batch = next(iterator)
    assert batch["image"].shape == (8, 24, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8, 24, 16) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, 255}
    sharded = shard_batch(batch, 4)
    assert sharded["image"].shape == (4, 2, 24, 16, 3)
    assert sharded["label"].shape == (4, 2, 24, 16)


def test_each_epoch_is_a_fresh_permutation():
    iterator = create_train_iterator(
        IndexSource(12), batch_size=4, seed=3, augment=None, image_size=SIZE
    )
    seen = [i for batch in take(iterator, 9) for i in indices(batch)]
    epochs = [seen[0:12], seen[12:24], seen[24:36]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


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


def test_shards_are_disjoint_and_cover_the_source():
    seen = []
    for shard in range(3):
        iterator = create_train_iterator(
            IndexSource(12),
            batch_size=2,
            seed=0,
            augment=None,
            image_size=SIZE,
            num_epochs=1,
            shard_index=shard,
            shard_count=3,
        )
        shard_seen = [i for batch in iterator for i in indices(batch)]
        assert len(shard_seen) == 4 and all(i % 3 == shard for i in shard_seen)
        seen += shard_seen
    assert sorted(seen) == list(range(12))


def test_num_epochs_stops_and_drops_the_remainder():
    iterator = create_train_iterator(
        IndexSource(10), batch_size=4, seed=0, augment=None, image_size=SIZE, num_epochs=2
    )
    assert len(list(iterator)) == 5


def test_worker_processes_yield_the_same_batches():
    source = create_source(dataset_config("synthetic", num_train=8, image_size=16), "train")
    kwargs = dict(batch_size=4, seed=2, augment=augment_config(), image_size=16)
    reference = take(create_train_iterator(source, **kwargs), 3)
    with create_train_iterator(source, worker_count=1, **kwargs) as iterator:
        batches = [{k: np.array(v) for k, v in b.items()} for b in take(iterator, 3)]
    for expected, got in zip(reference, batches, strict=True):
        np.testing.assert_array_equal(expected["image"], got["image"])


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_pass_is_padded_with_ignore_labels(shard_count):
    source = IndexSource(7)
    seen, batches_per_shard = [], []
    for shard in range(shard_count):
        iterator = create_eval_iterator(
            source, batch_size=3, image_size=SIZE, shard_index=shard, shard_count=shard_count
        )
        batches = list(iterator)
        assert len(batches) == len(iterator)
        batches_per_shard.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (3, SIZE, SIZE, 1)
            assert batch["label"].shape == (3, SIZE, SIZE) and batch["label"].dtype == np.int32
            for image, label in zip(batch["image"], batch["label"], strict=True):
                if np.all(label == 255):  # padding
                    assert np.all(image == 0)
                else:
                    index = int(np.rint(image[0, 0, 0] * 255))
                    assert np.all(label == index % 3)
                    seen.append(index)
    assert sorted(seen) == list(range(7))
    # Every process runs the same number of eval steps.
    assert len(set(batches_per_shard)) == 1
    assert batches_per_shard[0] == {1: 3, 2: 2}[shard_count]  # ceil(ceil(7 / count) / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
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


def test_source_smaller_than_process_count_errors():
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        create_eval_iterator(
            IndexSource(3), batch_size=2, image_size=SIZE, shard_index=0, shard_count=4
        )
