"""Several processes: starting `jax.distributed` from flags, and stopping all processes together.

Every process of a multi-host job (a TPU pod slice's hosts, the nodes of a SLURM job, one
process per GPU group) runs the same command. `initialize_from_flags()` calls
`jax.distributed.initialize` before anything touches JAX:

* with `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (and optionally
  `--local_device_ids`), with exactly those arguments;
* with none of them, when the environment says this is one of several processes that JAX
  can find by itself: a SLURM job step with more than one task (`SLURM_NTASKS`), an
  Open MPI launch with more than one rank (`OMPI_COMM_WORLD_SIZE`), a Cloud TPU VM (a
  Google TPU on the PCI bus and `libtpu` installed: JAX reads the slice's hosts from the
  metadata server; a single-host slice becomes one process), a GKE TPU pod
  (`TPU_WORKER_HOSTNAMES`) or `JAX_COORDINATOR_ADDRESS` set;
* never with `--distributed=off`; always (JAX auto-detecting what is unset) with
  `--distributed=on`.

Otherwise nothing is called, and a single process runs exactly as without this module.
`--heartbeat_timeout_seconds` (default 60, JAX's own default is 100) bounds how long the
survivors of a dead process wait: JAX's coordination service then ends them with
`Terminating process because the JAX distributed service detected fatal errors ...
The following tasks are unhealthy (stopped sending heartbeats): <task id>`, exit status
134. Running the same commands again resumes from the last finished checkpoint.

`StopRequest` turns SIGTERM / SIGINT into a stop at a step every process agrees on: in one
process, a Python signal handler; in several, JAX's preemption service (its SIGTERM
handler and `multihost_utils.reached_preemption_sync_point`), which is what a TPU
maintenance event or a SLURM preemption sends to every host.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import signal
import threading
from typing import Any

from absl import flags

_MODES = ("auto", "on", "off")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # what JAX itself looks for to recognise a Cloud TPU VM


def define_flags() -> None:
    """Defines the distributed flags on absl's global FLAGS (once per program)."""
    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_enum(
        "distributed", "auto", _MODES,
        "Call jax.distributed.initialize: auto (when the flags below are given or a "
        "multi-process launch is detected: SLURM, Open MPI, Cloud TPU VM), on, or off.")
    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0's coordinator (jax.distributed.initialize).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.DEFINE_list("local_device_ids", None,
                      "Devices this process uses, e.g. 0,1 (default: all it sees).")
    flags.DEFINE_integer(
        "heartbeat_timeout_seconds", 60,
        "A process silent this long is declared dead and the others stop with an error.")
    flags.DEFINE_integer("initialization_timeout", 300,
                         "Seconds to wait for every process to join.")


def cluster_environment() -> str | None:
    """The multi-process launcher this process runs under, or None (see the module doc)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "GKE TPU"
    if _on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def _on_cloud_tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None, *,
               heartbeat_timeout_seconds: int = 60, initialization_timeout: int = 300) -> None:
    """`jax.distributed.initialize` with these arguments; unset ones JAX detects itself.

    Raises ValueError with the fix when JAX cannot start (already started, arguments
    missing outside a known cluster, an unreachable coordinator).
    """
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, local_device_ids,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(
            f"Could not start jax.distributed ({e}). Give every process the same "
            "--coordinator_address=HOST:PORT (process 0's host, a free port) and "
            "--num_processes, and each its own --process_id; or run under SLURM / Open MPI "
            "/ a Cloud TPU VM, where JAX finds them itself.") from e


def initialize_from_flags() -> bool:
    """Starts `jax.distributed` as the flags and the environment say; True if it did."""
    values = flags.FLAGS
    given = {"coordinator_address": values.coordinator_address,
             "num_processes": values.num_processes, "process_id": values.process_id,
             "local_device_ids": values.local_device_ids}
    if values.distributed == "off":
        if any(v is not None for v in given.values()):
            raise ValueError("--distributed=off contradicts --coordinator_address / "
                             "--num_processes / --process_id / --local_device_ids.")
        return False
    if (values.distributed == "auto" and all(v is None for v in given.values())
            and cluster_environment() is None):
        return False
    if given["local_device_ids"] is not None:
        given["local_device_ids"] = [int(i) for i in given["local_device_ids"]]
    initialize(**given, heartbeat_timeout_seconds=values.heartbeat_timeout_seconds,
               initialization_timeout=values.initialization_timeout)
    return True


class StopRequest:
    """A stop asked for by SIGTERM / SIGINT, at a step all processes agree on.

    >>> with StopRequest() as stop:
    ...     for step in ...:
    ...         train_step(...)
    ...         if stop.requested(step): save and break    # the same step everywhere

    One process: handlers set a flag the loop checks after every step; a second SIGINT
    raises KeyboardInterrupt as usual (the impatient way out). Several processes: SIGTERM
    is left to JAX's preemption service, and SIGINT is turned into a SIGTERM to this
    process, so `requested(step)` (`reached_preemption_sync_point`) is true at the same
    step on every process. Handlers are installed only in the main thread and restored
    on exit.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self._multiprocess:  # let JAX's preemption service tell every process
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopRequest:
        import jax

        self._multiprocess = jax.process_count() > 1
        signums = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, step: int) -> str | None:
        """What asks to stop after `step` (e.g. 'SIGTERM'), or None to go on."""
        if not self._multiprocess:
            return self.signal_name
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            return self.signal_name or "a preemption notice (SIGTERM)"
        return None


def say(text: str, **kwargs: Any) -> None:
    """Prints from process 0 only (every process runs the same program)."""
    import jax

    if jax.process_index() == 0:
        print(text, flush=True, **kwargs)
