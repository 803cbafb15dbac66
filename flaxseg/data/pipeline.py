"""grain input pipelines: seeded, sharded per process, checkpointable.

Both loaders yield per-process batches `{'image': float32 [B, H, W, C], 'label':
int32 [B, H, W]}`; lay them out per device with `flaxseg.parallel.shard_batch`.

Train: the process's shard (every `shard_count`-th example), reshuffled every
epoch, each example transformed with a generator seeded by (seed, epoch, global
index), batched with `drop_remainder` (a batch may span an epoch boundary). The
iterator's `get_state()` is a small JSON-serialisable dict; `set_state()` on a
fresh iterator built with the same arguments resumes exactly where it left off.

Eval: one deterministic pass in source order; every process yields the same
number of batches, and the last partial batch is padded with examples whose label
is `ignore_index` everywhere (zero images), so metrics stay exact and shapes static.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from flaxseg.data import transforms
from flaxseg.data.base import Source
from flaxseg.data.config import normalize_image_size

Batch = dict[str, np.ndarray]


def _check_common(
    source: Source,
    batch_size: int,
    shard_index: int | None,
    shard_count: int | None,
    augment: ml_collections.ConfigDict | None,
) -> tuple[int, int]:
    """Validates the arguments both iterators share; returns (shard_index, shard_count)."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"Need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
            f"shard_count={shard_count}."
        )
    if len(source) < shard_count:
        raise ValueError(
            f"The source has {len(source)} examples, fewer than the {shard_count} processes "
            "that share it; every process needs at least one example."
        )
    if augment is not None:
        transforms.validate_augment(augment, source.info.num_channels)
    return shard_index, shard_count


def _train_example(
    index: int,
    example: dict[str, np.ndarray],
    *,
    num_local: int,
    shard_index: int,
    shard_count: int,
    seed: int,
    image_size: tuple[int, int],
    augment: ml_collections.ConfigDict | None,
    ignore_index: int,
) -> dict[str, np.ndarray]:
    # After `shuffle().repeat()`, `index` is epoch * num_local + local position.
    epoch, local = divmod(index, num_local)
    global_index = shard_index + local * shard_count
    if augment is None:
        return transforms.eval_transform(
            example, image_size=image_size, augment=None, ignore_index=ignore_index
        )
    rng = transforms.example_rng(seed, epoch, global_index)
    return transforms.train_transform(
        example, rng, image_size=image_size, augment=augment, ignore_index=ignore_index
    )


class _ClosingIterator(Iterator[Batch]):
    """Wraps a grain iterator; `close()` (or `with`) stops its threads and worker processes."""

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)

    def __next__(self) -> Batch:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TrainIterator(_ClosingIterator):
    """An iterator of training batches with `get_state()` / `set_state()`."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict[str, Any]):
        super().__init__(dataset)
        self._fingerprint = fingerprint

    def get_state(self) -> dict[str, Any]:
        """The position as a JSON-serialisable dict (save it with `ocp.args.JsonSave`)."""
        return {"grain": self._iterator.get_state(), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes at `state`; raises ValueError if it came from a different pipeline."""
        if not isinstance(state, dict) or set(state) != {"grain", "pipeline"}:
            raise ValueError(
                "Not a flaxseg train-iterator state (expected keys 'grain' and 'pipeline'); "
                f"got {state!r:.200}."
            )
        if state["pipeline"] != self._fingerprint:
            diff = {
                k: (state["pipeline"].get(k), v)
                for k, v in self._fingerprint.items()
                if state["pipeline"].get(k) != v
            }
            raise ValueError(
                "The saved data-iterator state belongs to a different pipeline "
                f"(saved vs now: {diff}); resume with the same seed, batch size, source "
                "length and sharding, or start the data from scratch."
            )
        self._iterator.set_state(state["grain"])


def create_train_iterator(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    augment: ml_collections.ConfigDict | None,
    image_size: tuple[int, int] | int,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
) -> TrainIterator:
    """Builds the training loader over this process's shard of `source`.

    Args:
      source: a flaxseg source (`len`, `__getitem__`, `.info`).
      batch_size: examples per batch on this process (the global batch / process count).
      seed: drives the per-epoch shuffles and every example's transform.
      augment: an `augment_config()`, or None for no augmentation (eval-style resize/pad).
      image_size: (H, W) of the yielded images (the crop size).
      num_epochs: None repeats forever; otherwise the iterator stops after that many.
      worker_count: grain worker processes (0: threads in this process only).
      shard_index, shard_count: this process's shard; default `jax.process_index()` and
        `jax.process_count()`.
      num_threads, prefetch_buffer_size: grain read threads and prefetched elements.

    Returns:
      A `TrainIterator` of `{'image': float32 [B, H, W, C], 'label': int32 [B, H, W]}`.
    """
    shard_index, shard_count = _check_common(source, batch_size, shard_index, shard_count, augment)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    image_size = normalize_image_size(image_size)
    dataset = grain.MapDataset.source(source)[shard_index::shard_count]
    num_local = len(dataset)
    if num_epochs is not None and num_local * num_epochs < batch_size:
        raise ValueError(
            f"{num_epochs} epoch(s) of {num_local} examples cannot fill one batch of "
            f"{batch_size}; lower batch_size or raise num_epochs."
        )
    transform = functools.partial(
        _train_example,
        num_local=num_local,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=seed,
        image_size=image_size,
        augment=augment,
        ignore_index=source.info.ignore_index,
    )
    dataset = (
        dataset.map_with_index(transform)
        .shuffle(seed=seed)
        .repeat(num_epochs)
        .batch(batch_size, drop_remainder=True)
    )
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        # grain's workers read absl flags; outside an absl app nothing has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
        )
    fingerprint = {
        "seed": int(seed),
        "batch_size": int(batch_size),
        "source_len": len(source),
        "shard_index": int(shard_index),
        "shard_count": int(shard_count),
        "worker_count": int(worker_count),
    }
    return TrainIterator(iter_dataset, fingerprint)


class EvalIterator(_ClosingIterator):
    """One pass of padded eval batches; `len()` is the number of batches."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int):
        super().__init__(dataset)
        self._num_batches = num_batches

    def __len__(self) -> int:
        return self._num_batches


def _eval_example(
    position: int,
    *,
    source: Source,
    num_local: int,
    shard_index: int,
    shard_count: int,
    image_size: tuple[int, int],
    augment: ml_collections.ConfigDict | None,
) -> dict[str, np.ndarray]:
    ignore_index = source.info.ignore_index
    if position >= num_local:  # padding: contributes nothing to any metric
        return {
            "image": np.zeros((*image_size, source.info.num_channels), np.float32),
            "label": np.full(image_size, ignore_index, np.int32),
        }
    example = source[shard_index + position * shard_count]
    return transforms.eval_transform(
        example, image_size=image_size, augment=augment, ignore_index=ignore_index
    )


def create_eval_iterator(
    source: Source,
    *,
    batch_size: int,
    image_size: tuple[int, int] | int,
    augment: ml_collections.ConfigDict | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
) -> EvalIterator:
    """One deterministic pass over this process's shard of `source`.

    Images reach `image_size` by `augment.eval_resize` ('pad' unless set) and get the
    same normalisation as training (`augment.normalize`); no random transforms.
    Every process yields `ceil(ceil(len(source) / shard_count) / batch_size)` batches;
    padding examples have zero images and labels equal to `ignore_index`.

    Returns:
      An `EvalIterator` of `{'image': float32 [B, H, W, C], 'label': int32 [B, H, W]}`.
    """
    shard_index, shard_count = _check_common(source, batch_size, shard_index, shard_count, augment)
    image_size = normalize_image_size(image_size)
    num_local = len(range(shard_index, len(source), shard_count))
    num_batches = math.ceil(math.ceil(len(source) / shard_count) / batch_size)
    example_fn = functools.partial(
        _eval_example,
        source=source,
        num_local=num_local,
        shard_index=shard_index,
        shard_count=shard_count,
        image_size=image_size,
        augment=augment,
    )
    dataset = grain.MapDataset.range(num_batches * batch_size).map(example_fn).batch(batch_size)
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    return EvalIterator(dataset.to_iter_dataset(read_options), num_batches)
