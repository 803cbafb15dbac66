"""One writer per workdir: an exclusive lock held for the life of a training run.

    with WorkdirLock(workdir):        # raises WorkdirBusy at once if another run holds it
        ...train, save checkpoints, write logs...

The lock is `fcntl.flock` on `<workdir>/.flaxseg.lock`, which names its holder (host, PID,
start time). The operating system releases a flock when its process dies, however it dies,
so a lock left by a killed run is free: the next run takes it over and says whose it was.
The file is removed when a run ends. Under several processes, process 0 takes the lock for
the job and the others wait for its verdict. `python -m flaxseg.evaluate` / `predict` read
without it: orbax renames a checkpoint into place only when it is complete.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

LOCK_FILE = ".flaxseg.lock"


class WorkdirBusy(ValueError):
    """Another run holds the workdir."""


def refuse_file(workdir: str | os.PathLike) -> None:
    """Raises ValueError when `workdir` is an existing file (mkdir would only say
    `[Errno 17] File exists`, naming no cause)."""
    if os.path.isfile(workdir):
        raise ValueError(f"the workdir {os.fspath(workdir)} is a file, not a directory; pass "
                         "--workdir a directory (a new one, or a training run's).")


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the holder is a running process of this host (a filesystem whose flock does
    nothing would otherwise let two runs in)."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return int(holder["pid"]) != os.getpid()


def _describe(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started "
            f"{holder.get('started', '?')}")


class WorkdirLock:
    """An exclusive lock on `workdir` (see the module docstring); a context manager.

    Args:
      workdir: the run's directory (created if missing).
      warn: called with a line when a stale lock of a dead run is taken over.
    """

    def __init__(self, workdir: str | os.PathLike, warn=print):
        self.path = Path(workdir) / LOCK_FILE
        self._warn = warn
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirBusy naming its holder."""
        refuse_file(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(_holder(self.path)) from None
            # The holder we waited on may have removed the file as it released: lock the
            # file that is there now.
            if self.path.exists() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        previous = _holder(self.path)
        if previous and _alive_here(previous):
            os.close(fd)
            raise self._busy(previous)
        if previous:
            self._warn(f"WARNING: took over the lock of a run that is no longer running "
                       f"({_describe(previous)}) on {self.path.parent}.")
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd

    def _busy(self, holder: dict[str, Any]) -> WorkdirBusy:
        return WorkdirBusy(
            f"the workdir {self.path.parent} is in use by another run ({_describe(holder)}). "
            "Wait for it to finish or stop it, or pass another --workdir.")

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: no one can take the old file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class JobWorkdirLock(WorkdirLock):
    """The lock of a multi-process job: process 0 takes it; every process learns whether
    it did (and raises WorkdirBusy if not), so that none starts writing alone."""

    def acquire(self) -> None:
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        error = None
        if jax.process_index() == 0:
            try:
                super().acquire()
            except Exception as e:  # busy, or the workdir cannot be made: tell the others
                error = e
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is not None:
            raise error
        if not taken:
            raise WorkdirBusy(f"process 0 could not lock the workdir {self.path.parent}; "
                              "its error says why.")


def lock_workdir(workdir: str | os.PathLike, warn=print) -> WorkdirLock:
    """The workdir lock for this job: `JobWorkdirLock` under several processes."""
    import jax

    return (JobWorkdirLock if jax.process_count() > 1 else WorkdirLock)(workdir, warn)
