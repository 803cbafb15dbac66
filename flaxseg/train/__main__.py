"""`python -m flaxseg.train`: train and evaluate a config into a workdir.

    python -m flaxseg.train                                    # default config -> runs/default
    python -m flaxseg.train --config=flaxseg/configs/unet_isbi.py --workdir=runs/isbi \
        --config.dataset.path=/data/isbi2012_membrane --config.num_train_steps=2000

`--config` takes a file with `get_config()` (any override as `--config.key=value`);
without it the default config runs. Without `--workdir` the run goes to
`runs/<config file name>`. Running the same command again resumes from the latest
checkpoint (or finishes at once if the run is complete). SIGTERM / Ctrl-C save a
checkpoint and exit 0. A mistake in the config, the data or the workdir is one `Error: ...`
line and exit status 2; a non-finite loss ends the run with status 1 (`flaxseg.cli`).

Several processes (a TPU pod slice, SLURM nodes, several hosts) run the same command;
`jax.distributed` starts from `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, or by itself under SLURM / Open MPI / on a Cloud TPU VM
(`flaxseg.train.distributed` says when):

    python -m flaxseg.train --workdir=runs/two --coordinator_address=localhost:4545 \
        --num_processes=2 --process_id=0    # and --process_id=1 in a second shell
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from flaxseg import cli
from flaxseg.train import distributed

_DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")

try:  # config_flags resolves the --config.key overrides when the flag is defined
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        _DEFAULT_CONFIG,
        "A config file with get_config(); override keys with --config.key=value.",
        lock_config=True,
    )
except (AttributeError, KeyError) as e:  # an unknown --config.key on the default config
    sys.exit(cli.report(e if isinstance(e, AttributeError) else AttributeError(str(e))))
distributed.define_flags()
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs, pictures and summary.json go "
    "(default: runs/<config name>).")
_TRUST = flags.DEFINE_bool(
    "trust_saved_code", False, "Import the 'package.module:Attr' model that "
    "config.init_from's saved config names even when it is not this run's model.")


def default_workdir(config_path: str) -> str:
    """`runs/<config file stem>`, e.g. runs/default for flaxseg/configs/default.py."""
    stem = Path(config_path.split(":", 1)[0]).stem
    return os.path.join("runs", stem)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli.unexpected_arguments(argv[1:])
    # A config file that did not load is an error here, before JAX's imports (0.3 s, not
    # 2 s): ml_collections defers a missing file's error to the config's first use.
    config = _CONFIG.value
    config.get("model")
    from flaxseg.train.reporting import quiet_library_logs

    quiet_library_logs()
    distributed.initialize_from_flags()  # before anything touches JAX
    import jax

    from flaxseg.train.loop import train_and_evaluate

    workdir = _WORKDIR.value
    if workdir is None:
        workdir = default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
        if jax.process_index() == 0:
            print(f"No --workdir given: writing to {os.path.abspath(workdir)}", flush=True)
    train_and_evaluate(config, workdir, trust_saved_code=_TRUST.value)
    return 0


if __name__ == "__main__":
    cli.run_absl(main)
