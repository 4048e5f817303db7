"""Which launcher started this process, and where its ranks meet: one function for torchrun, ``deepspeed``,
Open MPI / MPICH / Intel MPI (``mpirun``), and Slurm (``srun``).

:func:`discover_launch` reads the launcher's environment variables (nothing is asked of a scheduler; the one
process it may start is Slurm's ``scontrol show hostnames``, which expands a node list) and returns a
:class:`LaunchInfo`; :func:`export_torch_env` writes it back as the variables
``torch.distributed``'s ``env://`` initialisation reads. Launchers are tried in this order, the first whose
variables are present wins:

==================  ====================================================================================
launcher            variables (rank, world size, local rank, local world size)
==================  ====================================================================================
torchrun/deepspeed  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE``
                    (deepspeed), with ``MASTER_ADDR`` / ``MASTER_PORT``
Open MPI            ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
                    ``OMPI_COMM_WORLD_LOCAL_SIZE``
MPICH / Intel MPI   ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
Slurm               ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE`` or
                    ``SLURM_TASKS_PER_NODE`` (this node's entry, ``SLURM_NODEID``)
==================  ====================================================================================

Under MPI, a launcher that sets no local rank variables (``srun --mpi=pmi2``, MVAPICH's ``mpirun_rsh``) leaves the
local rank and local world size to mpi4py: this process's rank and size in ``COMM_WORLD.Split_type(
COMM_TYPE_SHARED)``, the ranks sharing its node.

Rendezvous address: ``MASTER_ADDR`` / ``MASTER_PORT`` when set (every launcher). Otherwise, under MPI, rank 0's
host name is broadcast with mpi4py when it is importable and its ``COMM_WORLD`` matches the environment; without
mpi4py a job whose ranks all run on one node (local world size = world size) meets at ``127.0.0.1``, and a job
over several nodes is an error asking for ``MASTER_ADDR``. Under Slurm the address is the first host of
``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` (Slurm places rank 0 there unless the task
distribution is ``arbitrary``; set ``MASTER_ADDR`` then), expanded by ``scontrol show hostnames``. The port
defaults to :data:`DEFAULT_MASTER_PORT` (29500, torch's own default): two jobs sharing a node need different
``MASTER_PORT`` values.

Caveat: an ``sbatch`` script itself carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``; start the training
with ``srun`` inside it (one process per task), not directly, or rank 0 waits for ranks that never come.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, MutableMapping, Optional, Tuple

DEFAULT_MASTER_PORT = 29500
LOOPBACK = "127.0.0.1"

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OPENMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE")
PMI_VARS = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "SLURM_NODEID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
MPI_LAUNCHERS = {"openmpi": OPENMPI_VARS, "mpich": PMI_VARS}  # LaunchInfo.launcher -> its variables

HOW_TO_LAUNCH = """\
Launch one process per rank with one of:
  deepspeed --num_gpus N --module nsa_dist.train --config CONFIG.yaml
  torchrun --nproc-per-node N -m nsa_dist.train --config CONFIG.yaml
  mpirun -np N python -m nsa_dist.train --config CONFIG.yaml      (Open MPI, MPICH, Intel MPI)
  srun --ntasks N python -m nsa_dist.train --config CONFIG.yaml   (Slurm)
or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself (RANK=0 WORLD_SIZE=1 for one process)."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (another process may take it before it is bound: for
    a launcher's ``MASTER_PORT`` on a single-process fallback or in tests; local process groups meet through a
    file store instead, :func:`nsa_dist.launch.run_local_group`)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job and where the ranks meet (``torch.distributed`` ``env://``).

    ``launcher``: ``"torchrun"``, ``"deepspeed"``, ``"env"`` (RANK/WORLD_SIZE set by something else), ``"openmpi"``,
    ``"mpich"`` (any PMI launcher: MPICH, Intel MPI, MVAPICH) or ``"slurm"``. ``local_world_size``: the ranks on
    this node; where RANK/WORLD_SIZE were set by hand without ``LOCAL_WORLD_SIZE`` it is not known and is
    ``LOCAL_RANK + 1`` (a lower bound)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def single_node(self) -> bool:
        """Every rank runs on this node."""
        return self.local_world_size == self.world_size


def _launcher(env: Mapping[str, str]) -> Optional[str]:
    """The launcher whose variables ``env`` holds (first in precedence order): ``"torch"`` (RANK/WORLD_SIZE, any
    launcher), a key of :data:`MPI_LAUNCHERS`, ``"slurm"``, or None."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torch"
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return "openmpi"
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return "mpich"
    return "slurm" if "SLURM_PROCID" in env else None


def launcher_present(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether any supported launcher's variables are in the environment (``os.environ`` by default)."""
    return _launcher(os.environ if environ is None else environ) is not None


def discover_launch(environ: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """The launch this process belongs to, from the launcher's environment variables (``os.environ`` by default).

    Raises:
        RuntimeError: no launcher's variables are present (the message lists those looked for and how to launch),
            or a multi-node MPI job has no ``MASTER_ADDR`` and no usable mpi4py.
        ValueError: a variable is not an integer, or the values disagree (rank ≥ world size, ...); the message
            names the variable.
    """
    env = os.environ if environ is None else environ
    launcher = _launcher(env)
    if launcher is None:
        raise RuntimeError(
            "no distributed launcher found in the environment: looked for torchrun/deepspeed's "
            f"{', '.join(TORCH_VARS)}; Open MPI's {', '.join(OPENMPI_VARS)}; MPICH / Intel MPI's "
            f"{', '.join(PMI_VARS)}; Slurm's {', '.join(SLURM_VARS)}.\n" + HOW_TO_LAUNCH)
    if launcher in MPI_LAUNCHERS:
        return _from_mpi(env, launcher, *MPI_LAUNCHERS[launcher])
    return _from_torch_env(env) if launcher == "torch" else _from_slurm(env)


def mpi4py_matches_launch(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether an MPI launcher (Open MPI, MPICH, Intel MPI: the variables of :data:`MPI_LAUNCHERS`, and no
    RANK/WORLD_SIZE, which take precedence) started this process and mpi4py's ``MPI.COMM_WORLD`` is that job
    (same rank and world size as the launcher's variables): then mpi4py can tell the rest of the launch, as
    DeepSpeed's ``init_distributed(auto_mpi_discovery=True)`` does. False for other launchers, when mpi4py is not
    importable or its MPI library cannot load, and for an mpi4py built for another MPI (it starts every process
    as a world of one). Initialises MPI (``MPI_Init``) once the launcher's variables are there.

    Raises:
        ValueError: the launcher's rank or world size is not an integer; the message names the variable."""
    env = os.environ if environ is None else environ
    launcher = _launcher(env)
    if launcher not in MPI_LAUNCHERS:
        return False
    rank_var, size_var = MPI_LAUNCHERS[launcher][:2]
    if rank_var not in env or size_var not in env:
        return False  # incomplete: discover_launch reports it
    return _mpi4py_world(_int(env, rank_var), _int(env, size_var)) is not None


def export_torch_env(info: LaunchInfo, environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
    ``environ`` (``os.environ`` by default), the variables ``torch.distributed.init_process_group("env://")``
    and ``deepspeed.init_distributed`` read."""
    env = os.environ if environ is None else environ
    env.update({"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
                "LOCAL_WORLD_SIZE": str(info.local_world_size), "MASTER_ADDR": info.master_addr,
                "MASTER_PORT": str(info.master_port)})


# ---------------------------------------------------------------------------------------------------- launchers

def _from_torch_env(env: Mapping[str, str]) -> LaunchInfo:
    for name in ("RANK", "WORLD_SIZE"):
        if name not in env:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise ValueError(f"{other} is set but {name} is not: torchrun/deepspeed-style launches set both "
                             f"(with LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (0 if world_size == 1 else None)
    if local_rank is None:
        raise ValueError("LOCAL_RANK is not set (RANK and WORLD_SIZE are): it picks this rank's GPU")
    local_name = next((n for n in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if n in env), None)
    # no local size given: LOCAL_RANK + 1 is a lower bound (not used to decide that the job is on one node)
    local_world_size = _int(env, local_name) if local_name else (1 if world_size == 1 else local_rank + 1)
    launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env else
                "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "env")
    _check(rank, world_size, local_rank, local_world_size,
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_name or "LOCAL_RANK + 1"))
    if "MASTER_ADDR" in env:
        addr = _addr(env)
    elif world_size == 1 or (local_name and local_world_size == world_size):
        addr = LOOPBACK
    else:
        raise RuntimeError(f"MASTER_ADDR is not set for a {world_size}-rank launch (RANK={rank}): set it to the "
                           f"host name or address of rank 0's node, and MASTER_PORT (default "
                           f"{DEFAULT_MASTER_PORT})")
    return LaunchInfo(rank, world_size, local_rank, local_world_size, addr, master_port(env), launcher)


def _from_mpi(env: Mapping[str, str], launcher: str, rank_var: str, size_var: str, local_rank_var: str,
              local_size_var: str) -> LaunchInfo:
    for name in (rank_var, size_var):
        if name not in env:
            raise ValueError(f"{launcher}: {name} is not set while "
                             f"{rank_var if name == size_var else size_var} is")
    rank, world_size = _int(env, rank_var), _int(env, size_var)
    if local_rank_var in env or local_size_var in env:
        local_rank, local_world_size = _int(env, local_rank_var), _int(env, local_size_var)
    elif world_size == 1:
        local_rank, local_world_size = 0, 1
    else:
        local = mpi_local_rank(rank, world_size)
        if local is None:
            raise ValueError(f"{launcher}: {local_rank_var} and {local_size_var} are not set (a {world_size}-rank "
                             f"job), and without mpi4py built for this MPI (pip install mpi4py) the ranks sharing "
                             f"this node are unknown")
        local_rank, local_world_size = local
    _check(rank, world_size, local_rank, local_world_size, (rank_var, size_var, local_rank_var, local_size_var))
    port = master_port(env)
    if "MASTER_ADDR" in env:
        addr = _addr(env)
    else:
        addr = mpi_rank0_hostname(rank, world_size)
        if addr is None:
            if local_world_size != world_size:
                raise RuntimeError(
                    f"{launcher}: this {world_size}-rank MPI job spans several nodes ({local_size_var}="
                    f"{local_world_size}) and rank 0's host is unknown without communicating: set MASTER_ADDR to "
                    f"rank 0's host (e.g. `mpirun -x MASTER_ADDR=$(hostname) ...` for Open MPI, "
                    f"`mpiexec -genv MASTER_ADDR $(hostname) ...` for MPICH), or install mpi4py built for this MPI "
                    f"(pip install mpi4py), which broadcasts it")
            addr = LOOPBACK
    return LaunchInfo(rank, world_size, local_rank, local_world_size, addr, port, launcher)


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    if "SLURM_NTASKS" not in env:
        raise ValueError("slurm: SLURM_PROCID is set but SLURM_NTASKS is not (start the ranks with srun)")
    rank, world_size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else (0 if world_size == 1 else None)
    if local_rank is None:
        raise ValueError("slurm: SLURM_LOCALID is not set (run the job's processes with srun)")
    if "SLURM_NTASKS_PER_NODE" in env:
        local_name = "SLURM_NTASKS_PER_NODE"
        local_world_size = _int(env, local_name)
    elif "SLURM_TASKS_PER_NODE" in env:
        local_name = "SLURM_TASKS_PER_NODE"
        counts = parse_slurm_tasks_per_node(env[local_name])
        node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        if not 0 <= node < len(counts):
            raise ValueError(f"slurm: SLURM_NODEID={node} is outside SLURM_TASKS_PER_NODE={env[local_name]!r} "
                             f"({len(counts)} nodes)")
        local_world_size = counts[node]
    elif world_size == 1:
        local_name, local_world_size = "SLURM_NTASKS_PER_NODE", 1
    else:
        raise ValueError("slurm: neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set")
    _check(rank, world_size, local_rank, local_world_size, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                                                            local_name))
    if "MASTER_ADDR" in env:
        addr = _addr(env)
    else:
        list_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)),
                         None)
        if list_name is not None:
            addr = first_slurm_host(env[list_name], list_name)
        elif local_world_size == world_size:
            addr = LOOPBACK
        else:
            raise RuntimeError("slurm: no SLURM_JOB_NODELIST / SLURM_NODELIST to find rank 0's node in: set "
                               "MASTER_ADDR to its host")
    return LaunchInfo(rank, world_size, local_rank, local_world_size, addr, master_port(env), "slurm")


# ---------------------------------------------------------------------------------------------------- MPI

def _mpi4py_world(rank: int, world_size: int):
    """mpi4py's ``MPI.COMM_WORLD`` when it is the launcher's job (its rank and size are ``rank`` and
    ``world_size``); None when mpi4py is not importable, its MPI library cannot load, or its ``COMM_WORLD`` is
    another (an mpi4py built for another MPI starts as a singleton)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):
        return None
    comm = MPI.COMM_WORLD
    return comm if (comm.Get_rank(), comm.Get_size()) == (rank, world_size) else None


def _mpi4py_rank0_hostname(rank: int, world_size: int) -> Optional[str]:
    """Rank 0's host name broadcast over ``MPI.COMM_WORLD`` (a collective: every rank calls it); None where
    :func:`_mpi4py_world` finds no usable mpi4py."""
    comm = _mpi4py_world(rank, world_size)
    return None if comm is None else comm.bcast(socket.gethostname() if rank == 0 else None, root=0)


def _mpi4py_local_rank(rank: int, world_size: int) -> Optional[Tuple[int, int]]:
    """(local rank, local world size): this process's rank and size among the ranks sharing its node, MPI's
    ``COMM_WORLD.Split_type(COMM_TYPE_SHARED)`` (a collective: every rank calls it); None where
    :func:`_mpi4py_world` finds no usable mpi4py."""
    comm = _mpi4py_world(rank, world_size)
    if comm is None:
        return None
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


# replaced in unit tests; ``(rank, world_size) -> rank 0's host or None``
mpi_rank0_hostname: Callable[[int, int], Optional[str]] = _mpi4py_rank0_hostname
# replaced in unit tests; ``(rank, world_size) -> (local rank, local world size) or None``
mpi_local_rank: Callable[[int, int], Optional[Tuple[int, int]]] = _mpi4py_local_rank


# ---------------------------------------------------------------------------------------------------- Slurm syntax

def expand_slurm_nodelist(nodelist: str) -> Iterator[str]:
    """The host names of a Slurm node list in order, e.g. ``"node[01-03,07],gpu5"`` → node01, node02, node03,
    node07, gpu5. Where ``scontrol`` is on PATH (a Slurm installation) these are Slurm's own expansion,
    ``scontrol show hostnames <list>``; where it is not (no Slurm here, e.g. CPU CI, or a container without Slurm's
    tools) :func:`_parse_slurm_nodelist`, a fallback parser of the same syntax, reads the list.

    Raises:
        ValueError: ``scontrol`` rejects the list (its message), or the fallback parser cannot read it."""
    scontrol = shutil.which("scontrol")
    if scontrol is None or not nodelist.strip():  # an empty argument would make scontrol read SLURM_JOB_NODELIST
        yield from _parse_slurm_nodelist(nodelist)
        return
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist.strip()], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise ValueError(f"`scontrol show hostnames` cannot read it: {(proc.stderr or proc.stdout).strip()}")
    yield from proc.stdout.split()


def first_slurm_host(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a Slurm node list (where Slurm's block distribution puts task 0).

    Raises:
        ValueError: the list is empty or cannot be read; the message names ``name`` and the list."""
    try:
        return next(expand_slurm_nodelist(nodelist))
    except StopIteration:
        raise ValueError(f"{name} is empty") from None
    except ValueError as e:
        raise ValueError(f"{name}={nodelist!r}: {e}") from None


def parse_slurm_tasks_per_node(value: str) -> List[int]:
    """Slurm's ``SLURM_TASKS_PER_NODE`` syntax, one count per node: ``"2(x3),1"`` → [2, 2, 2, 1]."""
    counts: List[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={value!r}: cannot read {part!r} (expected N or N(xM))")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


_NODE_EXPR = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # a host expression: text and [ranges] groups, no comma outside them


def _parse_slurm_nodelist(nodelist: str) -> Iterator[str]:
    """The fallback where ``scontrol`` is absent: Slurm's node-list syntax read here. Host expressions separated by
    commas, each text and bracket groups of comma-separated numbers or ranges, zero padding kept (``n[098-101]``
    → n098 ... n101); several groups in one name (``"r[1-2]-n[1-2]"``) expand as a product with the last group
    varying fastest. Lazy: the first host of a huge list is cheap.

    Raises:
        ValueError: unbalanced or nested brackets, an empty name, or a malformed or descending range."""
    text = nodelist.strip()
    exprs = [e.strip() for e in re.findall(_NODE_EXPR, text)]
    if not re.fullmatch(rf"{_NODE_EXPR}(?:,{_NODE_EXPR})*", text) or not all(exprs):
        raise ValueError(f"node list {nodelist!r} is not host names and [ranges] separated by commas (an empty "
                         f"name, or unbalanced or nested brackets)")
    for expr in exprs:
        yield from _expand_host(re.split(r"\[([^\]]*)\]", expr), nodelist)


def _expand_host(pieces: List[str], whole: str) -> Iterator[str]:
    """Names of ``pieces`` = [text, group, text, group, ..., text] (a host expression split at its brackets)."""
    if len(pieces) == 1:
        yield pieces[0]
        return
    for item in pieces[1].split(","):
        r = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", item)
        if r is None:
            raise ValueError(f"cannot read range {item.strip()!r} in node list {whole!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item.strip()!r} in node list {whole!r}")
        for n in range(int(lo), int(hi) + 1):
            for tail in _expand_host(pieces[2:], whole):
                yield f"{pieces[0]}{n:0{len(lo)}d}{tail}"


# ---------------------------------------------------------------------------------------------------- checks

def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise ValueError(f"{name} is not set")
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _check(rank: int, world_size: int, local_rank: int, local_world_size: int, names) -> None:
    rank_n, world_n, local_rank_n, local_world_n = names
    if world_size < 1:
        raise ValueError(f"{world_n}={world_size}: the world size must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_n}={rank} is outside [0, {world_n}={world_size})")
    if not 1 <= local_world_size <= world_size:
        raise ValueError(f"{local_world_n}={local_world_size} is outside [1, {world_n}={world_size}]")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"{local_rank_n}={local_rank} is outside [0, {local_world_n}={local_world_size})")


def _addr(env: Mapping[str, str]) -> str:
    addr = env["MASTER_ADDR"].strip()
    if not addr:
        raise ValueError("MASTER_ADDR is set but empty")
    return addr


def master_port(environ: Optional[Mapping[str, str]] = None) -> int:
    """``MASTER_PORT`` of ``environ`` (``os.environ`` by default), :data:`DEFAULT_MASTER_PORT` when unset.

    Raises:
        ValueError: it is not an integer in [1, 65535]; the message names it."""
    env = os.environ if environ is None else environ
    if "MASTER_PORT" not in env:
        return DEFAULT_MASTER_PORT
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={port} is outside [1, 65535]")
    return port
