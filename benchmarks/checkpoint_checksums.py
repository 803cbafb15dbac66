"""What checkpoint checksums cost: save and restore of a U-Net-64 train state, with and
without them.

    python -m benchmarks.checkpoint_checksums [--features=64] [--repeats=3]

The state is the paper U-Net's (features 64, depth 4, 1 channel, 2 classes: 31.0 M params)
with Adam's moments, about 372 MB. Per repeat, median over repeats:
  save_call_s      the training thread's `Checkpointer.save` call (the write is async);
  save_total_s     save + `wait()`: the files on disk and their checksums written;
  checksum_s       `checksums.write` alone on that checkpoint (the background thread's work);
  restore_plain_s  orbax's restore without verification;
  restore_s        `Checkpointer.restore`: the same with the checksums verified alongside;
  verify_s         `checksums.first_mismatch` alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp

from flaxseg.models import create_model
from flaxseg.optim import create_optimizer
from flaxseg.run_config import optimizer_config
from flaxseg.train import checkpoint, checksums
from flaxseg.train.state import abstract_train_state, create_train_state


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _one_repeat(state, abstract, step: int) -> dict[str, float]:
    """The quantities of the module docstring for one save and restore of `state`."""
    out = {}
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoint.Checkpointer(workdir, keep=1)
        start = time.perf_counter()
        ckpt.save(step, state, loop={}, config={})
        out["save_call_s"] = time.perf_counter() - start
        ckpt.wait()
        out["save_total_s"] = time.perf_counter() - start
        step_dir = ckpt.directory / str(step)
        out["checksum_s"] = _timed(lambda: checksums.write(step_dir))[0]
        # the read the Checkpointer does, unverified
        args = ocp.args.Composite(state=checkpoint.state_restore_args(abstract))
        out["restore_plain_s"] = _timed(lambda: jax.block_until_ready(
            ckpt._manager.restore(step, args=args)["state"]))[0]
        out["restore_s"] = _timed(lambda: jax.block_until_ready(
            ckpt.restore(abstract, step=step).state))[0]
        out["verify_s"] = _timed(lambda: checksums.first_mismatch(step_dir))[0]
        ckpt.close()
    return out


def measure(features: int, repeats: int) -> dict[str, float]:
    """Median seconds of each quantity of the module docstring over `repeats` runs."""
    model = create_model("unet", num_classes=2, features=features, depth=4, norm=None)
    tx = create_optimizer(optimizer_config(name="adam", learning_rate=1e-3), 10)
    shape = (1, 64, 64, 1)
    state = create_train_state(model, tx, jax.random.key(0), shape)
    abstract = abstract_train_state(model, tx, shape)
    runs = [_one_repeat(state, abstract, step) for step in range(1, repeats + 1)]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.features, args.repeats)
    for key, value in result.items():
        print(f"{key:16s} {value:8.3f}")
    save_without = result["save_total_s"] - result["checksum_s"]
    print(f"save: checksums add {result['checksum_s'] / save_without:.1%} to save+wait, "
          "off the training thread (only a final wait() waits for them); restore: "
          f"{result['restore_s'] / result['restore_plain_s'] - 1:+.1%}")


if __name__ == "__main__":
    main()
