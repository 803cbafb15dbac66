"""jax.distributed start-up: when flaxseg calls it, and the errors it gives."""

import subprocess
import sys

import pytest

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
