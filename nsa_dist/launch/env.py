"""Which launcher started this process, and where its ranks meet: one function for torchrun, ``deepspeed``,
Open MPI / MPICH / Intel MPI (``mpirun``), and Slurm (``srun``).

:func:`discover_launch` reads the launcher's environment variables (no process is started, nothing is asked of a
scheduler) and returns a :class:`LaunchInfo`; :func:`export_torch_env` writes it back as the variables
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

Rendezvous address: ``MASTER_ADDR`` / ``MASTER_PORT`` when set (every launcher). Otherwise, under MPI, rank 0's
host name is broadcast with mpi4py when it is importable and its ``COMM_WORLD`` matches the environment; without
mpi4py a job whose ranks all run on one node (local world size = world size) meets at ``127.0.0.1``, and a job
over several nodes is an error asking for ``MASTER_ADDR``. Under Slurm the address is the first host of
``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` (Slurm places rank 0 there unless the task
distribution is ``arbitrary``; set ``MASTER_ADDR`` then). The port defaults to :data:`DEFAULT_MASTER_PORT`
(29500, torch's own default): two jobs sharing a node need different ``MASTER_PORT`` values.

Caveat: an ``sbatch`` script itself carries ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``; start the training
with ``srun`` inside it (one process per task), not directly, or rank 0 waits for ranks that never come.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, MutableMapping, Optional

DEFAULT_MASTER_PORT = 29500
LOOPBACK = "127.0.0.1"

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
OPENMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE")
PMI_VARS = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
              "SLURM_NODEID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")

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


def _reader(env: Mapping[str, str]) -> Optional[Callable[[Mapping[str, str]], "LaunchInfo"]]:
    """The reader of the launcher whose variables ``env`` holds (first in precedence order), or None."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_env
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return lambda e: _from_mpi(e, "openmpi", *OPENMPI_VARS)
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return lambda e: _from_mpi(e, "mpich", *PMI_VARS)
    if "SLURM_PROCID" in env:
        return _from_slurm
    return None


def launcher_present(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether any supported launcher's variables are in the environment (``os.environ`` by default)."""
    return _reader(os.environ if environ is None else environ) is not None


def discover_launch(environ: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """The launch this process belongs to, from the launcher's environment variables (``os.environ`` by default).

    Raises:
        RuntimeError: no launcher's variables are present (the message lists those looked for and how to launch),
            or a multi-node MPI job has no ``MASTER_ADDR`` and no usable mpi4py.
        ValueError: a variable is not an integer, or the values disagree (rank ≥ world size, ...); the message
            names the variable.
    """
    env = os.environ if environ is None else environ
    reader = _reader(env)
    if reader is None:
        raise RuntimeError(
            "no distributed launcher found in the environment: looked for torchrun/deepspeed's "
            f"{', '.join(TORCH_VARS)}; Open MPI's {', '.join(OPENMPI_VARS)}; MPICH / Intel MPI's "
            f"{', '.join(PMI_VARS)}; Slurm's {', '.join(SLURM_VARS)}.\n" + HOW_TO_LAUNCH)
    return reader(env)


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
    return LaunchInfo(rank, world_size, local_rank, local_world_size, addr, _port(env), launcher)


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
        raise ValueError(f"{launcher}: {local_rank_var} and {local_size_var} are not set (a {world_size}-rank job)")
    _check(rank, world_size, local_rank, local_world_size, (rank_var, size_var, local_rank_var, local_size_var))
    port = _port(env)
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
    return LaunchInfo(rank, world_size, local_rank, local_world_size, addr, _port(env), "slurm")


# ---------------------------------------------------------------------------------------------------- MPI

def _mpi4py_rank0_hostname(rank: int, world_size: int) -> Optional[str]:
    """Rank 0's host name broadcast over ``MPI.COMM_WORLD`` (a collective: every rank calls it); ``None`` when
    mpi4py is not importable, its MPI library cannot load, or its ``COMM_WORLD`` is not this job (an mpi4py built
    for another MPI starts as a singleton)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):
        return None
    import socket

    comm = MPI.COMM_WORLD
    if comm.Get_size() != world_size or comm.Get_rank() != rank:
        return None
    return comm.bcast(socket.gethostname() if rank == 0 else None, root=0)


# replaced in unit tests; ``(rank, world_size) -> rank 0's host or None``
mpi_rank0_hostname: Callable[[int, int], Optional[str]] = _mpi4py_rank0_hostname


# ---------------------------------------------------------------------------------------------------- Slurm syntax

def expand_slurm_nodelist(nodelist: str) -> Iterator[str]:
    """The host names of a Slurm node list in order, e.g. ``"node[01-03,07],gpu5"`` → node01, node02, node03,
    node07, gpu5 (zero padding kept; several bracket groups in one name, ``"r[1-2]-n[1-2]"``, expand as a
    product with the last group varying fastest). A generator: the first host of a huge list is cheap.

    Raises:
        ValueError: unbalanced brackets, an empty name, or a malformed range."""
    for expr in _split_top_level(nodelist.strip(), nodelist):
        yield from _expand_host(expr, nodelist)


def first_slurm_host(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a Slurm node list (where Slurm's block distribution puts task 0)."""
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


def _split_top_level(text: str, whole: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in node list {whole!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {whole!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {whole!r}")
    parts.append(text[start:])
    parts = [p.strip() for p in parts]
    if any(not p for p in parts):
        raise ValueError(f"empty host name in node list {whole!r}")
    return parts


def _expand_host(expr: str, whole: str) -> Iterator[str]:
    m = re.search(r"\[([^\]]*)\]", expr)
    if m is None:
        yield expr
        return
    prefix, rest = expr[:m.start()], expr[m.end():]
    for item in m.group(1).split(","):
        item = item.strip()
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if r is None:
            raise ValueError(f"cannot read range {item!r} in node list {whole!r}")
        lo, hi = r.group(1), r.group(2) if r.group(2) is not None else r.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {whole!r}")
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            for tail in _expand_host(rest, whole):
                yield f"{prefix}{n:0{width}d}{tail}"


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


def _port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" not in env:
        return DEFAULT_MASTER_PORT
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={port} is outside [1, 65535]")
    return port
