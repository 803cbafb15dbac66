"""`python -m flaxseg.train`: train and evaluate a config into a workdir.

    python -m flaxseg.train                                    # default config -> runs/default
    python -m flaxseg.train --config=flaxseg/configs/unet_isbi.py --workdir=runs/isbi \
        --config.dataset.path=/data/isbi2012_membrane --config.num_train_steps=2000

`--config` takes a file with `get_config()` (any override as `--config.key=value`);
without it the default config runs. Without `--workdir` the run goes to
`runs/<config file name>`. Running the same command again resumes from the latest
checkpoint (or finishes at once if the run is complete). SIGTERM / Ctrl-C save a
checkpoint and exit 0.

Several processes (a TPU pod slice, SLURM nodes, several hosts) run the same command;
`jax.distributed` starts from `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, or by itself under SLURM / Open MPI / on a Cloud TPU VM
(`flaxseg.train.distributed` says when):

    python -m flaxseg.train --workdir=runs/two --coordinator_address=localhost:4545 \
        --num_processes=2 --process_id=0    # and --process_id=1 in a second shell
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from flaxseg.train import distributed

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")



def _unknown_config_key(error: Exception) -> None:
    """Exits 2 with one line for a `--config.key=value` naming no key of the config."""
    from flaxseg.data.config import switch_dataset_hint

    # ml_collections nests the message, e.g. "'batch_sise'\nDid you mean "batch_size" ...?"
    text = str(error)
    key = re.search(r"'([^'\\]+)\\?'", text)
    hint = re.search(r'Did you mean \\?"(\w+)\\?"', text)
    key = key.group(1) if key else text
    # A dataset's keys depend on its kind: --config.dataset.path on a synthetic dataset.
    dataset_value = next((arg.split("=", 1)[1] for arg in sys.argv
                          if arg.startswith(f"--config.dataset.{key}=")), None)
    if dataset_value is not None:
        print(f"Error: the config's dataset has no key {key!r}: its keys are those of its "
              f"kind, and --config.dataset.name does not switch the kind. "
              f"{switch_dataset_hint(dataset_value if key == 'path' else None)}",
              file=sys.stderr)
        sys.exit(2)
    print(
        f"Error: the config has no key {key!r}"
        + (f"; did you mean {hint.group(1)!r}?" if hint else ".")
        + " A --config.key=value override must name a key of the config file.",
        file=sys.stderr,
    )
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an unknown `--config.key` as one error line (with a
    `--config` file the overrides are applied here, not when the flag is defined)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        _unknown_config_key(e)


try:  # config_flags resolves the --config.key overrides when the flag is defined
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "A config file with get_config(); override keys with --config.key=value.",
        lock_config=True,
    )
except (AttributeError, KeyError) as e:
    _unknown_config_key(e)
distributed.define_flags()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs, pictures and summary.json go "
    "(default: runs/<config name>).")


def default_workdir(config_path: str) -> str:
    """`runs/<config file stem>`, e.g. runs/default for flaxseg/configs/default.py."""
    stem = Path(config_path.split(":", 1)[0]).stem
    return os.path.join("runs", stem)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (use --flag=value).")
    from flaxseg.train.reporting import quiet_library_logs

    quiet_library_logs()
    try:  # before anything touches JAX
        distributed.initialize_from_flags()
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    import jax

    from flaxseg.train.loop import train_and_evaluate

    workdir = _WORKDIR.value
    if workdir is None:
        workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
        if jax.process_index() == 0:
            print(f"No --workdir given: writing to {os.path.abspath(workdir)}", flush=True)
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except ValueError as e:
        # Config and workdir mistakes: the message says what to fix; no traceback needed.
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
