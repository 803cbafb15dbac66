"""Checkpoints of a training run: an orbax `CheckpointManager` over `<workdir>/checkpoints`.

Each checkpoint (one directory per step) holds three items:
  state   the `TrainState` (params, batch_stats, opt_state, step, rng) as global arrays;
  loop    JSON: the data iterator's position, the host-side metric sums of the unfinished
          log interval, the input shape; none of it depends on the topology;
  config  JSON: the config the run used (so a checkpoint is self-describing).

Kept: the `keep` latest checkpoints and, in addition, the best one by validation mIoU
(orbax preservation policies; `best_fn` with `max_to_keep` alone could delete the newest).
Saves are asynchronous; call `wait()` before reading them back and `close()` at the end.

Several processes: every process creates the `Checkpointer` and takes part in every save
and restore (orbax writes each array once and the JSON items from process 0). Restoring
never depends on the topology that wrote a checkpoint: the restore target carries the
shardings wanted now (`DataParallel.abstract`, or one local device by default), so a
checkpoint of 2 processes x 2 devices restores onto 1 process x 4 devices, 1 device, or
the reverse. Once a save is on disk, a background thread writes the CRC-32 of each of
its files beside them (`flaxseg.train.checksums`); restore verifies them. A checkpoint that
cannot be read (corrupt, truncated, a checksum mismatch) is moved to
`<workdir>/checkpoints_corrupt/` with a warning, and the previous good one is used.

`init_from` copies the parameters a related run shares with a new model (FCN-16s from
FCN-32s), and `load_for_inference` rebuilds a trained model for evaluation and prediction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store

from flaxseg.cli import TRACEBACK_ENV
from flaxseg.train import checksums
from flaxseg.train.checksums import CorruptCheckpoint

PyTree = Any

STATE, LOOP, CONFIG = "state", "loop", "config"
BEST_METRIC = "mean_iou"

_log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    """Where a workdir's checkpoints live: `<workdir>/checkpoints` (absolute)."""
    return Path(workdir).absolute() / "checkpoints"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree: PyTree, sections: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """`{'params/Conv_0/kernel': shape}` for the leaves under `sections`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        names = [_key_name(k) for k in path]
        if names and names[0] in sections:
            out["/".join(names)] = tuple(leaf.shape)
    return out


# What a resumed run must share with the run that wrote the checkpoint (dotted config
# paths; a section name covers all its keys). Other keys (num_train_steps, the parallel
# mode, dtype, logging intervals) may change between runs.
RUN_IDENTITY = ("model", "dataset.num_classes", "optimizer", "seed", "batch_size")


class CheckpointMismatch(ValueError):
    """The workdir's checkpoints belong to another model, optimiser or data order."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (its message names the intact ones)."""


# Phrases of orbax / tensorstore I/O errors -> the reason a user reads.
_IO_REASONS = (("No space left", "no space left on device"),
               ("Disk quota exceeded", "disk quota exceeded"),
               ("Permission denied", "permission denied"),
               ("Read-only file system", "read-only file system"))


class _BackgroundSaveErrors(logging.Filter):
    """Drops orbax's logged tracebacks of a failed background save (about 380 lines on a
    full disk): `Checkpointer` reports that failure as one line naming its step. Kept with
    FLAXSEG_TRACEBACK=1."""

    PHRASES = ("in background save thread", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            return True
        return not (record.levelno >= logging.ERROR
                    and any(p in str(record.msg) for p in self.PHRASES))


_ORBAX_LOGGER = logging.getLogger("absl")  # orbax logs through absl.logging
if not any(isinstance(f, _BackgroundSaveErrors) for f in _ORBAX_LOGGER.filters):
    _ORBAX_LOGGER.addFilter(_BackgroundSaveErrors())


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint whose files are incomplete (e.g. its state metadata is missing)."""


def _as_json(config: dict | ml_collections.ConfigDict) -> dict:
    """The config as it reads back from a checkpoint: tuples become lists, keys strings."""
    config = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(config))


def _first_difference(saved: dict, new: dict, prefix: str = "config") -> tuple | None:
    """(dotted key, saved value, new value) of the first difference, or None."""
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return None if saved == new else (prefix, saved, new)
    for key in sorted(set(saved) | set(new)):
        found = _first_difference(saved.get(key), new.get(key), f"{prefix}.{key}")
        if found:
            return found
    return None


def _identity(config: dict) -> dict:
    picked: dict = {}
    for path in RUN_IDENTITY:
        value: Any = config
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        picked[path] = value
    return picked


def _placed(tree: PyTree) -> PyTree:
    """`tree` with every leaf's restore sharding set: kept where `tree` has one (e.g.
    `DataParallel.abstract`), else the first local device."""
    device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or device),
        tree)


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step, the state (placed as asked), loop JSON and config."""

    step: int
    state: PyTree
    loop: dict
    config: dict


# Below this many bytes per replica, an array replicated over devices is written whole by
# one replica. Orbax's default (replica-parallel saving, where every replica writes a
# slice) compiles one slicing program per device and array shape: ~50 of them, 0.8 s, for
# the first save of a tiny U-Net on 4 devices, more than the write they would share.
# Large arrays (a VGG's 400 MB fc6) are still split over the replicas.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The state item's handler: orbax's pytree handler (what `StandardCheckpointHandler`
    wraps; the same files) with jax.Array's handler as orbax's default but for
    `REPLICA_PARALLEL_MIN_BYTES`."""
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        # Orbax's default handler keeps this store (orbax 0.12 has no public name for it):
        # without it a typed PRNG key (the state's rng) restores as its raw uint32 data.
        array_metadata_store=array_metadata_store.Store())
    handlers = ocp.type_handlers
    return ocp.PyTreeCheckpointHandler(type_handler_registry=handlers.create_type_handler_registry(
        (jax.Array, arrays),
        *((kind, handlers.get_type_handler(kind))
          for kind in handlers.supported_types() if kind is not jax.Array)))


def state_restore_args(abstract_state: PyTree) -> ocp.args.PyTreeRestore:
    """The restore args of the state item: every leaf placed as `_placed` says."""
    placed = _placed(abstract_state)
    return ocp.args.PyTreeRestore(
        placed, restore_args=ocp.checkpoint_utils.construct_restore_args(placed))


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Each item's save and restore args -> its handler (orbax's replacement for the
    deprecated `item_handlers`): the state as arrays, the loop and the config as JSON."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, save, restore, handler in (
            (STATE, ocp.args.PyTreeSave, ocp.args.PyTreeRestore, _state_handler()),
            (LOOP, ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler()),
            (CONFIG, ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())):
        for args in (save, restore):  # one handler saves and restores its item
            registry.add(item, args, handler)
    return registry


class Checkpointer:
    """The checkpoints of one workdir.

    Args:
      workdir: the run's directory; checkpoints go to `<workdir>/checkpoints`.
      keep: how many of the latest checkpoints to keep (>= 1); the best by `mean_iou`
        is kept in addition.
      async_save: write in a background thread (the train loop goes on meanwhile).
      read_only: open existing checkpoints without creating or deleting anything.
    """

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the latest checkpoint is always kept), "
                             f"got {keep}.")
        self.workdir = Path(workdir).absolute()
        self.directory = checkpoint_dir(workdir)
        self._pending: int | None = None  # the step of the last save started
        self._unhashed: int | None = None  # a save whose checksums are not scheduled yet
        self._hashing = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="flaxseg-checksums")
        self._hash_jobs: list[concurrent.futures.Future] = []
        self._failed = False
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC], reverse=False, n=1,
                keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=None if read_only else policy,
            # A save killed half-way leaves a temporary directory; remove it on start.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # orbax warns unless set so
        )
        self._manager = ocp.CheckpointManager(
            self.directory, handler_registry=_handler_registry(), options=options)

    # -- queries ------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_config(self, step: int) -> dict:
        """The config saved with checkpoint `step` (as a plain dict)."""
        return self._manager.restore(step, args=ocp.args.Composite(
            **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def saved_loop(self, step: int) -> dict:
        """The loop JSON (data iterator state, accumulator, input shape) of `step`."""
        return self._manager.restore(step, args=ocp.args.Composite(
            **{LOOP: ocp.args.JsonRestore()}))[LOOP]

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, *, loop: dict,
             config: ml_collections.ConfigDict | dict,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an (asynchronous) save of checkpoint `step`.

        `state` holds global arrays (every process calls `save` with the same step);
        `loop` must be JSON-serialisable and the same in every process; `metrics`, if
        given, must hold `mean_iou` and ranks the checkpoint for the keep-best policy.
        """
        if metrics is not None and BEST_METRIC not in metrics:
            raise ValueError(f"metrics must contain {BEST_METRIC!r}; got keys {sorted(metrics)}.")
        config_json = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
        # orbax's save first waits for the previous one: its failure is that step's.
        with self._writing(self._pending):
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        self._schedule_checksums()
        with self._writing(step):
            saved = self._manager.save(
                int(step),
                args=ocp.args.Composite(**{
                    STATE: ocp.args.PyTreeSave(state),
                    LOOP: ocp.args.JsonSave(loop),
                    CONFIG: ocp.args.JsonSave(config_json),
                }),
                metrics=None if metrics is None else {BEST_METRIC: float(metrics[BEST_METRIC])},
                force=True,
            )
        if not saved:
            raise RuntimeError(
                f"orbax did not save step {step} in {self.directory}: a checkpoint of that "
                "step already exists there.")
        self._pending = self._unhashed = int(step)

    def _schedule_checksums(self) -> None:
        """Hands the finished save's checksums to the background thread (process 0)."""
        if self._unhashed is not None and jax.process_index() == 0:
            self._hash_jobs = [job for job in self._hash_jobs if not job.done()
                               or job.exception()]
            self._hash_jobs.append(self._hashing.submit(
                checksums.write, self.directory / str(self._unhashed)))
        self._unhashed = None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk with their checksums;
        raises CheckpointWriteError if one failed."""
        with self._writing(self._pending):
            self._manager.wait_until_finished()
            self._schedule_checksums()
            for job in self._hash_jobs:
                job.result()

    def close(self) -> None:
        try:
            if not self._failed:  # a failed save has been reported: do not report it again
                self.wait()
        finally:
            self._hashing.shutdown(wait=True)
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self._manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns a failed write (a full disk, lost permissions) into one CheckpointWriteError
        naming the checkpoints that are intact, and removes what the failed save left."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:  # orbax/tensorstore report I/O failures as many types
            self._failed = True
            text = " ".join(str(e).split())
            reason = next((r for key, r in _IO_REASONS if key in text), text[:300])
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                if jax.process_index() == 0:
                    shutil.rmtree(partial, ignore_errors=True)
            intact = [s for s in self.all_steps() if s != step]
            raise CheckpointWriteError(
                f"{reason} while saving checkpoint {step} in {self.directory}; "
                + (f"checkpoints {', '.join(map(str, intact))} are intact." if intact
                   else "no earlier checkpoint exists.")) from e

    # -- restore ------------------------------------------------------------------------
    def check_compatible(self, step: int, abstract_state: PyTree,
                         config: ml_collections.ConfigDict | dict) -> None:
        """Raises CheckpointMismatch if checkpoint `step` belongs to another run.

        First the saved config against `config` on `RUN_IDENTITY` (the model section,
        `dataset.num_classes`, the optimizer section, seed, batch size), naming the first
        key that differs; then every `params` / `batch_stats` shape in the checkpoint's
        metadata against `abstract_state`. Raises UnreadableCheckpoint when the metadata is
        missing. Reads only metadata and config: nothing is written.
        """
        difference = _first_difference(_identity(_as_json(self.saved_config(step))),
                                       _identity(_as_json(config)), prefix="")
        if difference:
            key, saved, new = difference
            self._mismatch(f"config.{key.lstrip('.')} was {saved!r} when step {step} was "
                           f"saved; this run asks for {new!r}")
        saved_tree = self._manager.item_metadata(step)[STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        sections = ("params", "batch_stats")
        saved = _shapes(saved_tree, sections) if saved_tree is not None else {}
        if not saved:
            raise UnreadableCheckpoint(f"the state metadata of step {step} is missing or empty")
        wanted = _shapes(abstract_state, sections)
        if saved == wanted:
            return
        diff = sorted(set(saved) ^ set(wanted))
        if diff:
            name = diff[0]
            self._mismatch(f"parameter {name!r} exists only in the "
                           f"{'checkpoint' if name in saved else 'new model'}")
        name = next(k for k in sorted(saved) if saved[k] != wanted[k])
        self._mismatch(f"parameter {name!r} has shape {saved[name]} in step {step} and "
                       f"{wanted[name]} in this run's model")

    def _mismatch(self, detail: str) -> None:
        raise CheckpointMismatch(
            f"The workdir {self.workdir} holds another run: {detail}. Nothing was written. "
            "Use a new --workdir, or start a new run from its weights with "
            f"--config.init_from={self.workdir}.")

    def restore(self, abstract_state: PyTree, *, step: int | None = None,
                config: ml_collections.ConfigDict | dict | None = None,
                on_corrupt: Callable[[str], None] | None = None) -> Restored | None:
        """Restores checkpoint `step` (default: the latest readable one).

        `abstract_state` is the state's structure (`jax.eval_shape` of its creation); leaves
        with a `sharding` are restored with it (`DataParallel.abstract` for the loop), the
        others onto the first local device. The writer's topology does not matter.
        Returns None when there are no checkpoints. With `step=None`, a checkpoint that
        cannot be read is reported through `on_corrupt` (default: a logged warning),
        moved to `<workdir>/checkpoints_corrupt/`, and the previous one is tried; another
        run's checkpoint raises CheckpointMismatch (see `check_compatible`) and moves
        nothing.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(f"No checkpoint of step {step} in {self.directory}; "
                                 f"available steps: {steps}.")
            return self._restore_step(step, abstract_state, config)
        warn = on_corrupt or _log.warning
        failures = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, abstract_state, config)
            except CheckpointMismatch:
                raise
            except Exception as e:  # orbax/tensorstore raise many types
                failures.append((candidate, e))
            else:
                for bad, error in failures:
                    moved = self._quarantine(bad)
                    warn(f"Checkpoint step {bad} in {self.directory} is unreadable "
                         f"({type(error).__name__}: {str(error)[:200]}); moved it to {moved} "
                         f"and resumed from step {candidate}.")
                return restored
        if failures:
            raise ValueError(
                f"No checkpoint in {self.directory} could be restored (tried steps "
                f"{[s for s, _ in failures]}; last error: {failures[-1][1]}). Pass a new "
                "--workdir, or delete that directory to start over there.")
        return None

    def _restore_step(self, step: int, abstract_state: PyTree,
                      config: ml_collections.ConfigDict | dict | None) -> Restored:
        if config is not None:
            self.check_compatible(step, abstract_state, config)
        with checksums.verified(self.directory / str(step)):  # overlaps the read
            out = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE: state_restore_args(abstract_state),
                LOOP: ocp.args.JsonRestore(),
                CONFIG: ocp.args.JsonRestore(),
            }))
        return Restored(step=step, state=out[STATE], loop=out[LOOP], config=out[CONFIG])

    def _quarantine(self, step: int) -> Path:
        """Moves checkpoint `step` aside (process 0 moves it; every process waits)."""
        target_root = self.workdir / "checkpoints_corrupt"
        target = target_root / str(step)
        suffix = 0
        while target.exists():
            suffix += 1
            target = target_root / f"{step}.{suffix}"
        if jax.process_index() == 0:
            target_root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flaxseg quarantine {step}")
        self._manager.reload()
        return target


def _copy_matching(target: PyTree, source: PyTree) -> tuple[PyTree, int, list[str]]:
    """`target` with every leaf that `source` has at the same path and shape copied in."""
    source_leaves = {jax.tree_util.keystr(path): leaf
                     for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]}
    copied, fresh = 0, []

    def pick(path, leaf):
        nonlocal copied
        name = jax.tree_util.keystr(path)
        other = source_leaves.get(name)
        if other is not None and other.shape == leaf.shape:
            copied += 1
            return other.astype(leaf.dtype)
        fresh.append(name)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, target), copied, fresh


def init_from(state: PyTree, workdir: str | os.PathLike, *, model_name: str | None = None,
              trust_saved_code: bool = False) -> tuple[PyTree, str]:
    """`state` with the parameters (and BatchNorm statistics) that `workdir`'s latest
    checkpoint shares with it by name and shape: FCN-16s from FCN-32s, FCN-8s from
    FCN-16s. The optimiser state starts fresh. Returns the state and a line saying what
    was copied; raises ValueError if nothing matches.

    Every leaf of `state` must be placed the same way (e.g. replicated by
    `DataParallel.put_state`); the source is restored onto that placement. The source's
    model is built only as `load_for_inference` allows (`model_name`: the new run's).
    """
    placement = jax.tree.leaves(state.params)[0].sharding
    _, variables, other_config = load_for_inference(
        workdir, sharding=placement, model_name=model_name, trust_saved_code=trust_saved_code,
        name_flag="--config.model.name")
    params, copied, fresh = _copy_matching(state.params, variables["params"])
    if copied == 0:
        raise ValueError(
            f"config.init_from={str(workdir)!r} (model {other_config.model.name!r}) shares no "
            "parameter of the same name and shape with this model; point it at a run of a "
            "related model (e.g. fcn32s for fcn16s).")
    batch_stats = state.batch_stats
    if variables.get("batch_stats") and jax.tree.leaves(state.batch_stats):
        batch_stats, _, _ = _copy_matching(state.batch_stats, variables["batch_stats"])
    message = (f"Initialised {copied} parameter arrays from {workdir} (model "
               f"{other_config.model.name!r}); {len(fresh)} new: {', '.join(fresh) or 'none'}.")
    return state.replace(params=params, batch_stats=batch_stats,
                         opt_state=state.tx.init(params)), message


def load_for_inference(workdir: str | os.PathLike, step: int | None = None, *,
                       sharding: jax.sharding.Sharding | None = None,
                       model_name: str | None = None, trust_saved_code: bool = False,
                       name_flag: str = "--model"
                       ) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """Loads a trained model from a workdir: `(model, variables, config)`.

    The model is built from the config saved with the checkpoint; `variables` is
    `{'params': ..., 'batch_stats': ...}` (no `batch_stats` when the model has none),
    ready for `model.apply(variables, images, train=False)` with images float32
    `[B, H, W, C]`. The arrays land on the first local device, or on `sharding` (under
    several processes, a sharding over all of them: every process must call this).
    `step=None` takes the latest readable checkpoint. Raises FileNotFoundError for a
    missing workdir or one without checkpoints.

    The saved config is data: a `package.module:Attr` model it names is imported only when
    `model_name` names the same model or `trust_saved_code` is set; otherwise
    `flaxseg.models.registry.UntrustedCode` (a ValueError) says what it asks to import
    and how to allow it (`name_flag`: the flag that names a model).
    """
    from flaxseg.models.registry import check_saved_model
    from flaxseg.train.config import build_model, restored_config
    from flaxseg.train.workdir import refuse_file

    workdir = Path(workdir)
    refuse_file(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"Workdir {workdir} does not exist; pass the --workdir of a "
                                "training run (python -m flaxseg.train --workdir=...).")
    if not checkpoint_dir(workdir).is_dir():
        raise FileNotFoundError(f"Workdir {workdir} has no checkpoints/ directory; train "
                                "into it first (python -m flaxseg.train --workdir=...).")
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"No finished checkpoint in {ckpt.directory}; train "
                                    "longer or point --workdir at another run.")
        if step is not None and step not in steps:
            raise ValueError(f"No checkpoint of step {step} in {ckpt.directory}; "
                             f"available steps: {steps}.")
        candidates = [step] if step is not None else list(reversed(steps))
        errors = []
        for candidate in candidates:
            try:
                config = restored_config(ckpt.saved_config(candidate))
                check_saved_model(config.model.name, named=model_name,
                                  trusted=trust_saved_code, name_flag=name_flag,
                                  source=f"The run in {workdir} (step {candidate})")
                model = build_model(config)
                abstract = abstract_state_for(model, config,
                                              ckpt.saved_loop(candidate)["input_shape"])
                if sharding is not None:
                    abstract = jax.tree.map(
                        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract)
                restored = ckpt.restore(abstract, step=candidate)
            except CorruptCheckpoint as e:  # never a model from damaged arrays
                raise CorruptCheckpoint(
                    f"{ckpt.directory}: {e}; refusing it. Pass --step with another of the "
                    f"steps {steps}, or train it again.") from None
            except (ValueError, TypeError):
                raise
            except Exception as e:  # unreadable checkpoint: try the previous
                errors.append((candidate, e))
                _log.warning("Checkpoint step %d in %s is unreadable (%s); trying the "
                             "previous one.", candidate, ckpt.directory, e)
                continue
            variables = {"params": restored.state.params}
            if restored.state.batch_stats:
                variables["batch_stats"] = restored.state.batch_stats
            return model, variables, config
        raise RuntimeError(f"No checkpoint in {ckpt.directory} could be read: {errors}.")
    finally:
        ckpt.close()


def abstract_state_for(model: Any, config: ml_collections.ConfigDict,
                       input_shape: tuple[int, ...] | list[int]) -> PyTree:
    """The `TrainState` structure (ShapeDtypeStructs) of `model` trained with `config`,
    for input `input_shape` `[1, H, W, C]`: a restore target; nothing is computed."""
    from flaxseg.optim import create_optimizer
    from flaxseg.train.state import abstract_train_state

    tx = create_optimizer(config.optimizer, int(config.num_train_steps))
    return abstract_train_state(model, tx, tuple(int(d) for d in input_shape))
