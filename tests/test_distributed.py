"""jax.distributed start-up: when flaxseg calls it, and the errors it gives."""

import socket
import subprocess
import sys
import time

import pytest
from conftest import child_env, free_port

from flaxseg.train import distributed

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    return monkeypatch


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: a single process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, "GKE TPU"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_environment_is_read_from_the_launcher(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert distributed.cluster_environment() == expected


def test_a_cloud_tpu_vm_is_a_cluster(clean_env):
    clean_env.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.cluster_environment() == "Cloud TPU VM"


def test_this_machine_is_no_cloud_tpu_vm():
    assert distributed._on_cloud_tpu_vm() is False  # no libtpu, no Google PCI device


def test_starting_after_jax_is_an_error_that_says_what_to_do():
    import jax

    jax.devices()  # this process's backend is up (conftest), as in a late call
    with pytest.raises(ValueError, match=r"Could not start jax.distributed .*"
                                         r"--coordinator_address=HOST:PORT"):
        distributed.initialize("localhost:1", num_processes=2, process_id=0)


@pytest.mark.parametrize("flags, message", [
    (["--distributed=off", "--num_processes=2"], "--distributed=off contradicts"),
    (["--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"],
     "Could not start jax.distributed"),
])
def test_train_cli_refuses_bad_distributed_flags_with_exit_2(tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "flaxseg.train", f"--workdir={tmp_path / 'run'}", *flags],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def _train_as_process_0(tmp_path, port: int, timeout_s: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flaxseg.train", f"--workdir={tmp_path / 'run'}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0",
         f"--initialization_timeout={timeout_s}"],
        env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _only_line(err: str) -> str:
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err[-3000:]
    return lines[0]


def test_a_peer_that_never_starts_and_a_second_process_0_each_end_in_one_line(tmp_path):
    with socket.socket() as held:  # a coordinator already on the port: the first process 0
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]
        second = _train_as_process_0(tmp_path, taken, timeout_s=60)
        port = free_port()
        alone = _train_as_process_0(tmp_path, port, timeout_s=3)  # its peer never starts
        start = time.monotonic()
        _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert _only_line(err) == (
        f"Error: process 0 of 2: the coordinator port {taken} "
        f"(--coordinator_address=localhost:{taken}) is already in use on this "
        "host: another process was given --process_id=0, or another program holds the port. "
        "Give each process its own --process_id, or choose a free port.")
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 2 and time.monotonic() - start < 60
    assert _only_line(err) == (
        f"Error: process 0 of 2: the job did not start: not all 2 processes joined the "
        f"coordinator localhost:{port} within 3 s (--initialization_timeout). Start every "
        "process with the same --coordinator_address and --num_processes and its own "
        "--process_id (0..1); if one did start, its log says why it stopped.")
    assert not (tmp_path / "run").exists()


WATCHED_CHILD = r"""
import os, sys, time
import jax
from flaxseg import cli
from flaxseg.train import distributed
port, me, victim = (int(a) for a in sys.argv[1:4])
jax.distributed.initialize(f"localhost:{port}", 2, me, heartbeat_timeout_seconds=60)
distributed.PeerWatch(limit_s=2).start()  # what initialize() starts, with a short limit
time.sleep(2 + me)  # the processes end at different times, as at the end of a run
if me == victim and sys.argv[4] == "raise":  # a bug in one process: a traceback, exit 1
    sys.exit(cli.run(lambda: 1 / 0))
if me == victim:
    os._exit(9)  # kill -9
if victim >= 0:
    time.sleep(30)
"""


def test_a_dead_peer_ends_the_other_in_one_line_and_a_normal_end_is_no_death():
    jobs = {}
    # process 1 killed; process 1 failing with a traceback; nobody killed
    for victim, how in ((1, "kill"), (1, "raise"), (-1, "kill")):
        port = free_port()
        jobs[victim, how] = [subprocess.Popen(
            [sys.executable, "-c", WATCHED_CHILD, str(port), str(me), str(victim), how],
            env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for me in (0, 1)]
    for how, status in (("kill", 9), ("raise", 1)):
        survivor, victim = jobs[1, how]
        start = time.monotonic()
        _, err = survivor.communicate(timeout=120)
        _, victim_err = victim.communicate(timeout=120)
        assert survivor.returncode == 1 and victim.returncode == status, victim_err[-3000:]
        # Not after its 30 s: the failed process left without JAX's shutdown barrier and
        # without saying it ended normally.
        assert time.monotonic() - start < 25
        assert _only_line(err) == (
            "Error: process 0 of 2: process 1 stopped responding for 2 s (killed, crashed, "
            "or its host went away); its log says why. Run the same commands again to "
            "resume from the last finished checkpoint.")
    assert victim_err.rstrip().endswith("ZeroDivisionError: division by zero"), victim_err
    for proc in jobs[-1, "kill"]:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "Error" not in err, err[-3000:]
