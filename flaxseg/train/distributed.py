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
When a job cannot start or loses a process, each process says so in one `Error:` line
naming itself and what to do, instead of JAX's C++ abort (status 134, dozens of lines):
* a process that never joins: the others stop after `--initialization_timeout` seconds
  (a watchdog fires just before JAX's own deadline), exit status 2;
* a second process given a `--process_id=0` whose coordinator port is taken: it stops at
  once, exit status 2 (the first then stops as above);
* a process that dies: the others stop with exit status 1, naming it, half-way through
  `--heartbeat_timeout_seconds` (at least 10 s; `PeerWatch`: every process posts a beat to
  the coordinator's key-value store each second; JAX itself aborts at the full timeout),
  or at once when a collective fails first (gloo: connection reset); without JAX's
  shutdown barrier, which would wait for the dead one and then abort;
* a process that fails (an `Error:` line, or a bug's traceback; `cli.report`) leaves at
  once the same way, without saying it ended normally, so the others stop as above
  instead of waiting in a collective for it.
`FLAXSEG_TRACEBACK=1` leaves JAX's own behaviour and output. Running the same commands
again resumes from the last finished checkpoint.

`StopRequest` turns SIGTERM / SIGINT into a stop at a step every process agrees on: in one
process, a Python signal handler; in several, JAX's preemption service (its SIGTERM
handler and `multihost_utils.reached_preemption_sync_point`), which is what a TPU
maintenance event or a SLURM preemption sends to every host.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from absl import flags

from flaxseg import cli

_MODES = ("auto", "on", "off")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # what JAX itself looks for to recognise a Cloud TPU VM
# JAX's deadline is this much later than the watchdog's, so the one line comes first.
_JAX_DEADLINE_GRACE_S = 30
# What a collective or the coordination service says when another process is gone.
_PEER_LOST = ("Gloo", "Connection reset by peer", "Connection closed by peer",
              "heartbeat timeout", "stopped sending heartbeats")


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
    missing outside a known cluster, the coordinator port of process 0 taken); ends the
    process with one line when not every process joins in `initialization_timeout` s.
    """
    import jax

    if process_id == 0 and coordinator_address:
        _check_coordinator_port(coordinator_address, num_processes)
    try:
        with _deadline(initialization_timeout, _not_joined_message(
                coordinator_address, num_processes, process_id, initialization_timeout)):
            jax.distributed.initialize(
                coordinator_address, num_processes, process_id, local_device_ids,
                initialization_timeout=initialization_timeout + _JAX_DEADLINE_GRACE_S,
                heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(
            f"Could not start jax.distributed ({e}). Give every process the same "
            "--coordinator_address=HOST:PORT (process 0's host, a free port) and "
            "--num_processes, and each its own --process_id; or run under SLURM / Open MPI "
            "/ a Cloud TPU VM, where JAX finds them itself.") from e
    if not cli.wants_traceback():
        PeerWatch(max(10.0, heartbeat_timeout_seconds / 2)).start()


def _who(process_id: int | None, num_processes: int | None) -> str:
    if process_id is None:
        return "this process"
    return f"process {process_id}" + (f" of {num_processes}" if num_processes else "")


def _check_coordinator_port(address: str, num_processes: int | None) -> None:
    """Raises ValueError when process 0's coordinator port is taken on this host: most
    often by another process given --process_id=0 (JAX would wait, then abort both)."""
    port = int(address.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is free
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:  # e.g. a privileged port: JAX will say
                return
            raise ValueError(
                f"{_who(0, num_processes)}: the coordinator port {port} "
                f"(--coordinator_address={address}) is already in use on this host: another "
                "process was given --process_id=0, or another program holds the port. Give "
                "each process its own --process_id, or choose a free port.") from None


def _not_joined_message(address: str | None, num_processes: int | None,
                        process_id: int | None, timeout: int) -> str:
    count = f"all {num_processes}" if num_processes else "all"
    ids = f" (0..{num_processes - 1})" if num_processes else ""
    return (f"{_who(process_id, num_processes)}: the job did not start: not {count} processes "
            f"joined the coordinator {address or '(auto-detected)'} within {timeout} s "
            "(--initialization_timeout). Start every process with the same "
            f"--coordinator_address and --num_processes and its own --process_id{ids}; if "
            "one did start, its log says why it stopped.")


@contextlib.contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """Ends the process with `message` (exit status 2) if the body takes longer than
    `seconds`: JAX would block, then abort from C++. Off with FLAXSEG_TRACEBACK=1."""
    if cli.wants_traceback():
        yield
        return
    timer = threading.Timer(seconds, _say_and_exit, (message, cli.USER_ERROR))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _say_and_exit(message: str, status: int) -> None:
    print(f"Error: {message}", file=sys.stderr, flush=True)
    exit_now(status)


def joined() -> bool:
    """Whether this process is one of several of a started `jax.distributed` job (read
    without starting JAX's backend)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    return state.client is not None and (state.num_processes or 1) > 1


def exit_now(status: int) -> None:
    """Exits at once, skipping `jax.distributed`'s shutdown at exit: with a process gone,
    its barrier waits for the heartbeat timeout and then aborts with pages of C++ logs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def lost_peer_message(error: BaseException) -> str | None:
    """The one line for an error that says another process of this job is gone (a
    collective's broken connection), naming this process and what to do; else None."""
    jax = sys.modules.get("jax")
    if jax is None or not any(phrase in str(error) for phrase in _PEER_LOST):
        return None
    try:
        if jax.process_count() < 2:
            return None
        who = _who(jax.process_index(), jax.process_count())
    except RuntimeError:  # no backend yet: not a job that ran
        return None
    cause = " ".join(str(error).split())[:160]
    return (f"{who}: lost contact with another process of the job ({cause}): it stopped "
            "(killed, crashed, or its host went away); its log says why. Run the same "
            "commands again to resume from the last finished checkpoint.")


class PeerWatch:
    """Ends this process with one line when another process of the job stops beating.

    A daemon thread posts `flaxseg/beat/<i>` (a counter) to the coordinator's key-value
    store every second and reads the others'; a peer whose counter stands still for
    `limit_s` seconds is gone (a process that ends normally posts `flaxseg/done/<i>`
    first, at exit). When the store itself is unreachable, process 0 (the coordinator) is.
    """

    def __init__(self, limit_s: float):
        # JAX's connected client, read without starting the backend (devices may still
        # be configured, e.g. the benchmark's forced CPU device count).
        from jax._src import distributed as jax_distributed

        state = jax_distributed.global_state
        self.limit_s = limit_s
        self._client = state.client
        self._me, self._count = state.process_id, state.num_processes
        self._stop = threading.Event()

    def start(self) -> None:
        """Starts watching (nothing to watch in a one-process job)."""
        import atexit

        if self._client is None or self._count < 2:
            return
        atexit.register(self.stop)  # runs before jax.distributed's own shutdown
        threading.Thread(target=self._run, name="flaxseg-peer-watch", daemon=True).start()

    def stop(self) -> None:
        """Says this process ends normally, and stops watching."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._client.key_value_set(f"flaxseg/done/{self._me}", "1", allow_overwrite=True)

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        beat, reached = 0, time.monotonic()
        while not self._stop.wait(1.0):
            beat += 1
            now = time.monotonic()
            try:
                self._client.key_value_set(f"flaxseg/beat/{self._me}", str(beat),
                                           allow_overwrite=True)
                values = dict(self._client.key_value_dir_get("flaxseg/"))
                reached = now
            except Exception:  # the store is process 0's: unreachable for long, it is gone
                if now - reached > self.limit_s:
                    return self._lost(0)
                continue
            for peer in range(self._count):
                value = values.get(f"flaxseg/beat/{peer}", "")
                if peer == self._me or f"flaxseg/done/{peer}" in values:
                    continue
                if seen.get(peer, (None,))[0] != value:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.limit_s and not self._stop.is_set():
                    return self._lost(peer)
        return None

    def _lost(self, peer: int) -> None:
        if self._stop.is_set():
            return
        _say_and_exit(
            f"{_who(self._me, self._count)}: process {peer} stopped responding for "
            f"{self.limit_s:.0f} s (killed, crashed, or its host went away); its log says "
            "why. Run the same commands again to resume from the last finished checkpoint.",
            cli.TRAINING_FAILURE)


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
