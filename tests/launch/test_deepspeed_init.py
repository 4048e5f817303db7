"""How the DeepSpeed backend starts torch.distributed (``_init_distributed``): which launches are left to
``deepspeed.init_distributed(auto_mpi_discovery=True)`` and which are read by ``nsa_dist.launch`` first. A stand-in
for the ``deepspeed`` module records the call; no process group is created."""
from __future__ import annotations

import os

import pytest
import torch

from nsa_dist.launch import env as launch_env
from nsa_dist.training import deepspeed_backend

OMPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "4321"}


class FakeDeepSpeed:
    """Records ``init_distributed``'s arguments and the torch variables set when it was called."""

    def __init__(self):
        self.calls = []

    def init_distributed(self, **kwargs):
        self.calls.append((kwargs, {k: os.environ.get(k) for k in launch_env.TORCH_VARS}))


@pytest.fixture
def launch(monkeypatch):
    """Sets a launcher's variables (and only those) in os.environ, on the CPU, without a process group; an MPI
    launch's mpi4py is replaced by ``matches`` (never a real MPI_Init here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(deepspeed_backend.dist, "is_initialized", lambda: False)
    for name in launch_env.TORCH_VARS:  # registered, so that the variables exported by the call are removed after
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    for name in list(os.environ):
        if name.startswith(("OMPI_COMM_WORLD", "PMI_", "MPI_LOCAL", "SLURM_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(launch_env, "mpi_rank0_hostname", lambda rank, world_size: None)

    def set_launch(variables, matches):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(deepspeed_backend, "mpi4py_matches_launch", lambda: matches)
        ds = FakeDeepSpeed()
        assert deepspeed_backend._init_distributed(ds) == torch.device("cpu")
        assert len(ds.calls) == 1
        return ds.calls[0]

    return set_launch


def test_mpirun_with_mpi4py_is_left_to_deepspeeds_discovery(launch):
    kwargs, torch_env = launch(OMPI, matches=True)
    assert kwargs == {"dist_backend": "gloo", "auto_mpi_discovery": True, "distributed_port": 4321}
    assert torch_env == {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None,
                         "MASTER_ADDR": None, "MASTER_PORT": "4321"}  # nothing set here: DeepSpeed discovers


def test_mpirun_with_master_addr_is_read_here(launch):
    # DeepSpeed's discovery would replace the given MASTER_ADDR by rank 0's `hostname -I` address
    kwargs, torch_env = launch({**OMPI, "MASTER_ADDR": "head"}, matches=True)
    assert kwargs["auto_mpi_discovery"] and kwargs["distributed_port"] == 4321
    assert torch_env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "head", "MASTER_PORT": "4321"}


def test_mpirun_without_a_matching_mpi4py_is_read_here(launch):
    _, torch_env = launch(OMPI, matches=False)
    assert (torch_env["RANK"], torch_env["LOCAL_RANK"], torch_env["MASTER_ADDR"]) == ("1", "1", "127.0.0.1")


def test_slurm_is_read_here(launch):
    _, torch_env = launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                           "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "a1"}, matches=False)
    assert torch_env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                         "MASTER_ADDR": "a1", "MASTER_PORT": "29500"}


def test_no_launcher_trains_as_one_process(launch, capsys):
    kwargs, torch_env = launch({}, matches=False)
    assert "training as a single process" in capsys.readouterr().out
    assert (torch_env["RANK"], torch_env["WORLD_SIZE"], torch_env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert kwargs["distributed_port"] == int(torch_env["MASTER_PORT"])
