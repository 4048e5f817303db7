"""nsa_dist.launch.discover_launch: each launcher's variables (plain dicts, no processes), Slurm's node-list and
tasks-per-node syntax, the rendezvous address rules, and the errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nsa_dist.launch import (DEFAULT_MASTER_PORT, LaunchInfo, discover_launch, expand_slurm_nodelist,
                             export_torch_env, first_slurm_host, parse_slurm_tasks_per_node)
from nsa_dist.launch import env as launch_env


@pytest.fixture(autouse=True)
def no_mpi4py(monkeypatch):
    """MPI discovery without mpi4py unless a test installs its own broadcast or local-rank query (never a real
    MPI_Init here)."""
    calls = []

    def unavailable(rank, world_size):
        calls.append((rank, world_size))
        return None

    monkeypatch.setattr(launch_env, "mpi_rank0_hostname", unavailable)
    monkeypatch.setattr(launch_env, "mpi_local_rank", lambda rank, world_size: None)
    return calls


@pytest.fixture(autouse=True)
def no_scontrol(monkeypatch):
    """Node lists read by the fallback parser, also on a machine with Slurm, unless a test puts its own scontrol on
    PATH."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in path if not os.path.exists(os.path.join(d, "scontrol"))))


def fake_scontrol(directory, monkeypatch, body: str):
    """An executable ``scontrol`` first on PATH that appends its arguments to ``directory/calls`` and runs
    ``body`` (shell); returns the calls file."""
    script = directory / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{directory / "calls"}"\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory / "calls"


# ------------------------------------------------------------------------------------------------ torchrun / deepspeed

def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node01",
           "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1"}
    assert discover_launch(env) == LaunchInfo(3, 8, 1, 2, "node01", 1234, "torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"}
    info = discover_launch(env)
    assert info == LaunchInfo(1, 2, 1, 2, "127.0.0.1", 29600, "deepspeed")
    assert info.single_node


def test_env_set_by_hand_defaults():
    # one process: nothing but RANK and WORLD_SIZE is needed
    assert discover_launch({"RANK": "0", "WORLD_SIZE": "1"}) == LaunchInfo(0, 1, 0, 1, "127.0.0.1",
                                                                          DEFAULT_MASTER_PORT, "env")
    # several ranks on one node without MASTER_ADDR meet on the loopback address
    info = discover_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (info.master_addr, info.master_port, info.launcher) == ("127.0.0.1", 29500, "env")


def test_env_takes_precedence_over_mpi_and_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert discover_launch(env).rank == 0
    assert discover_launch(env).launcher == "env"


def test_env_multi_node_without_master_addr_is_an_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        discover_launch({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # local size unknown: cannot assume one node
        discover_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})


# ------------------------------------------------------------------------------------------------ MPI

OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1"}
PMI = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}


@pytest.mark.parametrize("env,launcher", [(OMPI, "openmpi"), (PMI, "mpich")])
def test_mpi_with_master_addr(env, launcher, no_mpi4py):
    info = discover_launch({**env, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert info == LaunchInfo(5, 8, 1, 4, "head", 4000, launcher)
    assert not info.single_node
    assert no_mpi4py == []  # MASTER_ADDR given: no communication


@pytest.mark.parametrize("env,launcher", [(OMPI, "openmpi"), (PMI, "mpich")])
def test_mpi_rank0_host_from_mpi4py(env, launcher, monkeypatch):
    calls = []

    def bcast(rank, world_size):
        calls.append((rank, world_size))
        return "node07"

    monkeypatch.setattr(launch_env, "mpi_rank0_hostname", bcast)
    assert discover_launch(env) == LaunchInfo(5, 8, 1, 4, "node07", DEFAULT_MASTER_PORT, launcher)
    assert calls == [(5, 8)]


@pytest.mark.parametrize("env,launcher", [(OMPI, "openmpi"), (PMI, "mpich")])
def test_mpi_single_node_without_mpi4py_uses_loopback(env, launcher, no_mpi4py):
    one_node = {k: v for k, v in env.items()}
    one_node[next(k for k in env if k.endswith(("LOCAL_SIZE", "LOCALNRANKS")))] = "8"
    one_node[next(k for k in env if k.endswith(("LOCAL_RANK", "LOCALRANKID")))] = "5"
    assert discover_launch(one_node) == LaunchInfo(5, 8, 5, 8, "127.0.0.1", DEFAULT_MASTER_PORT, launcher)
    assert no_mpi4py == [(5, 8)]


@pytest.mark.parametrize("env", [OMPI, PMI])
def test_mpi_multi_node_without_mpi4py_asks_for_master_addr(env):
    with pytest.raises(RuntimeError, match="MASTER_ADDR") as e:
        discover_launch(env)
    assert "mpi4py" in str(e.value)


@pytest.mark.parametrize("env,launcher", [(OMPI, "openmpi"), (PMI, "mpich")])
def test_mpi_local_rank_from_mpi4py_when_the_launcher_sets_none(env, launcher, monkeypatch):
    # srun --mpi=pmi2, mpirun_rsh: no local rank variables; mpi4py's node communicator (Split_type) gives them
    calls = []

    def split_type(rank, world_size):
        calls.append((rank, world_size))
        return 3, 4

    monkeypatch.setattr(launch_env, "mpi_local_rank", split_type)
    no_local = {k: v for k, v in env.items() if not k.endswith(("LOCAL_RANK", "LOCAL_SIZE", "LOCALRANKID",
                                                                   "LOCALNRANKS"))}
    assert discover_launch({**no_local, "MASTER_ADDR": "head"}) == LaunchInfo(5, 8, 3, 4, "head",
                                                                             DEFAULT_MASTER_PORT, launcher)
    assert calls == [(5, 8)]
    discover_launch({**env, "MASTER_ADDR": "head"})  # the launcher's own variables: no communication
    assert calls == [(5, 8)]


def test_mpi_without_local_rank_variables_or_mpi4py_names_both():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_LOCAL_RANK and OMPI_COMM_WORLD_LOCAL_SIZE.*mpi4py"):
        discover_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "head"})


def test_mpi4py_matches_launch_only_for_its_own_world():
    # in a subprocess, so that no MPI_Init happens in the test process; outside mpirun mpi4py's world is one rank
    pytest.importorskip("mpi4py")
    code = ("from nsa_dist.launch import mpi4py_matches_launch as m; print(m({'OMPI_COMM_WORLD_RANK': '0', "
            "'OMPI_COMM_WORLD_SIZE': '1'}), m({'PMI_RANK': '1', 'PMI_SIZE': '2'}), m({'RANK': '0', 'WORLD_SIZE': "
            "'1', 'OMPI_COMM_WORLD_RANK': '0', 'OMPI_COMM_WORLD_SIZE': '1'}), m({'OMPI_COMM_WORLD_SIZE': '1'}), "
            "m({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True False False False False"


def test_openmpi_precedes_pmi_and_slurm():
    env = {**OMPI, "PMI_RANK": "0", "PMI_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "MASTER_ADDR": "x"}
    assert discover_launch(env).launcher == "openmpi"
    env = {**PMI, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "x"}
    assert discover_launch(env).launcher == "mpich"


def test_real_mpi4py_outside_mpirun_is_not_trusted():
    # an mpi4py whose COMM_WORLD is not this 2-rank job (here a singleton started without mpirun) must not name
    # rank 0's host; in a subprocess, so that no MPI_Init happens in the test process
    pytest.importorskip("mpi4py")
    code = ("from nsa_dist.launch import discover_launch; print(discover_launch({'PMI_RANK': '1', 'PMI_SIZE': '2', "
            "'MPI_LOCALRANKID': '1', 'MPI_LOCALNRANKS': '2'}).master_addr)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "127.0.0.1"


# ------------------------------------------------------------------------------------------------ Slurm

SLURM = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
         "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NODELIST": "gpu[003-004]"}


def test_slurm():
    assert discover_launch(SLURM) == LaunchInfo(6, 8, 2, 4, "gpu003", DEFAULT_MASTER_PORT, "slurm")


def test_slurm_ntasks_per_node_and_step_nodelist_take_precedence():
    env = {**SLURM, "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "garbage",
           "SLURM_STEP_NODELIST": "gpu[004,003]"}
    assert discover_launch(env) == LaunchInfo(6, 8, 2, 4, "gpu004", DEFAULT_MASTER_PORT, "slurm")


def test_slurm_uneven_tasks_per_node():
    env = {**SLURM, "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "4,3", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert discover_launch(env).local_world_size == 3


def test_slurm_master_addr_and_port_override():
    info = discover_launch({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "12345"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 12345)


def test_slurm_nodelist_only_old_name():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    env["SLURM_NODELIST"] = "a1,b[2-3]"
    assert discover_launch(env).master_addr == "a1"


def test_slurm_single_task_minimal():
    assert discover_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == LaunchInfo(0, 1, 0, 1, "127.0.0.1",
                                                                                    DEFAULT_MASTER_PORT, "slurm")


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a,b,c", ["a", "b", "c"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[1-2]y,z[5]", ["x1y", "x2y", "z5"]),
    ("host-a.cluster.org,host-b.cluster.org", ["host-a.cluster.org", "host-b.cluster.org"]),
    (" cn[10-11] ", ["cn10", "cn11"]),
])
def test_slurm_nodelist_syntax(nodelist, hosts):
    assert list(expand_slurm_nodelist(nodelist)) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


def test_slurm_nodelist_first_host_of_a_huge_list_is_cheap():
    assert first_slurm_host("n[0000000-9999999]") == "n0000000"


@pytest.mark.parametrize("nodelist", ["node[01-04", "node01-04]", "node[a-b]", "node[04-01]", "a,,b", "n[[1]]",
                                      "", "n[1-]"])
def test_slurm_nodelist_errors(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_slurm_host(nodelist)


def test_slurm_bad_nodelist_in_env_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST='gpu\\[1-'"):
        discover_launch({**SLURM, "SLURM_JOB_NODELIST": "gpu[1-"})


def test_slurm_nodelist_from_scontrol_when_on_path(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path, monkeypatch, "printf 'fake-a\\nfake-b\\n'")
    assert list(expand_slurm_nodelist(" gpu[003-004] ")) == ["fake-a", "fake-b"]
    assert discover_launch(SLURM).master_addr == "fake-a"
    assert calls.read_text().splitlines() == ["show hostnames gpu[003-004]"] * 2


def test_slurm_nodelist_rejected_by_scontrol_names_the_variable(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch, "echo 'scontrol: error: Invalid hostlist: gpu[1-' >&2; exit 1")
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST='gpu\\[1-'.*Invalid hostlist"):
        discover_launch({**SLURM, "SLURM_JOB_NODELIST": "gpu[1-"})


@pytest.mark.parametrize("value,counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]),
                                          ("1,2,3", [1, 2, 3])])
def test_slurm_tasks_per_node_syntax(value, counts):
    assert parse_slurm_tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["", "2(3)", "x", "2(x)"])
def test_slurm_tasks_per_node_errors(value):
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        parse_slurm_tasks_per_node(value)


# ------------------------------------------------------------------------------------------------ errors

def test_nothing_found_lists_the_variables_and_how_to_launch():
    with pytest.raises(RuntimeError) as e:
        discover_launch({"PATH": "/usr/bin", "HOME": "/root"})
    message = str(e.value)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID",
                 "SLURM_JOB_NODELIST"):
        assert name in message
    for launcher in ("deepspeed --num_gpus", "torchrun --nproc-per-node", "mpirun -np", "srun"):
        assert launcher in message


@pytest.mark.parametrize("env,variable", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one'"),
    ({"RANK": "0", "WORLD_SIZE": "2.0"}, "WORLD_SIZE='2.0'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "RANK=-1"),
    ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "http"},
     "MASTER_PORT='http'"),
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "5", "MASTER_ADDR": "a"}, "LOCAL_RANK + 1=6"),
    ({**OMPI, "OMPI_COMM_WORLD_RANK": "8"}, "OMPI_COMM_WORLD_RANK=8"),
    ({**OMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "x"}, "OMPI_COMM_WORLD_LOCAL_RANK='x'"),
    ({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "9"}, "OMPI_COMM_WORLD_LOCAL_SIZE=9"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK"),
    ({**PMI, "PMI_SIZE": "4"}, "PMI_RANK=5"),
    ({**PMI, "MPI_LOCALRANKID": "4"}, "MPI_LOCALRANKID=4"),
    ({**SLURM, "SLURM_PROCID": "8"}, "SLURM_PROCID=8"),
    ({**SLURM, "SLURM_NTASKS": ""}, "SLURM_NTASKS=''"),
    ({**SLURM, "SLURM_LOCALID": "4"}, "SLURM_LOCALID=4"),
    ({**SLURM, "SLURM_NTASKS_PER_NODE": "16"}, "SLURM_NTASKS_PER_NODE=16"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({**SLURM, "SLURM_TASKS_PER_NODE": "4(y2)"}, "SLURM_TASKS_PER_NODE"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "SLURM_TASKS_PER_NODE"),
])
def test_inconsistent_values_name_the_variable(env, variable):
    with pytest.raises(ValueError) as e:
        discover_launch(env)
    assert variable in str(e.value)


# ------------------------------------------------------------------------------------------------ export

def test_export_torch_env_round_trips():
    info = LaunchInfo(6, 8, 2, 4, "gpu003", 29501, "slurm")
    env = {"UNRELATED": "1"}
    export_torch_env(info, env)
    assert env == {"UNRELATED": "1", "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu003", "MASTER_PORT": "29501"}
    again = discover_launch(env)
    assert (again.rank, again.world_size, again.local_rank, again.local_world_size, again.master_addr,
            again.master_port) == (6, 8, 2, 4, "gpu003", 29501)


def test_export_torch_env_defaults_to_os_environ(monkeypatch):
    for name in launch_env.TORCH_VARS:
        monkeypatch.setenv(name, "unset")  # registered, so that the variables exported below are removed after
        monkeypatch.delenv(name)
    export_torch_env(LaunchInfo(0, 1, 0, 1, "127.0.0.1", 29500, "env"))
    assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] == "29500"
    assert discover_launch().launcher == "env"


def test_defaults_to_os_environ(monkeypatch):
    monkeypatch.setattr(launch_env.os, "environ", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"})
    assert discover_launch() == LaunchInfo(0, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "openmpi")


def test_master_port():
    assert launch_env.master_port({}) == DEFAULT_MASTER_PORT
    assert launch_env.master_port({"MASTER_PORT": " 1234 "}) == 1234
    with pytest.raises(ValueError, match="MASTER_PORT=0"):
        launch_env.master_port({"MASTER_PORT": "0"})


def test_launch_info_is_frozen():
    info = LaunchInfo(0, 1, 0, 1, "127.0.0.1", 29500, "env")
    with pytest.raises(AttributeError):
        info.rank = 1
