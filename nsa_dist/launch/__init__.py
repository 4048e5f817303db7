"""Launching: which launcher started this process (torchrun, ``deepspeed``, Open MPI / MPICH / Intel MPI, Slurm)
and where its ranks meet (:func:`discover_launch`, :func:`export_torch_env`), and local gloo process groups on
the CPU (:func:`run_local_group`: tests and ``nsa-dist train --cp N``)."""
from .env import (DEFAULT_MASTER_PORT, LaunchInfo, discover_launch, expand_slurm_nodelist, export_torch_env,
                  first_slurm_host, free_port, launcher_present, master_port, mpi4py_matches_launch,
                  parse_slurm_tasks_per_node)
from .local_group import run_local_group

__all__ = ["DEFAULT_MASTER_PORT", "LaunchInfo", "discover_launch", "expand_slurm_nodelist", "export_torch_env",
           "first_slurm_host", "free_port", "launcher_present", "master_port", "mpi4py_matches_launch",
           "parse_slurm_tasks_per_node", "run_local_group"]
