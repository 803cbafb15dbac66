"""What every command line shares: a user's mistake is one `Error: ...` line, not a traceback.

    if __name__ == "__main__":
        sys.exit(cli.run(main))         # argparse entry points: main() -> exit status
        cli.run_absl(main)              # absl entry points (app.run parses the flags)

Errors that come from what the user gave -- a config file that is missing, does not import
or has an unknown key; a bad value (`ValueError`); a file that cannot be read or written, a
workdir that cannot be created, a full disk (`OSError`) -- print `Error: <message>` on
stderr and exit 2. A training failure (a non-finite loss under `nan_policy='raise'`, or a
run whose updates are all being skipped, a process of a multi-process job that lost
another) exits 1. Set `FLAXSEG_TRACEBACK=1` (or pass
`--verbosity=1` to an absl entry point) to see the traceback for a bug report.
Programming errors (TypeError, AttributeError, ...) keep their traceback.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

TRACEBACK_ENV = "FLAXSEG_TRACEBACK"

USER_ERROR = 2
TRAINING_FAILURE = 1

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def wants_traceback() -> bool:
    """Whether the user asked for tracebacks (FLAXSEG_TRACEBACK=1, or --verbosity=1)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    if "absl.flags" not in sys.modules:  # an argparse entry point (absl may be absent)
        return False
    from absl import flags

    return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present \
        and flags.FLAGS.verbosity >= 1


def unknown_config_key_message(error: BaseException) -> str | None:
    """The one line for ml_collections' error about a `--config.key` the config lacks."""
    text = str(error)
    if "Did you mean" not in text and not re.fullmatch(r"""["']\\?'\w+\\?'["']""", text):
        return None
    key = re.search(r"'([^'\\]+)\\?'", text)
    hint = re.search(r'Did you mean \\?"(\w+)\\?"', text)
    dataset = _dataset_key_message(key.group(1)) if key else None
    if dataset:
        return dataset
    return (f"the config has no key {key.group(1) if key else text!r}"
            + (f"; did you mean {hint.group(1)!r}?" if hint else ".")
            + " A --config.key=value override must name a key of the config file.")


def _dataset_key_message(key: str) -> str | None:
    """For `--config.dataset.KEY=VALUE` naming no key of the config's dataset: a dataset's
    keys are those of its kind (`--config.dataset.path` on a synthetic one), and what to
    write instead."""
    value = next((arg.split("=", 1)[1] for arg in sys.argv
                  if arg.startswith(f"--config.dataset.{key}=")), None)
    if value is None:
        return None
    from flaxseg.data.config import switch_dataset_hint

    return (f"the config's dataset has no key {key!r}: its keys are those of its kind, and "
            "--config.dataset.name does not switch the kind. "
            + switch_dataset_hint(value if key == "path" else None))


def _config_flag_value() -> str:
    """The `--config` file named on the command line (for messages)."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
    return "given with --config"


def config_file_message(error: BaseException) -> str | None:
    """The one line for a config file the user passed that has no `get_config()`, or whose
    `get_config()` raised (a ValueError / OSError from flaxseg code it called keeps that
    code's own message); None for any other error. Shipped configs keep their traceback."""
    if isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error):
        return (f"the config file {_config_flag_value()} defines no get_config(); a config "
                "file is Python whose get_config() returns an ml_collections.ConfigDict "
                "(see flaxseg/configs/).")
    frames = traceback.extract_tb(error.__traceback__)
    user = [f for f in frames if f.name == "get_config"
            and not os.path.abspath(f.filename).startswith(_PACKAGE_DIR + os.sep)]
    if not user or (isinstance(error, ValueError | OSError)
                    and frames[-1].filename != user[-1].filename):
        return None
    detail = " ".join(f"{type(error).__name__}: {error}".split())
    return (f"the config file {user[-1].filename}: get_config() raised {detail} (line "
            f"{user[-1].lineno}). Fix the file, or set {TRACEBACK_ENV}=1 for the traceback.")


def unexpected_arguments(stray: list[str], command_line: list[str] | None = None
                         ) -> ValueError:
    """The error for positional arguments `stray` an entry point does not take: often the
    rest of an unquoted path with spaces, so it shows the argument quoted. `command_line`
    (default `sys.argv`) is searched for the argument the stray ones followed."""
    words = sys.argv if command_line is None else command_line
    before = next((words[i - 1] for i, word in enumerate(words)
                   if i and word == stray[0] and words[i - 1] not in stray), None)
    hint = ""
    if before and before.startswith("--") and "=" in before:  # --config=/x/my config.py
        flag, value = before.split("=", 1)
        hint = f"; quote a value with spaces: {flag}='{value} {' '.join(stray)}'"
    elif before and not before.startswith("-"):  # check /data/my dataset
        hint = f"; quote a path with spaces: '{before} {' '.join(stray)}'"
    return ValueError(f"unexpected arguments {stray}: options are --flag=value{hint}.")


def describe(error: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an error the user can fix, else None."""
    steps = sys.modules.get("flaxseg.train.steps")  # only a training run raises its error
    if steps is not None and isinstance(error, steps.NonFiniteLossError):
        return str(error), TRAINING_FAILURE
    distributed = sys.modules.get("flaxseg.train.distributed")
    lost = distributed.lost_peer_message(error) if distributed is not None else None
    if lost:
        return lost, TRAINING_FAILURE
    if isinstance(error, SyntaxError) and error.filename:
        return (f"the config file {error.filename} does not import: {error.msg} at line "
                f"{error.lineno}."), USER_ERROR
    config_line = config_file_message(error)
    if config_line:
        return config_line, USER_ERROR
    if isinstance(error, AttributeError):
        message = unknown_config_key_message(error)
        return (message, USER_ERROR) if message else None
    if isinstance(error, ValueError | OSError):
        return " ".join(str(error).split()), USER_ERROR
    return None


def report(error: BaseException) -> int:
    """Prints the one line for a user error and returns its exit status; re-raises
    anything else (and everything when a traceback is asked for).

    A process of a multi-process job exits here, after the line (or, for anything else,
    the traceback): without `jax.distributed`'s shutdown barrier and without telling its
    peers it ended normally, so a peer waiting in a collective stops in one line (its
    `PeerWatch`, or the collective's broken connection) instead of waiting for it."""
    distributed = sys.modules.get("flaxseg.train.distributed")
    in_job = distributed is not None and distributed.joined()
    described = None if wants_traceback() else describe(error)
    if described is None:
        if in_job and not wants_traceback():
            traceback.print_exception(error)
            distributed.exit_now(1)
        raise error
    message, status = described
    print(f"Error: {message}", file=sys.stderr, flush=True)
    if in_job or (distributed is not None and distributed.lost_peer_message(error)):
        distributed.exit_now(status)
    return status


# Python's first garbage-collection generation runs every 700 net allocations of container
# objects; tracing and lowering a JAX program allocates millions of short-lived ones, so the
# collector took ~6% of a command's CPU (perf, a tiny DeepLabV3's training command) and
# re-walked the imported modules' objects at each older collection. At 20,000, with those
# objects frozen out of the collector's view, a cold tiny DeepLabV3 run took 9.3-9.6 CPU-s
# instead of 9.8-10.0, and tracing-heavy tests ~8% less CPU (jax 0.10.2, Python 3.11).
# Cycles are still collected; they wait a few training steps longer.
GC_THRESHOLDS = (20_000, 50, 100)


def collect_garbage_less() -> None:
    """Freezes the objects made so far (imported modules) out of the garbage collector's
    view and raises its thresholds to `GC_THRESHOLDS`: for a process that traces and
    compiles JAX programs (every command line, the tests' worker processes)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Callable[[], Any]) -> int:
    """`main()`'s exit status (None counts as 0), or the status of a user error."""
    collect_garbage_less()
    try:
        return int(main() or 0)
    except Exception as error:  # report() re-raises what is not a user error
        return report(error)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag value as one `Error:` line and exit status 2
    (absl's own parser exits 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        # A ValueError / TypeError from a config file's get_config() arrives wrapped twice
        # (ml_collections, then absl), its traceback pasted into the message: name it in
        # one line (the message with the traceback when one is asked for).
        cause, message = error.__context__, None
        while cause is not None and message is None and not wants_traceback():
            message, cause = config_file_message(cause), cause.__context__
        print(f"Error: {message or f'{error}. Run with --helpshort to see the flags.'}",
              file=sys.stderr)
        sys.exit(USER_ERROR)


def run_absl(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)`, with user errors -- also those met while parsing the flags,
    such as a config file that does not load -- reported as one line."""
    from absl import app

    collect_garbage_less()
    try:
        app.run(main, flags_parser=_parse_flags)
    except Exception as error:  # report() re-raises what is not a user error
        sys.exit(report(error))
