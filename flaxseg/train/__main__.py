"""`python -m flaxseg.train`: train and evaluate a config into a workdir.

    python -m flaxseg.train                                    # default config -> runs/default
    python -m flaxseg.train --config=flaxseg/configs/unet_isbi.py --workdir=runs/isbi \
        --config.dataset.path=/data/isbi2012_membrane --config.num_train_steps=2000

`--config` takes a file with `get_config()` (any override as `--config.key=value`);
without it the default config runs. Without `--workdir` the run goes to
`runs/<config file name>`. Running the same command again resumes from the latest
checkpoint (or finishes at once if the run is complete). SIGTERM / Ctrl-C save a
checkpoint and exit 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "A config file with get_config(); override keys with "
    "--config.key=value.", lock_config=True)
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
    from flaxseg.train.loop import train_and_evaluate

    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save at INFO; the run's own output is the progress and tables.
        logging.set_verbosity(logging.WARNING)

    workdir = _WORKDIR.value
    if workdir is None:
        workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
        print(f"No --workdir given: writing to {os.path.abspath(workdir)}", flush=True)
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except ValueError as e:
        # Config and workdir mistakes: the message says what to fix; no traceback needed.
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
